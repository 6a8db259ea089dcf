"""Randomness, as ``docs/semantics.md`` defines it: each random op runs once per step, in the
forward of the stage that holds it; its draw, when a backward needs it, is a residual; the
backward uses that same draw. So the composed gradient is the gradient of ``fn`` evaluated
with the same draw.

How the reference gets the same draw depends on where the generator keeps its state:

- ``tf.random.Generator`` and Keras layers (``Dropout`` draws from a ``SeedGenerator``) keep
  it in variables: restore the variables before the reference and before the composed run,
  and both draw the same numbers, in graph mode and under XLA.
- Op-seeded stateful ops (``tf.random.normal(seed=...)``, ``tf.nn.dropout(seed=...)``) keep
  it in the kernel of each function instance: in graph mode the k-th step of a fresh split
  draws what the k-th call of a fresh ``fn`` draws. Under XLA no two programs draw alike, so
  the test is internal: the value and the gradient must come from one draw.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from models import (
    keras_floatx,
    normal,
    randomize_variables,
    reference_value_and_grads,
    restore,
    snapshot,
    variable,
)
from random_programs import assert_close

import gradsplit_compiler as gsc

F64 = tf.float64
MODES = pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
RANDOM_OP_TYPES = {"RandomUniform", "RandomStandardNormal", "TruncatedNormal",
                   "StatelessRandomUniformV2", "StatelessRandomNormalV2",
                   "StatelessRandomGetKeyCounter", "RngReadAndSkip"}


def _args(seed: int = 0, batch: int = 5):
    rng = np.random.default_rng(seed)
    return [tf.constant(normal(rng, (batch, 6), F64)), tf.constant(normal(rng, (batch, 3), F64))]


SIGNATURE = [tf.TensorSpec([None, 6], F64), tf.TensorSpec([None, 3], F64)]


def keras_dropout_program(where: str):
    """Dense(8, tanh) -> Dropout(0.5) -> Dense(3), squared error, cut at ``h``: the dropout
    is before the cut (stage 0) or after it (stage 1)."""
    import keras

    keras.utils.set_random_seed(0)
    with keras_floatx("float64"):
        dense1 = keras.layers.Dense(8, activation="tanh", name="dense1")
        drop = keras.layers.Dropout(0.5, seed=3, name="drop")
        dense2 = keras.layers.Dense(3, name="dense2")
        dense1.build((None, 6))
        dense2.build((None, 8))
    randomize_variables(dense1.variables + dense2.variables, 0)  # no zero biases

    @tf.function
    def loss(x, target):
        h = dense1(x)
        if where == "before_cut":
            h = gsc.mark(drop(h, training=True), "h")
        else:
            h = drop(gsc.mark(h, "h"), training=True)
        return tf.reduce_mean(tf.square(dense2(h) - target))

    return loss, drop


def generator_program():
    """Noise from a ``tf.random.Generator`` multiplies the features before the cut, and the
    same generator draws a dropout-like mask after it."""
    rng = np.random.default_rng(1)
    W1 = variable(rng, (6, 8), F64, "W1")
    W2 = variable(rng, (8, 3), F64, "W2")
    generator = tf.random.Generator.from_seed(7)

    @tf.function
    def loss(x, target):
        h = tf.tanh(tf.matmul(x, W1))
        h = gsc.mark(h * generator.normal(tf.shape(h), dtype=F64), "h")
        keep = tf.cast(generator.uniform(tf.shape(h), dtype=F64) > 0.5, F64)
        return tf.reduce_mean(tf.square(tf.matmul(h * keep, W2) - target))

    return loss, generator


def op_seeded_program(crossing: bool = False):
    """``tf.nn.dropout(seed=11)`` before the cut and ``tf.random.normal(seed=5)`` after it;
    with ``crossing`` the normal draw is made before the cut and used on both sides.
    The value is linear in ``V``: ``value == sum(V * dvalue/dV)`` exactly when the value and
    the gradient come from one draw."""
    rng = np.random.default_rng(2)
    W = variable(rng, (6, 8), F64, "W")
    V = variable(rng, (8,), F64, "V")

    @tf.function
    def loss(x, target):
        h = tf.tanh(tf.matmul(x, W))
        noise = tf.random.normal(tf.shape(h), seed=5, dtype=F64) if crossing else None
        h = gsc.mark(tf.nn.dropout(h, 0.5, seed=11) * (noise if crossing else 1.0), "h")
        if not crossing:
            noise = tf.random.normal(tf.shape(h), seed=5, dtype=F64)
        return tf.reduce_sum(h * V * noise) + 0.0 * tf.reduce_sum(target)

    return loss, V


def _same_draw_check(split, fn, args, jit_compile):
    """Reference and composed step from the same variable values (RNG states included);
    returns the variable values after each, to compare how far each moved the state."""
    variables = list(split.variables)
    start = snapshot(variables)
    try:
        ref_value, ref_grads = reference_value_and_grads(fn, variables, jit_compile)(*args)
        ref_after = snapshot(variables)
        restore(variables, start)
        value, grads = split.value_and_gradients(*args, jit_compile=jit_compile)
        after = snapshot(variables)
        restore(variables, start)
        outputs, _, stage_grads = split.run_stages(args, jit_compile=jit_compile)
        stage_after = snapshot(variables)
    finally:
        restore(variables, start)
    assert_close([value], [ref_value], "value")
    assert_close(grads, ref_grads, "value_and_gradients")
    assert_close(tf.nest.flatten(outputs), [ref_value], "run_stages value")
    assert_close(stage_grads, ref_grads, "run_stages")
    for name, got in (("value_and_gradients", after), ("run_stages", stage_after)):
        for var, a, r in zip(variables, got, ref_after):
            np.testing.assert_array_equal(a, r, err_msg=f"{name}: {var.name} moved differently")
    return start, ref_after


# -- Keras Dropout -----------------------------------------------------------------------------


@MODES
@pytest.mark.parametrize("where", ["before_cut", "after_cut"])
def test_keras_dropout_gradient_equals_tape_with_the_same_draw(where, jit_compile):
    fn, drop = keras_dropout_program(where)
    split = gsc.split(fn, SIGNATURE, ["h"])
    start, after = _same_draw_check(split, fn, _args(0), jit_compile)
    state = next(i for i, v in enumerate(split.variables) if "seed_generator" in v.name)
    assert not np.array_equal(start[state], after[state]), "the draw must advance the seed"


def test_keras_dropout_draws_a_new_mask_every_step_and_drops_about_half():
    fn, _ = keras_dropout_program("before_cut")
    split = gsc.split(fn, SIGNATURE, ["h"])
    args = _args(0)
    grads = [split.value_and_gradients(*args, jit_compile=False)[1][0] for _ in range(2)]
    assert not np.array_equal(grads[0], grads[1])
    stage = split.stages[0]
    outputs, _ = stage.forward(*[dict(zip(split.arg_names, args))[n] for n in stage.inputs])
    h = outputs[next(i for i, n in enumerate(stage.outputs) if "gsc.mark.h." in n)]
    assert 0.2 < float(np.mean(np.asarray(h) == 0.0)) < 0.8


# -- tf.random.Generator -----------------------------------------------------------------------


@MODES
def test_generator_gradient_equals_tape_with_the_same_draw(jit_compile):
    fn, generator = generator_program()
    split = gsc.split(fn, SIGNATURE, ["h"])
    assert any(v is generator.state for v in split.variables), "its state is a variable fn reads"
    _same_draw_check(split, fn, _args(1), jit_compile)


@MODES
def test_generator_state_advances_exactly_as_one_call_of_fn(jit_compile):
    fn, generator = generator_program()
    split = gsc.split(fn, SIGNATURE, ["h"])
    generator.reset_from_seed(7)
    fn(*_args(1))
    one_call = generator.state.numpy().copy()
    generator.reset_from_seed(7)
    split.value_and_gradients(*_args(1), jit_compile=jit_compile)
    np.testing.assert_array_equal(generator.state.numpy(), one_call)


# -- op-seeded stateful ops --------------------------------------------------------------------


@pytest.mark.parametrize("crossing", [False, True], ids=["each_side", "draw_crosses_the_cut"])
def test_op_seeded_step_k_of_a_fresh_split_equals_call_k_of_a_fresh_fn(crossing):
    """Graph mode: the kernels of a fresh function start their sequence anew, so the k-th
    step of a fresh split (composed, or each stage on its own) draws what the k-th call of
    a fresh reference draws. A random op run twice in a step (in a backward, say) would put
    every later step out of line."""
    fn, _ = op_seeded_program(crossing)
    split = gsc.split(fn, SIGNATURE, ["h"])
    reference = reference_value_and_grads(fn, split.variables, False)
    args = _args(2)
    for step in range(3):
        ref_value, ref_grads = reference(*args)
        value, grads = split.value_and_gradients(*args, jit_compile=False)
        outputs, _, stage_grads = split.run_stages(args, jit_compile=False)
        assert_close([value, outputs], [ref_value, ref_value], f"step {step} value")
        assert_close(grads, ref_grads, f"step {step} value_and_gradients")
        assert_close(stage_grads, ref_grads, f"step {step} run_stages")


@MODES
@pytest.mark.parametrize("route", ["value_and_gradients", "run_stages"])
@pytest.mark.parametrize("crossing", [False, True], ids=["each_side", "draw_crosses_the_cut"])
def test_op_seeded_value_and_gradient_come_from_one_draw(crossing, route, jit_compile):
    """Also under XLA, where no reference draws alike: ``value == sum(V * dvalue/dV)``."""
    fn, V = op_seeded_program(crossing)
    split = gsc.split(fn, SIGNATURE, ["h"])
    index = next(i for i, v in enumerate(split.variables) if v is V)
    for _ in range(2):
        if route == "value_and_gradients":
            value, grads = split.value_and_gradients(*_args(2), jit_compile=jit_compile)
        else:
            value, _, grads = split.run_stages(_args(2), jit_compile=jit_compile)
        expected = float(tf.reduce_sum(V * grads[index]))
        assert abs(float(value) - expected) <= 1e-12 * max(abs(expected), 1.0)


def _random_ops(concrete) -> list[str]:
    return [op.type for op in concrete.graph.get_operations() if op.type in RANDOM_OP_TYPES]


@pytest.mark.parametrize("program", ["op_seeded", "generator"])
def test_random_ops_run_in_one_stage_forward_and_never_in_a_backward(program):
    fn = op_seeded_program()[0] if program == "op_seeded" else generator_program()[0]
    split = gsc.split(fn, SIGNATURE, ["h"])
    original = _random_ops(fn.get_concrete_function(*SIGNATURE))
    forwards = [_random_ops(s.forward.get_concrete_function()) for s in split.stages]
    backwards = [_random_ops(s.backward.get_concrete_function()) for s in split.stages]
    assert sorted(sum(forwards, [])) == sorted(original)
    assert backwards == [[] for _ in split.stages]


def test_the_draw_the_backward_needs_is_a_residual():
    fn, _ = op_seeded_program()
    split = gsc.split(fn, SIGNATURE, ["h"])
    stage = split.stages[1]  # holds tf.random.normal; its backward multiplies by the draw
    assert any("random_normal" in r for r in stage.residuals), stage.residuals


@MODES
def test_stateless_random_ops_seeded_by_an_argument_are_reproduced_exactly(jit_compile):
    rng = np.random.default_rng(3)
    W = variable(rng, (6, 8), F64, "W")

    @tf.function
    def loss(x, seed):
        h = gsc.mark(tf.tanh(tf.matmul(x, W)), "h")
        keep = tf.random.stateless_uniform(tf.shape(h), seed=seed, dtype=F64) > 0.5
        return tf.reduce_mean(tf.square(tf.where(keep, h, 0.0)))

    signature = [SIGNATURE[0], tf.TensorSpec([2], tf.int32)]
    split = gsc.split(loss, signature, ["h"])
    args = [_args(3)[0], tf.constant([4, 2], tf.int32)]
    ref_value, ref_grads = reference_value_and_grads(loss, split.variables, jit_compile)(*args)
    value, grads = split.value_and_gradients(*args, jit_compile=jit_compile)
    assert_close([value], [ref_value], "value")
    assert_close(grads, ref_grads, "grads")


# -- gsc.verify on random programs -------------------------------------------------------------


@MODES
@pytest.mark.parametrize("program", ["keras_dropout", "generator"])
def test_verify_checks_programs_whose_rng_state_is_a_variable(program, jit_compile):
    """``verify`` restores the variables ``fn`` writes (the RNG state among them) before the
    composed run, so both sides draw alike; and it leaves the state as it found it."""
    fn = keras_dropout_program("before_cut")[0] if program == "keras_dropout" else (
        generator_program()[0])
    split = gsc.split(fn, SIGNATURE, ["h"])
    split.value_and_gradients(*_args(0), jit_compile=False)  # not the first step
    before = snapshot(split.variables)
    report = gsc.verify(split, *_args(0), jit_compile=jit_compile)
    assert report.ok, str(report)
    for var, b, a in zip(split.variables, before, snapshot(split.variables)):
        np.testing.assert_array_equal(a, b, err_msg=f"verify moved {var.name}")


def test_verify_checks_op_seeded_programs_in_graph_mode_after_training_steps():
    """Both sides must draw alike however many steps the split has run: e.g. compare fresh
    function instances of the reference and of the composed stages, each called once."""
    fn, _ = op_seeded_program()
    split = gsc.split(fn, SIGNATURE, ["h"])
    assert gsc.verify(split, *_args(2), jit_compile=False).ok  # the first step: in line
    split.value_and_gradients(*_args(2), jit_compile=False)
    report = gsc.verify(split, *_args(2), jit_compile=False)
    assert report.ok, str(report)


def test_verify_leaves_the_next_training_step_drawing_what_it_would_have_drawn():
    fn, _ = op_seeded_program()
    split = gsc.split(fn, SIGNATURE, ["h"])
    reference = reference_value_and_grads(fn, split.variables, False)
    args = _args(2)
    for step in range(3):
        assert gsc.verify(split, *args, jit_compile=False).ok
        ref_value, ref_grads = reference(*args)
        value, grads = split.value_and_gradients(*args, jit_compile=False)
        assert_close([value], [ref_value], f"step {step} value")
        assert_close(grads, ref_grads, f"step {step} grads")


def test_verify_refuses_op_seeded_programs_under_xla():
    """Under XLA stateful random ops draw differently in every program: ``verify`` cannot
    compare with a reference, so it must say so (naming the op), not report a mismatch."""
    fn, _ = op_seeded_program()
    split = gsc.split(fn, SIGNATURE, ["h"])
    # a refusal, never a report: under XLA the two sides cannot draw alike
    with pytest.raises(gsc.GradSplitError,
                       match=r"draws random numbers with stateful ops \(.*Random") as info:
        gsc.verify(split, *_args(2), jit_compile=True)
    assert "Verify with jit_compile=False" in str(info.value)
    assert "tf.random.stateless_*" in str(info.value)
    # and without XLA the op seeds make both sides draw alike: verified
    assert gsc.verify(split, *_args(2), jit_compile=False).ok


def test_verify_refuses_random_ops_without_any_seed():
    """With neither an op seed nor a global seed (``tf.random.set_seed``), a stateful random
    op draws differently in every function instance: no reference can see the composed
    draw, so ``verify`` must say so (naming the op or the seed), not report a mismatch."""
    tf.random.set_seed(None)  # the suite seeds every test; this program must have no seed
    rng = np.random.default_rng(4)
    W = variable(rng, (6, 8), F64, "W")

    @tf.function
    def loss(x, target):
        h = gsc.mark(tf.tanh(tf.matmul(x, W)) * tf.random.normal([5, 8], dtype=F64), "h")
        return tf.reduce_mean(tf.square(h[:, :3] - target))

    split = gsc.split(loss, SIGNATURE, ["h"])
    with pytest.raises(gsc.GradSplitError, match=r"draw without a seed") as info:
        gsc.verify(split, *_args(4), jit_compile=False)
    assert "Give the op a seed= or call tf.random.set_seed before split()" in str(info.value)
