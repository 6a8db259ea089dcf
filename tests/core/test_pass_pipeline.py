"""The pass pipeline declared in ``passes/__init__.py``: phases in order, each ordering
constraint met, and each pass's guarantee checked by the pass manager, on real traced graphs:
a pass that breaks a guarantee is caught by the check of the pass whose guarantee it was, and
the error names the pass at fault and the op."""

import models
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import node_def_pb2

import gradsplit_compiler as gsc
import passes
from gradsplit_compiler import ir
from gradsplit_compiler.errors import GradSplitError
from gradsplit_compiler.frontend.capture import capture
from passes import inline_calls as inline_module
from passes import partition as partition_module
from passes import refresh_shapes as refresh_module
from passes import resolve_cuts as resolve_module
from passes.inline_calls import CALL_OPS, inline_calls
from passes.manager import PassError, pass_name, run_passes
from passes.partition import partition
from passes.refresh_shapes import refresh_shapes
from passes.resolve_cuts import resolve_cuts


def _names(pipeline):
    return [pass_name(p) for p in pipeline]


def _nested():
    """A real program: ``f`` calls ``inner``, which calls ``innermost``; a constant is used on
    both sides of the cut ``y`` (so partition copies it into both stages)."""
    w = tf.Variable(np.random.default_rng(0).normal(size=(3, 3)))
    innermost = tf.function(lambda h: tf.sin(h @ w))
    inner = tf.function(lambda h: gsc.mark(tf.tanh(innermost(h)), "y"))

    @tf.function
    def f(x):
        c = tf.constant(2.0, tf.float64, name="two")
        return tf.reduce_sum(inner(x * c) * c)

    return capture(f, [tf.TensorSpec([None, 3], tf.float64)])


# -- the declaration ---------------------------------------------------------------------------


def test_the_phases_are_declared_in_order_and_the_pipeline_is_their_concatenation():
    assert [p.name for p in passes.PHASES] == ["analysis", "cutting"]
    assert _names(passes.pipeline("analysis")) == ["inline_calls", "refresh_shapes"]
    assert _names(passes.pipeline("cutting")) == ["resolve_cuts", "partition"]
    assert passes.pipeline() == [p for phase in passes.PHASES for p in phase.passes]
    # asked for out of order, the phases still come in the declared order
    assert passes.pipeline("cutting", "analysis") == passes.pipeline()
    assert all(phase.purpose for phase in passes.PHASES)


@pytest.mark.parametrize("constraint", passes.ORDER, ids=lambda c: f"{c.before}<{c.after}")
def test_each_ordering_constraint_holds_in_the_pipeline_and_says_why(constraint):
    names = _names(passes.pipeline())
    assert names.index(constraint.before) < names.index(constraint.after)
    assert len(constraint.reason) > 20


def test_every_pass_carries_the_check_of_its_module_as_ensures():
    modules = [inline_module, refresh_module, resolve_module, partition_module]
    assert [p.ensures for p in passes.pipeline()] == [m.check for m in modules]
    for module in modules:
        assert "Guarantees afterwards" in module.__doc__


def test_a_pipeline_out_of_order_is_refused_with_the_reason_before_tracing():
    wrong = [inline_calls, resolve_cuts, refresh_shapes, partition]
    with pytest.raises(GradSplitError, match=r"'refresh_shapes' must run before 'resolve_cuts': "
                                             r"resolve_cuts refuses"):
        passes.check_order(wrong)
    traced = []

    @tf.function
    def f(x):
        traced.append(1)
        return tf.reduce_sum(x)

    with pytest.raises(GradSplitError, match="must run before"):
        gsc.split(f, [tf.TensorSpec([None])], ["x"], passes=wrong)
    assert traced == []


def test_an_unknown_phase_is_refused_with_the_phase_names():
    with pytest.raises(GradSplitError, match=r"'analyse' is not a phase of the pass pipeline; "
                                             r"the phases are 'analysis', 'cutting'"):
        passes.pipeline("analyse")
    with pytest.raises(GradSplitError, match="names a phase this pipeline does not run"):
        passes.pipeline("analysis", after={"cutting": [inline_calls]})


def test_user_passes_run_right_after_the_phase_they_name():
    def mine(program):
        return program

    assert _names(passes.pipeline(after={"analysis": [mine]})) == [
        "inline_calls", "refresh_shapes", "mine", "resolve_cuts", "partition"]
    assert _names(passes.pipeline(after={"cutting": [mine]}))[-1] == "mine"


