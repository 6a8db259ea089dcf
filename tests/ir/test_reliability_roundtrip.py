"""Round trip on a corpus: ``gsc.from_networkx(gsc.to_networkx(gd)) == gd`` for the GraphDefs
of keras.applications models traced in training mode and of control-flow programs (``If``,
``While``, ``Case``, ``map_fn``, ``scan``, nested loops, and the v1 ``Switch``/``Merge``/
``NextIteration`` loops, cycles included, that freezing with lowered control flow makes),
with and without ``add_shapes``.

Each model is built once, in its own test, so xdist spreads them over the workers. The
random programs of ``random_programs.py`` round-trip in ``test_reliability_random_programs``.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
import tensorflow as tf
from models import assert_round_trip
from tensorflow.python.framework.convert_to_constants import (
    convert_variables_to_constants_v2,
)

# name -> (constructor name, smallest square input it accepts, extra keyword arguments)
APPLICATIONS = {
    "ResNet50": ("ResNet50", 32, {}),
    "ResNet50V2": ("ResNet50V2", 32, {}),
    "MobileNet": ("MobileNet", 32, {}),
    "MobileNetV2": ("MobileNetV2", 32, {}),
    "MobileNetV3Small": ("MobileNetV3Small", 32, {}),
    "DenseNet121": ("DenseNet121", 32, {}),
    "EfficientNetB0": ("EfficientNetB0", 32, {}),
    "EfficientNetV2B0": ("EfficientNetV2B0", 32, {}),
    "VGG16": ("VGG16", 32, {}),
    "InceptionV3": ("InceptionV3", 75, {}),
    "Xception": ("Xception", 71, {}),
    "ConvNeXtTiny": ("ConvNeXtTiny", 32, {}),
}
# Slow to build and trace (15-20 s each): only with --slow.
SLOW_APPLICATIONS = {
    "NASNetMobile": ("NASNetMobile", 32, {}),
    "InceptionResNetV2": ("InceptionResNetV2", 75, {}),
}


def _application_graph(name: str, table: dict):
    import keras

    constructor, size, kwargs = table[name]
    model = getattr(keras.applications, constructor)(
        weights=None, input_shape=(size, size, 3), classes=10, **kwargs)
    fn = tf.function(lambda x: model(x, training=True))
    graph = fn.get_concrete_function(tf.TensorSpec([2, size, size, 3], tf.float32)).graph
    return graph


def _check_application(name: str, table: dict) -> None:
    graph = _application_graph(name, table)
    for add_shapes in (False, True):
        gd = graph.as_graph_def(add_shapes=add_shapes)
        assert len(gd.node) > 100
        assert_round_trip(gd)
    del graph
    gc.collect()


@pytest.mark.heavy
@pytest.mark.parametrize("name", list(APPLICATIONS))
def test_keras_application_graph_def_round_trips(name):
    _check_application(name, APPLICATIONS)


@pytest.mark.heavy
@pytest.mark.parametrize("name", list(SLOW_APPLICATIONS))
def test_slow_keras_application_graph_def_round_trips(request, name):
    if not request.config.getoption("--slow"):
        pytest.skip("builds in 15-20 s: run with --slow")
    _check_application(name, SLOW_APPLICATIONS)


def test_the_corpus_has_at_least_ten_keras_applications():
    assert len(APPLICATIONS) >= 10


# -- control-flow programs ---------------------------------------------------------------------


def _control_flow_programs() -> dict:
    rng = np.random.default_rng(0)
    W = tf.Variable(rng.normal(size=(4, 4)), name="W")
    f64 = tf.float64

    def cond_in_while(x):
        def body(i, h):
            h = tf.cond(tf.reduce_sum(h) > 0, lambda: tf.tanh(h @ W), lambda: tf.sin(h))
            return i + 1, h
        return tf.while_loop(lambda i, h: i < 3, body, [0, x], maximum_iterations=3)[1]

    def while_in_cond(x):
        def loop(h):
            return tf.while_loop(lambda i, h: i < 2, lambda i, h: (i + 1, tf.tanh(h @ W)),
                                 [0, h])[1]
        return tf.cond(tf.reduce_mean(x) > 0, lambda: loop(x), lambda: x * 2.0)

    def nested_whiles(x):
        def outer(i, h):
            inner = tf.while_loop(lambda j, g: j < 2, lambda j, g: (j + 1, tf.sin(g)), [0, h])
            return i + 1, inner[1] @ W
        return tf.while_loop(lambda i, h: i < 2, outer, [0, x])[1]

    def switch_case(x):
        index = tf.cast(tf.reduce_sum(tf.abs(x)) > 1.0, tf.int32)
        return tf.switch_case(index, [lambda: tf.tanh(x), lambda: x @ W, lambda: tf.sin(x)])

    def map_and_scan(x):
        mapped = tf.map_fn(lambda row: tf.tanh(row) * 2.0, x)
        return tf.scan(lambda acc, row: acc + row, mapped)

    def tensor_array_loop(x):
        ta = tf.TensorArray(f64, size=3)
        def body(i, ta):
            return i + 1, ta.write(i, tf.reduce_sum(x * tf.cast(i, f64)))
        return tf.while_loop(lambda i, ta: i < 3, body, [0, ta])[1].stack()

    def gradient_of_loop(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.reduce_sum(cond_in_while(x))
        return tape.gradient(y, [x, W])

    return {f.__name__: f for f in (cond_in_while, while_in_cond, nested_whiles, switch_case,
                                    map_and_scan, tensor_array_loop, gradient_of_loop)}


CONTROL_FLOW = _control_flow_programs()
SPEC = [tf.TensorSpec([3, 4], tf.float64)]


@pytest.mark.parametrize("add_shapes", [False, True], ids=["plain", "add_shapes"])
@pytest.mark.parametrize("name", list(CONTROL_FLOW))
def test_control_flow_graph_def_round_trips(name, add_shapes):
    gd = tf.function(CONTROL_FLOW[name]).get_concrete_function(*SPEC).graph.as_graph_def(
        add_shapes=add_shapes)
    assert gd.library.function, "control flow keeps its bodies in the function library"
    assert_round_trip(gd)


# TensorFlow's own freezer cannot lower the gradient of a loop (it re-imports a VariableShape
# of a frozen variable), so that program is left out here.
@pytest.mark.parametrize("name", [n for n in CONTROL_FLOW if n != "gradient_of_loop"])
def test_lowered_v1_control_flow_graph_def_round_trips(name):
    """Freezing with ``lower_control_flow=True`` turns ``If``/``While`` into ``Switch``,
    ``Merge``, ``Enter``, ``Exit`` and ``NextIteration``: a GraphDef with cycles."""
    concrete = tf.function(CONTROL_FLOW[name]).get_concrete_function(*SPEC)
    frozen = convert_variables_to_constants_v2(concrete, lower_control_flow=True)
    gd = frozen.graph.as_graph_def(add_shapes=True)
    ops = {n.op for n in gd.node}
    assert ops & {"Switch", "Merge", "NextIteration"}, ops
    assert_round_trip(gd)
