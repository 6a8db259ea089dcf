"""``gradsplit_compiler.ir.edit`` and the checks on passes of the caller's own.

Every broken edit a pass can make (a dangling input, a dtype mismatch, a cycle, an unknown
op, a missing or unknown attribute, a wrong input count, a missing output, shapes that
cannot fit...) raises a ``GradSplitError`` naming the pass and the node, before anything is
traced, and leaves TensorFlow's eager context without a new function. The helpers' edits are
checked on real programs against ``tf.GradientTape``."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import gradsplit_compiler as gsc
import passes
from gradsplit_compiler import _tf_internal
from gradsplit_compiler.ir import edit
from passes.manager import UserPassError

SIG = [tf.TensorSpec([None, 3], tf.float64)]


def _program():
    w = tf.Variable(np.random.default_rng(0).normal(size=(3, 2)), name="W")

    def f(x):
        y = gsc.mark(tf.tanh(x @ w), "y")
        return tf.reduce_sum(y * y)

    return gsc.capture(f, SIG), f, w


def _x():
    return tf.constant(np.random.default_rng(1).normal(size=(4, 3)))


def _one(program, op):
    [node] = edit.find_nodes(program, op=op)
    return node


# -- broken edits, each a pass of the caller's own -----------------------------------------------

def dangling_input(program):
    tanh = _one(program, "Tanh")
    program.graph.remove_edge(_one(program, "MatMul"), tanh, 0)
    program.graph.add_edge("nowhere", tanh, key=0, control=False, src_output=0, dst_input=0)
    return program


def dtype_mismatch(program):
    edit.replace_uses(program, _one(program, "MatMul") + ":0",
                      edit.add_constant(program, [[1, 2]], tf.int32, name="ints"))
    return program


def cycle(program):
    matmul = _one(program, "MatMul")
    program.graph.remove_edge(edit.data_input(program, matmul, 0).split(":")[0], matmul, 0)
    program.graph.add_edge(_one(program, "Tanh"), matmul, key=0, control=False, src_output=0,
                           dst_input=0)
    return program


def unknown_op(program):
    tanh = _one(program, "Tanh")
    program.graph.nodes[tanh]["op"] = "Tanhh"
    program.graph.nodes[tanh]["node_def"].op = "Tanhh"
    return program


def missing_attr(program):
    del program.graph.nodes[_one(program, "Tanh")]["node_def"].attr["T"]
    return program


def unknown_attr(program):
    program.graph.nodes[_one(program, "Tanh")]["node_def"].attr["bogus"].i = 1
    return program


def wrong_input_count(program):
    matmul = _one(program, "MatMul")
    program.graph.remove_edge(edit.data_input(program, matmul, 1).split(":")[0], matmul, 1)
    return program


def output_out_of_range(program):
    tanh, matmul = _one(program, "Tanh"), _one(program, "MatMul")
    program.graph.remove_edge(matmul, tanh, 0)
    program.graph.add_edge(matmul, tanh, key=0, control=False, src_output=3, dst_input=0)
    return program


def op_and_node_def_disagree(program):
    program.graph.nodes[_one(program, "Tanh")]["op"] = "Sigmoid"
    return program


def shapes_cannot_fit(program):
    matmul = _one(program, "MatMul")
    square = edit.add_constant(program, np.ones((4, 4)), tf.float64, name="square")
    edit.replace_uses(program, edit.data_input(program, matmul, 1), square)
    return program


def returns_nothing(program):
    program.graph.nodes[_one(program, "Tanh")]["seen"] = True


def builds_an_unknown_op(program):
    edit.add_node(program, "Tanhh", [_one(program, "MatMul") + ":0"])
    return program


def raises(program):
    return {}["no such key"]


def removes_the_output(program):
    program.graph.remove_node(program.output_names[0].split(":")[0])
    return program


def unstage(program):
    program.graph.nodes[_one(program, "Tanh")]["stage"] = None
    return program


BROKEN = [
    ("analysis", dangling_input,
     r"node 'Tanh' reads 'nowhere', which is not a node of the graph \(a dangling input\)"),
    ("analysis", dtype_mismatch,
     r"node 'Tanh' \(Tanh\) input 0 must be float64; it reads ints:0, of dtype int32 \(a "
     r"dtype mismatch\)"),
    ("analysis", cycle, r"the graph has a cycle: .*'matmul'"),
    ("analysis", unknown_op,
     r"node 'Tanh' has op type 'Tanhh', which neither TensorFlow's op registry nor the "
     r"function library holds \(close op types: Tanh"),
    ("analysis", missing_attr, r"node 'Tanh' \(Tanh\) has no attribute 'T', which the op "
     r"requires"),
    ("resolve_cuts", unknown_attr, r"node 'Tanh' \(Tanh\) has an attribute 'bogus' the op does "
     r"not define"),
    ("analysis", wrong_input_count, r"node 'matmul' \(MatMul\) has 1 data inputs; the op takes "
     r"2"),
    ("analysis", output_out_of_range, r"node 'Tanh' reads output 3 of 'matmul', which has 1 "
     r"outputs"),
    ("analysis", op_and_node_def_disagree, r"node 'Tanh' has op 'Sigmoid' and name 'Tanh' in "
     r"the graph but 'Tanh' and 'Tanh' in its NodeDef; keep them equal"),
    ("analysis", shapes_cannot_fit,
     r"node 'matmul' is refused by TensorFlow: Dimensions must be equal"),
    ("analysis", returns_nothing, r"pass returned NoneType, not the Program; a pass returns "
     r"the program"),
    ("analysis", builds_an_unknown_op, r"failed: 'Tanhh' is not an op type TensorFlow "
     r"registers \(tf.raw_ops has no such op\). Close op types: Tanh"),
    ("analysis", raises, r"An error occurred when running the 'raises' pass .*KeyError"),
    ("analysis", removes_the_output, r"tensor 'Identity:0' has no producer in the graph"),
    ("cutting", unstage, r"broke the guarantee of the 'partition' pass .*live node 'Tanh' has "
     r"no stage"),
]


@pytest.mark.parametrize("point, broken, message", BROKEN, ids=[b[1].__name__ for b in BROKEN])
def test_a_broken_edit_is_refused_naming_the_pass_and_the_node(point, broken, message):
    program, _, _ = _program()
    before = _tf_internal.eager_function_names()
    nodes_before = sorted(program.graph.nodes)
    with pytest.raises(gsc.GradSplitError, match=message) as info:
        gsc.split(program, cuts=["y"], passes={point: [broken]})
    assert isinstance(info.value, UserPassError)
    assert f"'{broken.__name__}' pass" in str(info.value)
    added = _tf_internal.eager_function_names() - before
    assert not added, f"a refused pass left functions registered: {added}"
    assert sorted(program.graph.nodes) == nodes_before, "split changed the caller's program"


def test_the_same_checks_hold_for_to_function_and_problems():
    program, _, _ = _program()
    missing_attr(program)
    assert edit.problems(program) == [
        ("Tanh", "(Tanh) has no attribute 'T', which the op requires")]


# -- the helpers -------------------------------------------------------------------------------


def test_insert_after_mark_and_replace_subgraph_keep_value_and_gradient():
    program, f, w = _program()
    x = _x()
    with tf.GradientTape() as tape:
        expected = f(x)
    expected_grad = tape.gradient(expected, w)

    matmul, tanh = _one(program, "MatMul"), _one(program, "Tanh")
    # tanh(a) -> 2 * sigmoid(2a) - 1, a subgraph of four ops in place of one
    a = edit.data_input(program, tanh, 0)
    two = edit.add_constant(program, 2.0, tf.float64, name="two")
    one = edit.add_constant(program, 1.0, tf.float64, name="one")
    doubled = edit.add_node(program, "Mul", [two, a])
    sig = edit.add_node(program, "Sigmoid", [doubled])
    scaled = edit.add_node(program, "Mul", [two, sig])
    new_tanh = edit.add_node(program, "Sub", [scaled, one])
    edit.replace_subgraph(program, [tanh], {f"{tanh}:0": new_tanh})
    assert edit.find_nodes(program, op="Tanh") == []
    # an identity after the matmul, and a mark a cut can name
    edit.insert_after(program, f"{matmul}:0", "Identity", name="after_matmul")
    marked = edit.mark(program, "after_matmul:0", "h")
    assert edit.data_input(program, _one(program, "Sigmoid"), 0) != marked
    assert edit.problems(program) == []

    g = gsc.to_function(program)
    with tf.GradientTape() as tape:
        value = g(x)
    assert abs(float(value - expected)) <= 1e-12
    assert np.max(np.abs(tape.gradient(value, w) - expected_grad)) <= 1e-12
    s = gsc.split(program, cuts=["h", "y"])
    assert s.cut_tensors == {"h": "gsc.mark.h.:0", "y": "gsc.mark.y.:0"}
    assert gsc.verify(s, x).ok


def test_find_nodes_by_type_scope_and_name():
    import keras

    inner = keras.Sequential([keras.Input((3,), dtype="float64"),
                              keras.layers.Dense(2, name="dense_a", dtype="float64")])

    @tf.function
    def f(x):
        with tf.name_scope("block1"):
            h = tf.tanh(x)
        return tf.reduce_sum(inner(h))

    program = gsc.capture(f, SIG)
    assert edit.find_nodes(program, op="Tanh", scope="block1") == ["block1/Tanh"]
    assert edit.find_nodes(program, op="Tanh", scope="block2") == []
    assert all("dense_a" in n for n in edit.find_nodes(program, scope=r"dense_a.*"))
    assert edit.find_nodes(program, op=["MatMul", "Tanh"], name="Tanh$") == ["block1/Tanh"]
    layers = edit.layer_outputs(program, r"dense_.")
    assert list(layers) == ["dense_a"] and len(layers["dense_a"]) == 1


def test_refresh_shapes_infers_again_after_an_edit():
    program, _, _ = _program()
    tanh = _one(program, "Tanh")
    program.graph.nodes[tanh]["outputs"] = [(tf.float64, tf.TensorShape([7, 7]))]
    from passes.refresh_shapes import refresh_shapes

    refresh_shapes(program)  # dtypes known: left as they are
    assert program.tensor_spec(f"{tanh}:0").shape == [7, 7]
    refresh_shapes(program, nodes=True)
    assert program.tensor_spec(f"{tanh}:0").shape.as_list() == [None, 2]


REFUSED = [
    (lambda p: edit.add_node(p, "MatMul", ["x:0"]), r"a MatMul node takes 2 inputs \(a, b\); "
     r"got 1"),
    (lambda p: edit.add_node(p, "Tanh", {"y": "x:0"}), r"a Tanh node has no input named "
     r"\['y'\]; its inputs are \['x'\]"),
    (lambda p: edit.add_node(p, "Tanh", [1.0]), r"inputs of add_node are graph tensor names"),
    (lambda p: edit.add_node(p, "CheckNumerics", ["x:0"]), r"cannot make a CheckNumerics "
     r"node: "),
    (lambda p: edit.add_constant(p, "text", tf.float64), r"cannot make a constant of 'text'"),
    (lambda p: edit.data_input(p, "x", 0), r"node 'x' has 0 data inputs; there is no input 0"),
    (lambda p: edit.insert_after(p, "nope:0", "Identity"), r"'nope' is not a node of the "
     r"program; find nodes with find_nodes"),
    (lambda p: edit.insert_after(p, "x:4", "Identity"), r"node 'x' has 1 outputs; there is no "
     r"tensor 'x:4'"),
    (lambda p: edit.mark(p, "x:0", "y"), r"the program already has a gsc.mark named 'y'"),
    (lambda p: edit.mark(p, "x:0", "a b"), r"mark name 'a b' must be a non-empty string"),
    (lambda p: edit.replace_node(p, _one(p, "Tanh"), [f"{_one(p, 'Tanh')}:0"]),
     r"which is made inside the subgraph being removed"),
    (lambda p: edit.replace_subgraph(p, [_one(p, "MatMul")], {}),
     r"reads matmul:0, an output of the subgraph being replaced, and outputs= gives no "
     r"tensor in its place"),
    (lambda p: edit.layer_outputs(p, "dense"), r"layer_outputs needs a program traced from a "
     r"keras.Model"),
]


@pytest.mark.parametrize("do, message", REFUSED, ids=range(len(REFUSED)))
def test_edit_helpers_refuse_in_the_callers_terms(do, message):
    program, _, _ = _program()
    with pytest.raises(gsc.GradSplitError, match=message):
        do(program)


def test_a_tensor_without_a_dtype_is_refused_as_an_input():
    program, _, _ = _program()
    program.graph.nodes["x"]["outputs"] = [(None, tf.TensorShape(None))]
    with pytest.raises(gsc.GradSplitError, match=r"tensor 'x:0' has no known dtype; run "
                       r"refresh_shapes first"):
        edit.add_node(program, "Tanh", ["x:0"])


def test_pipeline_points_by_pass_name_and_their_refusals():
    names = [p.__name__ for p in passes.pipeline(after={"resolve_cuts": [unstage]})]
    assert names == ["inline_calls", "refresh_shapes", "resolve_cuts", "unstage", "partition"]
    with pytest.raises(gsc.GradSplitError, match=r"names a pass this pipeline does not run"):
        passes.pipeline("analysis", after={"partition": [unstage]})
    with pytest.raises(gsc.GradSplitError, match=r"must map to a list of passes; got one pass"):
        passes.pipeline(after={"analysis": unstage})


def test_the_function_name_probe_sees_what_a_split_registers():
    """The probe of the refusal tests above is not blind: a split that runs registers its
    stages' functions in the eager context."""
    program, _, _ = _program()
    before = _tf_internal.eager_function_names()
    gsc.split(program, cuts=["y"]).value_and_gradients(_x(), jit_compile=False)
    assert _tf_internal.eager_function_names() - before