def test_the_analysis_phase_reads_no_cut_and_the_phases_run_apart_as_split_runs_them():
    program = _nested()
    program.cut_specs = [object()]  # not even a name: analysis must not look
    program = passes.run(program, "analysis")
    ops = {program.graph.nodes[n]["op"] for n in program.graph}
    assert not ops & set(CALL_OPS)
    program.cut_specs = ["y"]
    program = passes.run(program, "cutting")
    whole = _nested()
    whole.cut_specs = ["y"]
    whole = run_passes(whole, passes.pipeline())
    assert program.boundaries == whole.boundaries
    assert [s.nodes for s in program.stages] == [s.nodes for s in whole.stages]


@pytest.mark.parametrize("make", [models.mlp, models.nested_functions, models.cond_between_cuts,
                                  models.while_between_cuts, models.keras_small_functional],
                         ids=lambda m: m.__name__)
def test_every_guarantee_holds_after_the_whole_pipeline(make):
    case = make()
    program = capture(case.fn, case.input_signature)
    program.cut_specs = list(case.cuts)
    program = run_passes(program, passes.pipeline())
    for p in passes.pipeline():
        assert p.ensures(program) == [], pass_name(p)


def _edges(program):
    return sorted((u, v, k, tuple(sorted(a.items())))
                  for u, v, k, a in program.graph.edges(keys=True, data=True))


@pytest.mark.parametrize("make", [models.mlp, models.nested_functions, models.cond_between_cuts,
                                  models.while_between_cuts, models.keras_small_functional],
                         ids=lambda m: m.__name__)
def test_the_passes_that_declare_preserves_edges_keep_every_node_and_edge(make):
    """The pass manager skips the structural check (cycles, input numbering) after a pass of
    ``passes/`` that declares ``preserves_edges``; the declaration must be true."""
    case = make()
    program = capture(case.fn, case.input_signature)
    program.cut_specs = list(case.cuts)
    declared = [p for p in passes.pipeline() if getattr(p, "preserves_edges", False)]
    assert _names(declared) == ["refresh_shapes", "resolve_cuts", "partition"]
    for p in passes.pipeline():
        nodes, edges = list(program.graph.nodes), _edges(program)
        program = p(program)
        if p in declared:
            assert list(program.graph.nodes) == nodes, pass_name(p)
            assert _edges(program) == edges, pass_name(p)


def test_a_user_pass_that_declares_preserves_edges_is_still_checked_for_cycles():
    def add_cycle(program):
        g = program.graph
        tanh = next(n for n in g if g.nodes[n]["op"] == "Tanh")
        sin = next(n for n in g if g.nodes[n]["op"] == "Sin")
        ir.add_control_edge(g, tanh, sin)  # Sin feeds Tanh already
        return program

    add_cycle.preserves_edges = True  # not true, and not taken from a caller's pass
    program = _nested()
    program.cut_specs = ["y"]
    with pytest.raises(PassError, match=r"The graph is invalid after the 'add_cycle' pass "
                                        r".*the graph has a cycle"):
        run_passes(program, passes.pipeline(after={"analysis": [add_cycle]}))


# -- broken passes, caught by the check of the right pass --------------------------------------


def test_an_inline_that_stops_after_one_level_is_caught_by_its_own_check():
    def inline_once(program):
        # inline_calls without its "until none remain" loop: the nested calls stay
        g = program.graph
        functions = {f.signature.name: f for f in g.graph["library"].function}
        for call in [n for n in g if g.nodes[n]["op"] in CALL_OPS]:
            fname = g.nodes[call]["node_def"].attr["f"].func.name
            inline_module._inline_one(g, call, functions[fname])
        return program

    inline_once.ensures = inline_module.check
    with pytest.raises(PassError, match=r"The 'inline_once' pass did not meet its guarantee "
                                        r"\(after \[\]\): node '[^']*' is a "
                                        r"(Stateful)?PartitionedCall op"):
        run_passes(_nested(), [inline_once])


