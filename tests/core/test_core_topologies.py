"""Cuts on programs of several shapes: chains, parallel branches, skip connections, tensors and
variables used by several stages, unconnected variables, integer arguments.

All in float64 and checked against ``tf.GradientTape`` within 1e-12, under XLA (both sides) and
in graph mode (both sides).
"""

import numpy as np
import pytest
import tensorflow as tf
from models import (
    MODES,
    RTOL,
    assert_matches_tape,
    integer_labels,
    max_rel_error,
    mlp,
    multi_use,
    parallel_branches,
    reference_value_and_grads,
    reference_vjp,
    shared_variable,
    skip_connection,
    stages_reading,
    unconnected_variables,
)

import gradsplit_compiler as gsc

TOL = RTOL[tf.float64]


def _assert_exact(case, split, jit_compile, seed=0):
    return assert_matches_tape(case.fn, split, case.args(seed), jit_compile, TOL)


# -- several cuts ------------------------------------------------------------------------------


@MODES
def test_two_cuts_on_mlp_gradients_exact(jit_compile):
    case = mlp(depth=4)
    split = gsc.split(case.fn, case.input_signature, ["h1", "h2"])
    assert len(split.stages) == 3
    _assert_exact(case, split, jit_compile)


@MODES
def test_three_cuts_on_mlp_gradients_exact(jit_compile):
    case = mlp(depth=4)
    split = gsc.split(case.fn, case.input_signature, ["h1", "h2", "h3"])
    assert len(split.stages) == 4
    _assert_exact(case, split, jit_compile)


def test_mlp_chain_boundaries_are_the_cut_tensors_and_the_target():
    case = mlp(depth=4)
    split = gsc.split(case.fn, case.input_signature, ["h1", "h2", "h3"])
    target = split.arg_names[1]
    expected = [[case.names[f"h{k}"], target] for k in (1, 2, 3)]
    assert [sorted(b) for b in split.boundaries] == [sorted(e) for e in expected]


def test_mlp_each_layer_weight_is_read_in_its_own_stage_only():
    case = mlp(depth=4)
    split = gsc.split(case.fn, case.input_signature, ["h1", "h2", "h3"])
    weights = case.variables[:4]
    assert [stages_reading(split, W) for W in weights] == [[0], [1], [2], [3]]


# -- parallel branches -------------------------------------------------------------------------


@MODES
def test_parallel_branches_as_one_cut_of_two_tensors_gradients_exact(jit_compile):
    case = parallel_branches()
    split = gsc.split(case.fn, case.input_signature, [["a_branch", "b_branch"]])
    assert len(split.stages) == 2
    assert sorted(split.boundaries[0]) == sorted([case.names["a_branch"],
                                                  case.names["b_branch"]])
    _assert_exact(case, split, jit_compile)


@MODES
def test_parallel_branches_as_two_cuts_gradients_exact(jit_compile):
    case = parallel_branches()
    split = gsc.split(case.fn, case.input_signature, ["a_branch", "b_branch"])
    assert len(split.stages) == 3
    _assert_exact(case, split, jit_compile)


def test_parallel_branches_as_two_cuts_carry_x_past_the_first():
    """Stage 1 computes ``b_branch`` from ``x``: ``x`` crosses cut 0, ``a_branch`` crosses
    both cuts."""
    case = parallel_branches()
    split = gsc.split(case.fn, case.input_signature, ["a_branch", "b_branch"])
    x, a, b = split.arg_names[0], case.names["a_branch"], case.names["b_branch"]
    assert sorted(split.boundaries[0]) == sorted([x, a])
    assert sorted(split.boundaries[1]) == sorted([a, b])
    Wa, Wb, Wc = case.variables
    assert [stages_reading(split, v) for v in (Wa, Wb, Wc)] == [[0], [1], [2]]


# -- skip connections --------------------------------------------------------------------------


@pytest.mark.parametrize("crosses", [1, 3])
def test_skip_connection_appears_in_the_boundary_of_every_cut_it_crosses(crosses):
    case = skip_connection(crosses)
    split = gsc.split(case.fn, case.input_signature, case.cuts)
    assert len(split.boundaries) == crosses
    for k, boundary in enumerate(split.boundaries):
        assert case.names["h1"] in boundary, (k, boundary)
        assert case.names[f"h{k + 2}"] in boundary, (k, boundary)


@MODES
@pytest.mark.parametrize("crosses", [1, 3])
def test_skip_connection_gradients_exact(crosses, jit_compile):
    case = skip_connection(crosses)
    split = gsc.split(case.fn, case.input_signature, case.cuts)
    _assert_exact(case, split, jit_compile)


# -- a tensor read by several later stages -----------------------------------------------------


