"""The pass manager and each pass's stated guarantee, on real traced graphs."""

import numpy as np
import pytest
import tensorflow as tf

import gradsplit_compiler as gsc
from gradsplit_compiler.frontend.capture import capture
from passes.inline_calls import CALL_OPS, inline_calls
from passes.manager import PassError, check_program, run_passes
from passes.partition import partition
from passes.refresh_shapes import refresh_shapes
from passes.resolve_cuts import resolve_cuts


def _program(cuts=("y",)):
    w = tf.Variable(np.random.default_rng(0).normal(size=(3, 3)))
    inner = tf.function(lambda h: gsc.mark(tf.sin(h @ w), "y"))

    @tf.function
    def f(x):
        return tf.reduce_sum(tf.tanh(inner(x)) * x)

    program = capture(f, [tf.TensorSpec([None, 3], tf.float64)])
    program.cut_specs = list(cuts)
    return program


def test_inline_calls_leaves_no_call_ops_and_keeps_the_graph_valid():
    program = run_passes(_program(), [inline_calls, refresh_shapes])
    ops = {program.graph.nodes[n]["op"] for n in program.graph}
    assert not ops & set(CALL_OPS)
    assert check_program(program) == []
    assert all(program.graph.nodes[n]["outputs"] is not None for n in program.graph)


def test_a_mark_inside_a_nested_function_resolves_after_inlining():
    program = run_passes(_program(), [inline_calls, refresh_shapes, resolve_cuts])
    (cut,) = program.cuts
    assert len(cut) == 1 and "gsc.mark.y." in cut[0]


def test_partition_puts_every_live_op_in_a_stage_and_data_flows_forward():
    program = run_passes(_program(), [inline_calls, refresh_shapes, resolve_cuts, partition])
    g = program.graph
    stages = {n: g.nodes[n]["stage"] for n in g}
    assert set(s for s in stages.values() if s is not None) == {0, 1}
    for u, v, a in g.edges(data=True):
        if not a["control"] and stages[u] is not None and stages[v] is not None:
            assert stages[u] <= stages[v] or g.nodes[u].get("replicated")
    # the argument crosses the cut (the last stage multiplies by x again)
    assert "x:0" in program.boundaries[0]


def test_a_pass_that_breaks_the_graph_is_named_with_the_passes_before_it():
    def break_graph(program):
        g = program.graph
        node = next(n for n in g if g.nodes[n]["op"] == "Tanh")
        g.add_edge(node, node, key=0, control=False, src_output=0, dst_input=1)
        return program

    with pytest.raises(PassError, match=r"'break_graph' pass \(after \['inline_calls'\]\)"):
        run_passes(_program(), [inline_calls, break_graph])


def test_a_pass_that_raises_is_reported_by_name():
    def explode(program):
        raise KeyError("boom")

    with pytest.raises(PassError, match=r"running the 'explode' pass after the following "
                                          r"passes: \['inline_calls'\]"):
        run_passes(_program(), [inline_calls, explode])
