"""The seed problem: ``h = W x + b; y = tanh(h); loss = mse(y, y0)`` cut at ``y``.

The composed gradient must equal ``tf.GradientTape``'s on the original function, compiled the
same way (XLA on both sides, or graph mode on both): float32 within 1e-5 relative, float64
within 1e-12.
"""

import numpy as np
import pytest
import tensorflow as tf
from models import (
    MODES,
    RTOL,
    assert_matches_tape,
    max_rel_error,
    reference_value_and_grads,
    reference_vjp,
    seed_model,
    seed_outputs_model,
    tensor,
    value_rel_error,
)

import gradsplit_compiler as gsc

DTYPES = [tf.float32, tf.float64]
BY_DTYPE = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)


def _split(case):
    return gsc.split(case.fn, case.input_signature, case.cuts)


@MODES
@BY_DTYPE
def test_seed_cut_at_mark_gradients_equal_tape(dtype, jit_compile):
    case = seed_model(dtype, marked=True)
    split = _split(case)
    assert len(split.stages) == 2
    assert_matches_tape(case.fn, split, case.args(seed=1), jit_compile, RTOL[dtype])


@MODES
@BY_DTYPE
def test_seed_cut_at_graph_tensor_name_gradients_equal_tape(dtype, jit_compile):
    case = seed_model(dtype, marked=False)
    split = _split(case)
    assert case.names["y"] == "Tanh:0"  # the name the cut used is TF's own
    assert len(split.stages) == 2
    assert_matches_tape(case.fn, split, case.args(seed=2), jit_compile, RTOL[dtype])


@BY_DTYPE
def test_seed_cut_boundary_is_y_and_the_target_argument(dtype):
    """What crosses the cut: ``y`` itself, and the argument ``y0`` that only stage 1 reads."""
    case = seed_model(dtype, marked=True)
    split = _split(case)
    assert sorted(split.boundaries[0]) == sorted([case.names["y"], split.arg_names[1]])


@BY_DTYPE
def test_seed_variables_found_by_tracing(dtype):
    case = seed_model(dtype)
    split = _split(case)
    assert {id(v) for v in split.variables} == {id(v) for v in case.variables}


@BY_DTYPE
def test_seed_gradients_equal_chained_vjp_by_hand(dtype):
    """The thread's question answered: dL/dW = VJP of y w.r.t. W with cotangent dL/dy."""
    case = seed_model(dtype)
    split = _split(case)
    x, y0 = case.args(seed=3)
    W, b = case.variables
    with tf.GradientTape() as tape_y:
        y = tf.tanh(tf.matmul(x, W) + b)
    with tf.GradientTape() as tape_loss:
        tape_loss.watch(y)
        loss = tf.reduce_mean(tf.square(y - y0))
    g1 = tape_loss.gradient(loss, y)
    expected = tape_y.gradient(y, [W, b], output_gradients=g1)
    _, grads = split.value_and_gradients(x, y0, jit_compile=False)
    by_variable = dict(zip([id(v) for v in split.variables], grads))
    got = [by_variable[id(W)], by_variable[id(b)]]
    assert max_rel_error(got, expected) <= RTOL[dtype]


@MODES
@BY_DTYPE
def test_seed_vjp_input_cotangents_equal_tape(dtype, jit_compile):
    case = seed_model(dtype)
    split = _split(case)
    args = case.args(seed=4)
    cotangent = tf.constant(1.0, dtype)
    outputs, input_cotangents, grads = split.vjp(args, cotangent, jit_compile=jit_compile)
    ref_out, ref_inputs, ref_grads = reference_vjp(case.fn, split.variables, jit_compile)(
        args, [cotangent])
    assert value_rel_error(outputs, ref_out) <= RTOL[dtype]
    assert len(input_cotangents) == len(args)
    assert max_rel_error(input_cotangents, ref_inputs) <= RTOL[dtype]
    assert max_rel_error(grads, ref_grads) <= RTOL[dtype]


@MODES
@BY_DTYPE
def test_seed_vjp_non_scalar_output_equals_tape_with_output_gradients(dtype, jit_compile):
    case = seed_outputs_model(dtype)
    split = _split(case)
    (x,) = case.args(seed=5)
    W, b = case.variables
    cotangent = tensor(np.random.default_rng(6), (6, 5), dtype)
    outputs, input_cotangents, grads = split.vjp([x], cotangent, jit_compile=jit_compile)

    with tf.GradientTape() as tape:
        tape.watch(x)
        y = case.fn(x)
    expected = tape.gradient(y, [x, W, b], output_gradients=cotangent)
    by_variable = dict(zip([id(v) for v in split.variables], grads))
    # Eager tape against XLA: compare within the dtype's tolerance, not bitwise.
    assert value_rel_error(outputs, y) <= RTOL[dtype]
    assert max_rel_error([input_cotangents[0], by_variable[id(W)], by_variable[id(b)]],
                         expected) <= RTOL[dtype]


@BY_DTYPE
def test_seed_value_and_gradients_keeps_working_with_another_batch_size(dtype):
    """A None batch dimension works: the same split runs on batches of 6 and 11."""
    case = seed_model(dtype)
    split = _split(case)
    rng = np.random.default_rng(7)
    ref = reference_value_and_grads(case.fn, split.variables, jit_compile=True)
    for batch in (6, 11):
        args = [tensor(rng, (batch, 10), dtype), tensor(rng, (batch, 5), dtype)]
        _, grads = split.value_and_gradients(*args, jit_compile=True)
        _, ref_grads = ref(*args)
        assert max_rel_error(grads, ref_grads) <= RTOL[dtype]


@BY_DTYPE
def test_seed_verify_reports_ok_under_xla(dtype):
    case = seed_model(dtype)
    split = _split(case)
    report = gsc.verify(split, *case.args(seed=8), jit_compile=True)
    assert report.ok
    assert report.max_rel_error <= RTOL[dtype]