def test_tensor_used_by_several_later_stages_is_an_input_of_each():
    case = multi_use()
    split = gsc.split(case.fn, case.input_signature, case.cuts)
    h1 = case.names["h1"]
    assert [s.index for s in split.stages if h1 in s.inputs] == [1, 2, 3]
    assert all(h1 in b for b in split.boundaries)


@MODES
def test_tensor_used_by_several_later_stages_gradients_exact(jit_compile):
    """Its cotangents from stages 1, 2 and 3 are summed before stage 0's backward."""
    case = multi_use()
    split = gsc.split(case.fn, case.input_signature, case.cuts)
    _assert_exact(case, split, jit_compile)


# -- a variable read by several stages ---------------------------------------------------------


def test_variable_used_in_several_stages_is_a_variable_of_each():
    case = shared_variable()
    split = gsc.split(case.fn, case.input_signature, case.cuts)
    W, c = case.variables
    assert stages_reading(split, W) == [0, 1, 2]
    assert stages_reading(split, c) == [0]
    assert [id(v) for v in split.variables].count(id(W)) == 1


@MODES
def test_variable_used_in_several_stages_gradient_is_the_sum(jit_compile):
    case = shared_variable()
    split = gsc.split(case.fn, case.input_signature, case.cuts)
    _assert_exact(case, split, jit_compile)


def test_variable_used_in_several_stages_gradient_is_the_sum_of_stage_gradients():
    """Each stage's own ``variable_grads`` for ``W`` is a partial gradient; together they
    add up to the tape's, and none alone does."""
    case = shared_variable()
    split = gsc.split(case.fn, case.input_signature, case.cuts)
    W = case.variables[0]
    args = case.args(1)
    _, ref_grads = reference_value_and_grads(case.fn, split.variables, False)(*args)
    ref_W = ref_grads[[id(v) for v in split.variables].index(id(W))]

    env = dict(zip(split.arg_names, args))
    residuals = []
    for stage in split.stages:
        outs, res = stage.forward(*[env[n] for n in stage.inputs])
        env.update(zip(stage.outputs, outs))
        residuals.append(res)
    cotangents = {split.output_names[0]: tf.ones([], tf.float64)}
    parts = []
    for stage in reversed(split.stages):
        outs = [cotangents.get(n, tf.zeros_like(env[n])) for n in stage.outputs]
        in_cots, var_grads = stage.backward(residuals[stage.index], outs)
        for name, cot in zip(stage.inputs, in_cots):
            if cot is not None:
                cotangents[name] = cotangents[name] + cot if name in cotangents else cot
        parts += [g for v, g in zip(stage.variables, var_grads) if v is W]
    assert len(parts) == 3
    assert max_rel_error([tf.add_n(parts)], [ref_W]) <= TOL
    assert all(max_rel_error([p], [ref_W]) > 1e-3 for p in parts)


# -- variables the value does not depend on ----------------------------------------------------


@MODES
def test_variable_the_value_does_not_depend_on_gets_zeros_not_none(jit_compile):
    case = unconnected_variables()
    split = gsc.split(case.fn, case.input_signature, case.cuts)
    _, frozen, unused, _ = case.variables
    grads = _assert_exact(case, split, jit_compile)
    ids = [id(v) for v in split.variables]
    for var in (frozen, unused):
        assert id(var) in ids, var.name
        grad = grads[ids.index(id(var))]
        assert grad is not None
        assert tuple(grad.shape) == tuple(var.shape)
        assert grad.dtype == var.dtype
        assert np.all(np.asarray(grad) == 0.0)


# -- integer arguments -------------------------------------------------------------------------


def test_integer_argument_flows_past_the_cut_to_the_stage_that_reads_it():
    case = integer_labels()
    split = gsc.split(case.fn, case.input_signature, case.cuts)
    labels = split.arg_names[1]
    assert labels in split.boundaries[0]
    assert labels not in split.stages[0].inputs
    assert labels in split.stages[1].inputs


@MODES
def test_integer_argument_gradients_exact(jit_compile):
    case = integer_labels()
    split = gsc.split(case.fn, case.input_signature, case.cuts)
    _assert_exact(case, split, jit_compile)


@MODES
def test_integer_argument_vjp_input_cotangent_is_none_and_float_one_exact(jit_compile):
    case = integer_labels()
    split = gsc.split(case.fn, case.input_signature, case.cuts)
    args = case.args(2)
    one = tf.constant(1.0, tf.float64)
    _, input_cotangents, grads = split.vjp(args, one, jit_compile=jit_compile)
    _, ref_inputs, ref_grads = reference_vjp(case.fn, split.variables, jit_compile)(args, [one])
    assert input_cotangents[1] is None
    assert max_rel_error([input_cotangents[0]], [ref_inputs[0]]) <= TOL
    assert max_rel_error(grads, ref_grads) <= TOL
