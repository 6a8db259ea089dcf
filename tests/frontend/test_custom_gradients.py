"""Programs with ``tf.custom_gradient`` ops (``tf.nn.silu``, user-defined ones) split anywhere
give the tape's gradient: their gradient functions close over tensors of the traced graph
and are made to work on the stage's imported copy (``custom_gradients``)."""

import numpy as np
import pytest
import tensorflow as tf
from models import MODES, RTOL, max_rel_error, randomize_model, value_rel_error

import gradsplit_compiler as gsc

TOL = RTOL[tf.float64]


def _program(seed=0):
    rng = np.random.default_rng(seed)
    w1 = tf.Variable(rng.normal(size=(6, 8)) / 3)
    w2 = tf.Variable(rng.normal(size=(8, 8)) / 3)
    w3 = tf.Variable(rng.normal(size=(8, 4)) / 3)

    @tf.custom_gradient
    def scaled_tanh(x):
        scale = tf.reduce_mean(x * x) + 1.0  # an intermediate the gradient closes over
        y = tf.tanh(x) * scale

        def grad(dy):
            return dy * (1.0 - tf.tanh(x) ** 2) * scale + tf.reduce_sum(
                dy * tf.tanh(x)) * 2.0 * x / tf.cast(tf.size(x), x.dtype)

        return y, grad

    @tf.function
    def loss(x, t):
        h1 = gsc.mark(tf.nn.silu(x @ w1, beta=1.5), "h1")
        h2 = gsc.mark(scaled_tanh(h1 @ w2), "h2")
        h3 = tf.nn.silu(h2) @ w3
        return tf.reduce_mean((h3 - t) ** 2)

    signature = [tf.TensorSpec([None, 6], tf.float64), tf.TensorSpec([None, 4], tf.float64)]
    args = [tf.constant(rng.normal(size=(5, 6))), tf.constant(rng.normal(size=(5, 4)))]
    return loss, signature, args, [w1, w2, w3]


@pytest.mark.parametrize("cuts", [["h1"], ["h2"], ["h1", "h2"]])
@MODES
def test_custom_gradients_split_anywhere_give_the_tape_gradient(cuts, jit_compile):
    loss, signature, args, variables = _program()
    split = gsc.split(loss, signature, cuts)
    value, grads = split.value_and_gradients(*args, jit_compile=jit_compile)

    @tf.function(jit_compile=jit_compile)
    def reference(*a):
        with tf.GradientTape() as tape:
            v = loss.python_function(*a)
        return v, tape.gradient(v, variables)

    ref_value, ref_grads = reference(*args)
    assert value_rel_error(value, ref_value) <= TOL
    assert max_rel_error(grads, ref_grads) <= TOL
    outputs, _, by_stage = split.run_stages(args, jit_compile=jit_compile)
    assert value_rel_error(outputs, ref_value) <= TOL
    assert max_rel_error(by_stage, ref_grads) <= TOL


def test_verify_passes_on_a_keras_model_with_silu_activations():
    import keras

    inp = keras.Input((6,), dtype="float64")
    h = keras.layers.Dense(8, activation="silu", name="d1", dtype="float64")(inp)
    h = keras.layers.Dense(8, activation="silu", name="d2", dtype="float64")(h)
    model = randomize_model(
        keras.Model(inp, keras.layers.Dense(3, name="head", dtype="float64")(h)), 0)

    @tf.function
    def loss(x, t):
        return tf.reduce_mean((model(x) - t) ** 2)

    signature = [tf.TensorSpec([None, 6], tf.float64), tf.TensorSpec([None, 3], tf.float64)]
    split = gsc.split(loss, signature, ["d1", "d2"])
    rng = np.random.default_rng(1)
    args = [tf.constant(rng.normal(size=(4, 6))), tf.constant(rng.normal(size=(4, 3)))]
    for jit_compile in (False, True):
        report = gsc.verify(split, *args, jit_compile=jit_compile)
        assert report.ok, str(report)
