"""Every failure caused by what the caller passed raises ``gsc.GradSplitError`` (a
``ValueError``) whose message uses the caller's own names, and leaves every variable as it was.

The program is ``counted_mlp``: its ``fn`` moves a counter (``steps.assign_add(1)``), so a
failure that ran part of the program would show in the variables.
"""

import numpy as np
import pytest
import tensorflow as tf
from models import counted_mlp, mlp, snapshot, tensor

import gradsplit_compiler as gsc


@pytest.fixture
def case():
    return counted_mlp()


@pytest.fixture
def split(case):
    return gsc.split(case.fn, case.input_signature, case.cuts)


def _raises(case, action):
    """Run ``action``; return its GradSplitError's message, checking no variable changed."""
    before = snapshot(case.variables)
    with pytest.raises(gsc.GradSplitError) as info:
        action()
    after = snapshot(case.variables)
    for var, b, a in zip(case.variables, before, after):
        np.testing.assert_array_equal(a, b, err_msg=f"{var.name} changed")
    return str(info.value)


def _split_with(case, cuts, fn=None, signature=None):
    return lambda: gsc.split(fn or case.fn, signature or case.input_signature, cuts)


def _with_extra_tensors(extra):
    """A program like ``counted_mlp`` plus ``extra(x, h1, names)`` feeding the loss."""
    case = counted_mlp()
    W1, W2, steps = case.variables
    names = {}

    @tf.function
    def loss(x, target):
        steps.assign_add(tf.ones([], tf.float64))
        h1 = gsc.mark(tf.tanh(tf.matmul(x, W1)), "h1")
        out = extra(x, h1, names)
        return tf.reduce_mean(tf.square(tf.matmul(out, W2) - target))

    case.fn, case.names = loss, names
    case.concrete()
    return case


def test_grad_split_error_is_a_value_error():
    assert issubclass(gsc.GradSplitError, ValueError)


# -- names -------------------------------------------------------------------------------------


def test_unknown_name_is_refused_with_close_names(case):
    message = _raises(case, _split_with(case, ["h11"]))
    assert "'h11'" in message
    assert "'h1'" in message  # the close gsc.mark name is offered


def test_unknown_graph_tensor_name_offers_close_graph_names(case):
    message = _raises(case, _split_with(case, ["Tahn"]))
    assert "'Tahn'" in message
    assert "Tanh" in message


def test_unknown_name_offers_at_most_five_close_names(case):
    message = _raises(case, _split_with(case, ["Mat"]))
    assert "'Mat'" in message
    offered = message.split("Close names in the graph:")[-1] if "Close names" in message else ""
    assert offered.count("'") <= 10


def test_unknown_name_in_a_cut_of_several_tensors_is_refused(case):
    message = _raises(case, _split_with(case, [["h1", "nowhere"]]))
    assert "'nowhere'" in message


def test_ambiguous_mark_name_is_refused_listing_candidates():
    def extra(x, h1, names):
        a = gsc.mark(tf.sin(h1), "twice")
        b = gsc.mark(tf.cos(h1), "twice")
        names["a"], names["b"] = a.name, b.name
        return a + b

    case = _with_extra_tensors(extra)
    message = _raises(case, _split_with(case, ["twice"]))
    assert "'twice'" in message
    assert case.names["a"] in message and case.names["b"] in message


# -- dtypes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["int32", "bool"])
def test_cut_of_non_float_tensor_is_refused_naming_it_and_its_dtype(kind):
    def extra(x, h1, names):
        if kind == "int32":
            t = tf.shape(h1, name="batch_shape")
        else:
            t = tf.greater(h1, 0.0, name="positive")
        names["t"] = t.name
        return h1 * tf.cast(tf.reduce_sum(tf.cast(t, tf.int32)) > 0, h1.dtype)

    case = _with_extra_tensors(extra)
    name = case.names["t"]
    message = _raises(case, _split_with(case, [name]))
    assert repr(name) in message
    assert kind in message


def test_cut_of_resource_tensor_is_refused_naming_it(case):
    graph = case.concrete().graph
    handle = next(t for _, t in graph.captures if t.dtype == tf.resource)
    message = _raises(case, _split_with(case, [handle.name]))
    assert repr(handle.name) in message
    assert "resource" in message


# -- order and repetition ----------------------------------------------------------------------


def test_cuts_out_of_data_flow_order_are_refused_naming_both():
    case = mlp()
    message = _raises(case, _split_with(case, ["h2", "h1"]))
    assert "'h1'" in message and "'h2'" in message
    assert "order" in message


def test_repeated_cut_is_refused(case):
    message = _raises(case, _split_with(case, ["h1", "h1"]))
    assert "'h1'" in message


def test_same_tensor_named_twice_in_one_cut_is_refused(case):
    message = _raises(case, _split_with(case, [["h1", "h1"]]))
    assert "'h1'" in message


def test_same_tensor_by_two_names_is_refused(case):
    """``h1`` by its gsc.mark name and by its graph tensor name is still one tensor."""
    case.concrete()
    graph_name = case.names["h1"]
    message = _raises(case, _split_with(case, ["h1", graph_name]))
    assert repr(graph_name) in message


