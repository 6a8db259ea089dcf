"""``split.cotangents``: the value, dL/dy at every cut keyed by the caller's own names, and
the variable gradients in one call, held to an explicit tape on the model split by hand
(``tape.gradient(loss, y)`` with ``y`` watched, the rest of the program computed from
``y``); stages fed and read by the same names; a ``Program`` in place of ``fn``."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import gradsplit_compiler as gsc

RNG = np.random.default_rng(7)


def _close(got, want, tol=1e-12):
    got, want = np.asarray(got), np.asarray(want)
    scale = max(float(np.max(np.abs(want))), 1e-300)
    assert float(np.max(np.abs(got - want))) / scale <= tol, (got, want)


W1 = tf.Variable(RNG.normal(size=(5, 4)), name="W1")
W2 = tf.Variable(RNG.normal(size=(4, 4)), name="W2")
W3 = tf.Variable(RNG.normal(size=(4, 1)), name="W3")


def _first(x):
    return tf.tanh(x @ W1)


def _second(h1):
    return tf.sin(h1 @ W2)


def _rest(h1, h2, t):
    # h1 is read again after the second cut: a skip connection, so dL/dh1 sums two uses
    return tf.reduce_mean(tf.square((h2 + h1) @ W3 - t))


def loss(x, t):
    h1 = gsc.mark(_first(x), "h1")
    h2 = gsc.mark(_second(h1), "h2")
    return _rest(h1, h2, t)


SIG = [tf.TensorSpec([None, 5], tf.float64), tf.TensorSpec([None, 1], tf.float64)]


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
def test_cotangents_at_the_cuts_equal_the_tape_on_the_model_split_by_hand(jit_compile):
    x, t = tf.constant(RNG.normal(size=(6, 5))), tf.constant(RNG.normal(size=(6, 1)))
    split = gsc.split(loss, SIG, cuts=["h1", "h2"])
    got = split.cotangents(x, t, jit_compile=jit_compile)
    assert got.tensors == {"h1": "gsc.mark.h1.:0", "h2": "gsc.mark.h2.:0"}

    h1 = _first(x)  # stage 0 by hand
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(h1)
        h2 = _second(h1)
        value = _rest(h1, h2, t)
    _close(got.cotangents["h1"], tape.gradient(value, h1))   # both uses of h1, summed
    h2 = _second(h1)
    with tf.GradientTape() as tape:
        tape.watch(h2)
        value2 = _rest(h1, h2, t)
    _close(got.cotangents["h2"], tape.gradient(value2, h2))

    with tf.GradientTape() as tape:
        expected = loss(x, t)
    _close(got.value, expected)
    for g, e in zip(got.gradients, tape.gradient(expected, split.variables)):
        _close(g, e)


def test_cotangents_keyed_by_keras_layer_and_by_graph_tensor():
    model = keras.Sequential([keras.Input((5,), dtype="float64"),
                              keras.layers.Dense(4, activation="tanh", name="dense1",
                                                 dtype="float64"),
                              keras.layers.Dense(1, name="head", dtype="float64")])

    def keras_loss(x, t):
        return tf.reduce_mean(tf.square(model(x) - t))

    split = gsc.split(keras_loss, SIG, cuts=["dense1"])
    x, t = tf.constant(RNG.normal(size=(6, 5))), tf.constant(RNG.normal(size=(6, 1)))
    got = split.cotangents(x, t, jit_compile=False)
    h = model.layers[0](x)
    with tf.GradientTape() as tape:
        tape.watch(h)
        value = tf.reduce_mean(tf.square(model.layers[1](h) - t))
    _close(got.cotangents["dense1"], tape.gradient(value, h))

    by_graph_name = gsc.split(keras_loss, SIG, cuts=[got.tensors["dense1"]])
    again = by_graph_name.cotangents(x, t, jit_compile=False)
    assert list(again.cotangents) == [got.tensors["dense1"]]
    _close(again.cotangents[got.tensors["dense1"]], got.cotangents["dense1"])


def test_stages_are_fed_and_read_by_the_callers_names():
    split = gsc.split(loss, SIG, cuts=["h1", "h2"])
    assert [s.input_labels for s in split.stages] == [["x"], ["h1"], ["t", "h1", "h2"]]
    assert [s.output_labels for s in split.stages] == [["h1"], ["h2"], ["Identity:0"]]
    x, t = tf.constant(RNG.normal(size=(6, 5))), tf.constant(RNG.normal(size=(6, 1)))
    values = {"x": x, "t": t}
    residuals = []
    for stage in split.stages:
        outputs, res = stage.run_forward({k: values[k] for k in stage.input_labels})
        values.update(outputs)
        residuals.append(res)
    assert {"h1", "h2"} <= set(values)
    _close(values["h1"], _first(x))
    # backward, last stage first, summing cotangents by name
    cots = {split.stages[-1].output_labels[0]: tf.constant(1.0, tf.float64)}
    totals: dict = {}
    for stage, res in reversed(list(zip(split.stages, residuals))):
        inputs, _ = stage.run_backward(res, {k: cots[k] for k in stage.output_labels
                                             if k in cots})
        for k, c in inputs.items():
            if c is not None:
                cots[k] = cots[k] + c if k in cots else c
                totals[k] = cots[k]
    expected = split.cotangents(x, t, jit_compile=False)
    _close(totals["h1"], expected.cotangents["h1"])
    _close(totals["h2"], expected.cotangents["h2"])
    assert split.tensor("h1") == "gsc.mark.h1.:0" and split.tensor("x") == "x:0"
    assert split.spec("h2").shape.as_list() == [None, 4]


def test_split_of_a_program_leaves_it_unchanged_and_gives_the_same_gradient():
    program = gsc.capture(loss, SIG)
    nodes = dict(program.graph.nodes(data="op"))
    split = gsc.split(program, cuts=["h1"])
    assert dict(program.graph.nodes(data="op")) == nodes and program.cuts == []
    assert not any("stage" in a for _, a in program.graph.nodes(data=True))
    x, t = tf.constant(RNG.normal(size=(6, 5))), tf.constant(RNG.normal(size=(6, 1)))
    assert gsc.verify(split, x, t).ok


REFUSED = [
    (lambda s, x, t: s.cotangents(x), r"fn takes 2 arguments"),
    (lambda s, x, t: s.stages[0].run_forward([x]), r"stage 0's inputs are a dict keyed by "
     r"\['x'\]; got list"),
    (lambda s, x, t: s.stages[0].run_forward({"y": x}), r"stage 0 has no input named 'y'; its "
     r"inputs are \['x'\]"),
    (lambda s, x, t: s.stages[1].run_forward({"t": t}), r"stage 1 needs the inputs"),
    (lambda s, x, t: s.stages[0].run_backward([], {}), r"stage 0: give a cotangent for every "
     r"output of unknown shape"),
    (lambda s, x, t: s.tensor("h9"), r"name 'h9' is not a tensor, a gsc.mark name or a Keras "
     r"layer of this program. Close names in the graph: 'h1'"),
]


@pytest.mark.parametrize("do, message", REFUSED, ids=range(len(REFUSED)))
def test_refusals_by_name(do, message):
    split = gsc.split(loss, SIG, cuts=["h1"])
    x, t = tf.constant(RNG.normal(size=(6, 5))), tf.constant(RNG.normal(size=(6, 1)))
    with pytest.raises(gsc.GradSplitError, match=message):
        do(split, x, t)


def test_cotangents_needs_a_scalar_and_split_needs_a_signature_unless_given_a_program():
    split = gsc.split(lambda x: gsc.mark(tf.tanh(x), "y") * 2.0,
                      [tf.TensorSpec([3], tf.float64)], cuts=["y"])
    with pytest.raises(gsc.GradSplitError, match=r"cotangents needs fn to return a single "
                       r"scalar"):
        split.cotangents(tf.constant([1.0, 2.0, 3.0], tf.float64))
    with pytest.raises(gsc.GradSplitError, match=r"input_signature is missing: give one "
                       r"tf.TensorSpec per argument of fn"):
        gsc.split(loss, cuts=["h1"])
    program = gsc.capture(loss, SIG)
    with pytest.raises(gsc.GradSplitError, match=r"fn is a gsc.Program, which carries its own "
                       r"input_signature; omit input_signature"):
        gsc.split(program, SIG, ["h1"])
