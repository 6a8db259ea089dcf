"""``gsc.from_networkx(gsc.to_networkx(gd)) == gd`` for every GraphDef TensorFlow made here:
every model of the suite, with and without shapes, nested functions and control flow (whose
bodies live in the function library), Keras models, and the stages' own traced functions."""

import pytest
import tensorflow as tf
from models import (
    CONTROL_FLOW_BUILDERS,
    KERAS_SMALL_BUILDERS,
    SMALL_BUILDERS,
    assert_round_trip,
    keras_floatx,
    mobilenetv2,
    resnet50,
    seed_model,
    seed_outputs_model,
)

import gradsplit_compiler as gsc

BUILDERS = {
    **SMALL_BUILDERS,
    "seed_float32_graph_name": lambda: seed_model(tf.float32, marked=False),
    "seed_outputs": seed_outputs_model,
    **CONTROL_FLOW_BUILDERS,
    **KERAS_SMALL_BUILDERS,
}
SHAPES = pytest.mark.parametrize("add_shapes", [False, True], ids=["plain", "add_shapes"])


def _graph_def(case, add_shapes):
    return case.concrete().graph.as_graph_def(add_shapes=add_shapes)


def _build(name):
    if name in KERAS_SMALL_BUILDERS:
        with keras_floatx("float64"):
            return BUILDERS[name]()
    return BUILDERS[name]()


@SHAPES
@pytest.mark.parametrize("name", list(BUILDERS))
def test_round_trip_keeps_graph_def_equal(name, add_shapes):
    gd = _graph_def(_build(name), add_shapes)
    assert_round_trip(gd)


@pytest.mark.parametrize("name", list(CONTROL_FLOW_BUILDERS))
def test_round_trip_keeps_the_function_library(name):
    gd = _graph_def(_build(name), add_shapes=True)
    assert len(gd.library.function) > 0
    back = gsc.from_networkx(gsc.to_networkx(gd))
    assert [f.signature.name for f in back.library.function] == [
        f.signature.name for f in gd.library.function]
    assert back.library == gd.library


def test_round_trip_keeps_devices_control_inputs_and_node_order():
    case = _build("counted_mlp")  # its assign_add brings automatic control dependencies
    gd = _graph_def(case, add_shapes=True)
    for node in gd.node:  # as a placed graph has them
        node.device = "/job:localhost/replica:0/task:0/device:CPU:0"
    assert any(i.startswith("^") for n in gd.node for i in n.input)
    back = gsc.from_networkx(gsc.to_networkx(gd))
    assert [n.name for n in back.node] == [n.name for n in gd.node]
    assert [list(n.input) for n in back.node] == [list(n.input) for n in gd.node]
    assert {n.device for n in back.node} == {"/job:localhost/replica:0/task:0/device:CPU:0"}
    assert back == gd


@SHAPES
def test_round_trip_of_stage_functions(add_shapes):
    case = seed_model(tf.float64)
    split = gsc.split(case.fn, case.input_signature, case.cuts)
    for stage in split.stages:
        for fn in (stage.forward, stage.backward):
            assert_round_trip(fn.get_concrete_function().graph.as_graph_def(
                add_shapes=add_shapes))


@pytest.mark.parametrize("build", [resnet50, mobilenetv2], ids=["resnet50", "mobilenetv2"])
def test_round_trip_of_large_keras_models(build):
    with keras_floatx("float32"):
        case = build(tf.float32, batch=2)
    assert_round_trip(_graph_def(case, add_shapes=True))