def test_a_user_pass_that_adds_an_op_without_dtypes_breaks_the_refresh_shapes_guarantee():
    def add_identity(program):
        g = program.graph
        source = next(n for n in g if g.nodes[n]["op"] == "Sin")
        nd = node_def_pb2.NodeDef(name="extra_identity", op="Identity")
        nd.attr["T"].type = tf.float64.as_datatype_enum
        # as inline_calls stores a body op whose dtypes the body does not record
        g.add_node(nd.name, node_def=nd, op="Identity", outputs=[(None, tf.TensorShape(None))])
        ir.add_data_edge(g, source, 0, nd.name, 0)
        return program

    program = _nested()
    program.cut_specs = ["y"]
    with pytest.raises(PassError, match=r"The 'add_identity' pass broke the guarantee of the "
                                        r"'refresh_shapes' pass \(after \['inline_calls', "
                                        r"'refresh_shapes'\]\): output 0 of node "
                                        r"'extra_identity' has no known dtype"):
        run_passes(program, passes.pipeline(after={"analysis": [add_identity]}))
    # Calling refresh_shapes before it returns, as the pipeline's docstring says, keeps it.
    def add_identity_with_dtypes(program):
        return refresh_shapes(add_identity(program))

    program = _nested()
    program.cut_specs = ["y"]
    program = run_passes(program, passes.pipeline(after={"analysis": [add_identity_with_dtypes]}))
    assert program.graph.nodes["extra_identity"]["outputs"][0][0] == tf.float64
    assert program.graph.nodes["extra_identity"]["stage"] is None  # dead


def test_a_user_pass_that_swaps_a_cut_for_an_integer_tensor_breaks_resolve_cuts():
    def shape_cut(program):
        g = program.graph
        node = next(n for n in g if g.nodes[n]["op"] == "Shape")
        program.cuts = [[ir.tensor_name(node, 0)]]
        return program

    @tf.function
    def f(x):
        return tf.reduce_sum(gsc.mark(tf.tanh(x), "y") * tf.cast(tf.shape(x)[0], tf.float32))

    with pytest.raises(PassError, match=r"The 'shape_cut' pass broke the guarantee of the "
                                        r"'resolve_cuts' pass .*cut 0 names '[^']*Shape[^']*:0' "
                                        r"of dtype int32"):
        gsc.split(f, [tf.TensorSpec([None])], ["y"],
                  passes=[inline_calls, refresh_shapes, resolve_cuts, shape_cut, partition])


def test_a_user_pass_that_leaves_a_live_op_without_a_stage_breaks_the_partition_guarantee():
    def unstage_sin(program):
        g = program.graph
        node = next(n for n in g if g.nodes[n]["op"] == "Sin")
        g.nodes[node]["stage"] = None
        return program

    program = _nested()
    program.cut_specs = ["y"]
    with pytest.raises(PassError, match=r"The 'unstage_sin' pass broke the guarantee of the "
                                        r"'partition' pass \(after \[.*'partition'\]\): "
                                        r"live node '[^']*Sin[^']*' has no stage"):
        run_passes(program, passes.pipeline(after={"cutting": [unstage_sin]}))


def test_a_partition_that_forgets_to_copy_a_constant_is_caught_by_its_own_check():
    def partition_without_copies(program):
        program = partition(program)
        g = program.graph
        copied = [n for n in g if g.nodes[n].get("replicated")]
        assert "two" in copied  # the constant is used on both sides of the cut
        for node in copied:
            g.nodes[node]["stages"] = [g.nodes[node]["stage"]]
        return program

    partition_without_copies.ensures = partition_module.check
    program = _nested()
    program.cut_specs = ["y"]
    with pytest.raises(PassError, match=r"The 'partition_without_copies' pass did not meet its "
                                        r"guarantee .*reads the copied node 'two', which has no "
                                        r"copy in stage 1"):
        run_passes(program, [inline_calls, refresh_shapes, resolve_cuts,
                             partition_without_copies])


def test_a_program_changed_between_phases_is_caught_before_the_next_phase_runs():
    program = passes.run(_nested(), "analysis")
    g = program.graph
    node = next(n for n in g if g.nodes[n]["op"] == "Tanh")
    g.nodes[node]["outputs"] = [(None, tf.TensorShape(None))]
    program.cut_specs = ["y"]
    with pytest.raises(PassError, match=r"does not meet the guarantee of the 'refresh_shapes' "
                                        r"pass, which ran before these passes: output 0 of node "
                                        r"'[^']*Tanh[^']*' has no known dtype"):
        passes.run(program, "cutting")