def test_cut_leaving_a_stage_empty_is_refused():
    def extra(x, h1, names):
        return gsc.mark(h1, "h1_again")  # nothing is computed between h1 and h1_again

    case = _with_extra_tensors(extra)
    message = _raises(case, _split_with(case, ["h1", "h1_again"]))
    assert "'h1_again'" in message
    assert "empty" in message


def test_cut_at_an_argument_is_refused(case):
    """Cutting at an input leaves nothing for the stage before it to compute."""
    message = _raises(case, _split_with(case, ["x"]))
    assert "'x'" in message or "x:0" in message


# -- control flow bodies -----------------------------------------------------------------------


@pytest.mark.parametrize("loop", ["cond", "while"])
def test_cut_inside_control_flow_body_is_refused(loop):
    def extra(x, h1, names):
        if loop == "cond":
            return tf.cond(tf.reduce_sum(h1) > -1e9,
                           lambda: gsc.mark(tf.sin(h1), "inside"), lambda: tf.cos(h1))
        return tf.while_loop(lambda i, h: i < 2,
                             lambda i, h: (i + 1, gsc.mark(tf.sin(h), "inside")),
                             [0, h1], maximum_iterations=2)[1]

    case = _with_extra_tensors(extra)
    message = _raises(case, _split_with(case, ["inside"]))
    assert "'inside'" in message
    assert "body" in message


# -- arguments and fn --------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ["value_and_gradients", "vjp"])
@pytest.mark.parametrize("wrong", ["count", "dtype", "shape"])
def test_arguments_not_matching_input_signature_are_refused(case, split, entry, wrong):
    x, target = case.args(0)
    rng = np.random.default_rng(9)
    if wrong == "count":
        args = [x]
    elif wrong == "dtype":
        args = [tf.cast(x, tf.float32), target]
    else:
        args = [tensor(rng, (5, 7), tf.float64), target]

    def call():
        if entry == "value_and_gradients":
            split.value_and_gradients(*args)
        else:
            split.vjp(args, tf.constant(1.0, tf.float64))

    message = _raises(case, call)
    if wrong == "count":
        assert "2" in message and "1" in message
    elif wrong == "dtype":
        assert "float32" in message and "float64" in message
        assert "'x'" in message
    else:
        assert "'x'" in message
        assert "7" in message


def test_fn_that_cannot_be_traced_is_refused_with_the_reason(case):
    W1 = case.variables[0]

    def broken(x, target):
        if x.shape.rank != 3:
            raise ValueError("broken expects rank-3 inputs")
        return tf.reduce_sum(tf.matmul(x, W1))

    message = _raises(case, _split_with(case, ["h1"], fn=broken))
    assert "broken expects rank-3 inputs" in message


def test_fn_traced_with_wrong_shapes_is_refused_naming_the_signature(case):
    signature = [tf.TensorSpec([None, 7], tf.float64), tf.TensorSpec([None, 3], tf.float64)]
    message = _raises(case, _split_with(case, ["h1"], signature=signature))
    assert "7" in message


def test_value_and_gradients_on_non_scalar_fn_is_refused(case):
    W1, _, steps = case.variables

    @tf.function
    def features(x, target):
        steps.assign_add(tf.ones([], tf.float64))
        return gsc.mark(tf.tanh(tf.matmul(x, W1)), "h1") * 2.0 - target[:, :1]

    split = gsc.split(features, case.input_signature, ["h1"])
    message = _raises(case, lambda: split.value_and_gradients(*case.args(0)))
    assert "scalar" in message
    assert "vjp" in message


def test_vjp_with_wrong_number_of_output_cotangents_is_refused(case, split):
    one = tf.constant(1.0, tf.float64)
    message = _raises(case, lambda: split.vjp(case.args(0), [one, one]))
    assert "2" in message and "1" in message


def test_input_signature_not_a_list_of_tensor_specs_is_refused(case):
    message = _raises(case, _split_with(case, ["h1"], signature=[(None, 6), (None, 3)]))
    assert "TensorSpec" in message


def test_split_after_a_failure_still_works(case):
    """A refused split leaves nothing behind: the same fn splits fine afterwards."""
    _raises(case, _split_with(case, ["h11"]))
    split = gsc.split(case.fn, case.input_signature, ["h1"])
    assert len(split.stages) == 2


@pytest.mark.parametrize("enabled", [True, False])
def test_split_leaves_the_garbage_collector_as_it_found_it(case, enabled):
    """split pauses Python's cyclic collector while it builds, also when it fails."""
    import gc

    was = gc.isenabled()
    (gc.enable if enabled else gc.disable)()
    try:
        gsc.split(case.fn, case.input_signature, case.cuts)
        assert gc.isenabled() is enabled
        _raises(case, _split_with(case, ["no_such_tensor"]))
        assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()


def test_close_names_find_short_neighbours():
    """An unknown Keras layer 'd3' beside layers 'd1' and 'd2' gets them as close names."""
    from gradsplit_compiler.errors import close_names

    assert set(close_names("d3", ["d1", "d2", "dense/MatMul", "x"])) == {"d1", "d2"}
    assert close_names("Tanh", ["dense/Tanh", "x"]) == ["dense/Tanh"]
    assert close_names("zzz", ["d1", "d2"]) == []
