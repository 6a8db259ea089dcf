"""Nested ``tf.function``s, ``tf.cond`` and ``tf.while_loop``.

Nested functions are inlined, so a cut can name a tensor inside them (by a ``gsc.mark`` or by
its inlined graph name); ``If``/``While`` stay whole and may sit between cuts; a cut inside a
branch or loop body is refused with a ``GradSplitError`` that says so. Gradients are float64,
within 1e-12 of ``tf.GradientTape`` compiled the same way.
"""

import pytest
import tensorflow as tf
from models import (
    MODES,
    RTOL,
    assert_matches_tape,
    cond_between_cuts,
    nested_functions,
    stages_reading,
    while_between_cuts,
)

import gradsplit_compiler as gsc

TOL = RTOL[tf.float64]
CALL_OPS = ("PartitionedCall", "StatefulPartitionedCall")


def _assert_exact(case, split, args, jit_compile):
    assert_matches_tape(case.fn, split, args, jit_compile, TOL)


def _inlined_names(case):
    """The graph names, after inlining, of ``inner_tanh`` and ``innermost_sin``: each call's
    op name in its caller, then the op's own name, joined by '/' (as TF names nested scopes)."""
    graph = case.concrete().graph
    (outer_call,) = [op.name for op in graph.get_operations() if op.type in CALL_OPS]
    library = graph.as_graph_def().library
    (inner_fdef,) = [f for f in library.function
                     if any(n.name == "inner_tanh" for n in f.node_def)]
    (inner_call,) = [n.name for n in inner_fdef.node_def if n.op in CALL_OPS]
    return f"{outer_call}/inner_tanh", f"{outer_call}/{inner_call}/innermost_sin"


def _assert_cut_inside_body_refused(case, name, graph_name, construct):
    """Cutting at ``name`` (after ``h1``) is refused, naming the cut, "body" and ``construct``.
    With ``graph_name``, ``name`` is first replaced by the tensor name TF gave it."""
    if graph_name:
        case.concrete()
        name = case.names[name]
    with pytest.raises(gsc.GradSplitError) as info:
        gsc.split(case.fn, case.input_signature, ["h1", name])
    message = str(info.value)
    assert name in message
    assert "body" in message
    assert construct in message


# -- nested tf.functions -----------------------------------------------------------------------


@MODES
def test_nested_function_cut_at_marks_inside_gradients_exact(jit_compile):
    case = nested_functions()
    split = gsc.split(case.fn, case.input_signature, ["inner_mark", "innermost_mark"])
    assert len(split.stages) == 3
    _assert_exact(case, split, case.args(0), jit_compile)


@MODES
def test_nested_function_cut_at_inlined_graph_names_gradients_exact(jit_compile):
    case = nested_functions()
    inner_tanh, innermost_sin = _inlined_names(case)
    split = gsc.split(case.fn, case.input_signature, [inner_tanh, innermost_sin])
    assert len(split.stages) == 3
    assert f"{inner_tanh}:0" in split.boundaries[0]
    assert f"{innermost_sin}:0" in split.boundaries[1]
    _assert_exact(case, split, case.args(1), jit_compile)


def test_nested_function_calls_are_gone_from_the_split_graph():
    case = nested_functions()
    split = gsc.split(case.fn, case.input_signature, case.cuts)
    ops = {split.graph.nodes[n]["op"] for n in split.graph.nodes}
    assert not ops & set(CALL_OPS)


def test_nested_function_variables_read_in_the_stage_that_uses_them():
    case = nested_functions()
    split = gsc.split(case.fn, case.input_signature, case.cuts)
    W1, W2, W3, W4 = case.variables
    assert [stages_reading(split, v) for v in (W1, W2, W3, W4)] == [[0], [0], [1], [2]]


# -- tf.cond -----------------------------------------------------------------------------------


@MODES
@pytest.mark.parametrize("flag", [True, False], ids=["true_branch", "false_branch"])
def test_cond_between_cuts_gradients_exact(flag, jit_compile):
    case = cond_between_cuts()
    split = gsc.split(case.fn, case.input_signature, case.cuts)
    x, _ = case.args(2)
    _assert_exact(case, split, [x, tf.constant(flag)], jit_compile)


def test_cond_between_cuts_sits_in_the_middle_stage():
    case = cond_between_cuts()
    split = gsc.split(case.fn, case.input_signature, case.cuts)
    W1, W2, W3 = case.variables
    assert [stages_reading(split, v) for v in (W1, W2, W3)] == [[0], [1], [2]]
    assert split.arg_names[1] in split.stages[1].inputs  # the predicate


@pytest.mark.parametrize("name", ["in_cond", "cond_tanh"], ids=["mark", "graph_name"])
def test_cut_inside_cond_branch_refused_naming_the_body(name):
    """By its gsc.mark, or by the tensor name TF gives it inside the branch."""
    _assert_cut_inside_body_refused(cond_between_cuts(), name, name == "cond_tanh", "tf.cond")


# -- tf.while_loop -----------------------------------------------------------------------------


@MODES
def test_while_loop_between_cuts_gradients_exact(jit_compile):
    case = while_between_cuts()
    split = gsc.split(case.fn, case.input_signature, case.cuts)
    _assert_exact(case, split, case.args(3), jit_compile)


def test_while_loop_between_cuts_sits_in_the_middle_stage():
    case = while_between_cuts()
    split = gsc.split(case.fn, case.input_signature, case.cuts)
    W1, W2, W3 = case.variables
    assert [stages_reading(split, v) for v in (W1, W2, W3)] == [[0], [1], [2]]


@pytest.mark.parametrize("name", ["in_while", "while_tanh"], ids=["mark", "graph_name"])
def test_cut_inside_while_body_refused_naming_the_body(name):
    """By its gsc.mark, or by the tensor name TF gives it inside the body."""
    _assert_cut_inside_body_refused(while_between_cuts(), name, name == "while_tanh",
                                    "tf.while_loop")
