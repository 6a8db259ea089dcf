"""Refusals of ``split``, ``Split``, ``Stage`` and ``verify``: each test checks the error type
(``GradSplitError``) and quotes the words that tell the user what to do.

``tests/test_refusals_covered.py`` finds every ``GradSplitError`` the package raises and
fails when no test quotes it; many of those quotes are here.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from models import cond_between_cuts, counted_mlp, mlp, snapshot

import gradsplit_compiler as gsc
from gradsplit_compiler import GradSplitError

F64 = tf.float64


@pytest.fixture(scope="module")
def counted():
    case = counted_mlp()
    return case, gsc.split(case.fn, case.input_signature, case.cuts)


def _unchanged(case, action, match):
    """``action`` raises a GradSplitError matching ``match`` and no variable moves."""
    before = snapshot(case.variables)
    with pytest.raises(GradSplitError, match=match) as info:
        action()
    for var, b, a in zip(case.variables, before, snapshot(case.variables)):
        np.testing.assert_array_equal(a, b, err_msg=f"{var.name} changed")
    return str(info.value)


# -- arguments ------------------------------------------------------------------------------


def test_wrong_number_of_arguments_names_them(counted):
    case, split = counted
    x, _ = case.args()
    message = _unchanged(case, lambda: split.value_and_gradients(x),
                         r"fn takes 2 arguments \('x', 'target'\) as in its input_signature; "
                         r"got 1\.")
    assert message.startswith("fn takes 2 arguments")


def test_wrong_dtype_says_how_to_cast(counted):
    case, split = counted
    x, t = case.args()
    _unchanged(case, lambda: split.value_and_gradients(tf.cast(x, tf.float32), t),
               r"argument 'x' has dtype float32, but input_signature says float64; "
               r"cast it with tf\.cast\(\.\.\., tf\.float64\)")


def test_wrong_shape_names_the_signature(counted):
    case, split = counted
    _, t = case.args()
    _unchanged(case, lambda: split.value_and_gradients(tf.ones([5, 7], F64), t),
               r"argument 'x' has shape \(5, 7\), but input_signature says \(None, 6\)")


def test_an_argument_that_cannot_be_a_tensor(counted):
    case, split = counted
    _, t = case.args()
    _unchanged(case, lambda: split.value_and_gradients([[1.0], [1.0, 2.0]], t),
               r"argument 'x' cannot be a tensor: ")


def test_arguments_of_another_structure():
    W = tf.Variable(np.ones((3, 2)))

    @tf.function
    def loss(pair):
        h = gsc.mark(tf.tanh(pair["a"] @ W), "h")
        return tf.reduce_sum(h * pair["b"])

    signature = [{"a": tf.TensorSpec([None, 3], F64), "b": tf.TensorSpec([None, 2], F64)}]
    split = gsc.split(loss, signature, ["h"])
    with pytest.raises(GradSplitError, match="arguments do not have the structure of "
                                             "input_signature: "):
        split.value_and_gradients((tf.ones([2, 3], F64), tf.ones([2, 2], F64)))


@pytest.mark.parametrize("jit_compile", [True, False], ids=["xla", "graph"])
def test_batched_arguments_of_different_batch_sizes_are_named(counted, jit_compile):
    # TensorFlow's own error names an internal node of the composed program
    # (stage1.backward/gsc.vjp/sub_grad/BroadcastGradientArgs); the caller's error is
    # that x and target disagree on the batch size
    case, split = counted
    x, t = case.args()
    message = _unchanged(
        case, lambda: split.value_and_gradients(x, t[:4], jit_compile=jit_compile),
        r"the batched arguments 'x' \(batch 5\), 'target' \(batch 4\) have different batch "
        r"sizes \(a None leading dimension in input_signature\)")
    assert "Give every batched argument the same batch size." in message
    assert "Incompatible shapes" in message  # what TensorFlow said, in one line
    assert "stage1.backward" not in message and "{{node" not in message


def test_different_batch_sizes_in_vjp_and_run_stages_are_named(counted):
    case, split = counted
    x, t = case.args()
    for action in (lambda: split.vjp([x, t[:4]], tf.ones([], F64), jit_compile=False),
                   lambda: split.run_stages([x, t[:4]], jit_compile=False)):
        _unchanged(case, action, r"have different batch sizes \(a None leading dimension")


def test_arguments_that_fit_together_are_not_misreported():
    # a program whose batched arguments legitimately differ in size runs as before
    W = tf.Variable(np.ones((3, 2)))

    @tf.function
    def loss(x, prototypes):
        h = gsc.mark(tf.tanh(x @ W), "h")
        return tf.reduce_sum(h) * tf.reduce_sum(prototypes)

    spec = tf.TensorSpec([None, 3], F64)
    split = gsc.split(loss, [spec, spec], ["h"])
    value, _ = split.value_and_gradients(tf.ones([2, 3], F64), tf.ones([5, 3], F64))
    assert np.isfinite(float(value))


# -- output cotangents -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def vector():
    W = tf.Variable(np.linspace(0.1, 0.9, 9).reshape(3, 3))

    @tf.function
    def f(x):
        return tf.tanh(gsc.mark(x @ W, "h"))

    return gsc.split(f, [tf.TensorSpec([None, 3], F64)], ["h"])


def test_cotangent_count_says_one_per_output(vector):
    with pytest.raises(GradSplitError, match=r"output_cotangents has 2 tensors; fn has 1 "
                                             r"outputs .* Give one cotangent per output \(None "
                                             r"for an output nobody differentiates\)\."):
        vector.vjp([tf.ones([2, 3], F64)], [tf.ones([2, 3], F64)] * 2)


def test_cotangent_of_a_wrong_static_shape(vector):
    with pytest.raises(GradSplitError, match=r"the output cotangent for .* must have shape "
                                             r"\(None, 3\); got \(2, 4\)\."):
        vector.vjp([tf.ones([2, 3], F64)], tf.ones([2, 4], F64))


def test_cotangent_that_is_no_tensor(vector):
    with pytest.raises(GradSplitError, match=r"the output cotangent for .* must be a float64 "
                                             r"tensor of shape \(None, 3\); got 'one'"):
        vector.vjp([tf.ones([2, 3], F64)], "one")


def test_cotangents_that_cannot_be_flattened(vector):
    with pytest.raises(GradSplitError, match="output_cotangents cannot be flattened: "):
        vector.vjp([tf.ones([2, 3], F64)], {1: tf.ones([2, 3], F64), "b": None})


@pytest.mark.parametrize("jit_compile", [True, False], ids=["xla", "graph"])
def test_cotangent_of_another_batch_is_refused_in_the_callers_terms(vector, jit_compile):
    # (None, 3) accepts (4, 3); for arguments of batch 2 the output is (2, 3). TensorFlow's
    # error named stage1.backward/gsc.vjp/Tanh_grad/TanhGrad.
    with pytest.raises(GradSplitError, match=r"must have the shape of that output for these "
                                             r"arguments, \(2, 3\); got \(4, 3\)\. Give each "
                                             r"output's cotangent its output's shape") as info:
        vector.vjp([tf.ones([2, 3], F64)], tf.ones([4, 3], F64), jit_compile=jit_compile)
    assert "TanhGrad" not in str(info.value)
    # and the right cotangent still works afterwards
    vector.vjp([tf.ones([2, 3], F64)], tf.ones([2, 3], F64), jit_compile=jit_compile)


def test_value_and_gradients_of_a_non_scalar_says_reduce_or_vjp(vector):
    with pytest.raises(GradSplitError, match=r"value_and_gradients needs fn to return a single "
                                             r"scalar; .* Reduce the output \(e\.g\. "
                                             r"tf\.reduce_mean\) or use split\.vjp\(args, "
                                             r"output_cotangents\)\."):
        vector.value_and_gradients(tf.ones([2, 3], F64))


# -- cuts -------------------------------------------------------------------------------------


def test_cuts_not_a_list(counted):
    case, _ = counted
    with pytest.raises(GradSplitError, match=r"cuts must be a list with one entry per cut, "
                                             r"e\.g\. \['y'\] or \[\['a', 'b'\]\]; got 'h1'"):
        gsc.split(case.fn, case.input_signature, "h1")




@pytest.mark.parametrize("cut, match", [
    (3, r"cut 0 is 3, a int; name a cut with a string \('op:index', a gsc\.mark name or a Keras "
        r"layer name\) or a list of strings\."),
    ([], r"cut 0 is an empty list; name at least one tensor\."),
    (["h1", 3], r"cut 0 entry 3 is a int; name tensors with strings \('op:index', a gsc\.mark "
                r"name or a Keras layer name\)\."),
])
def test_a_cut_that_names_nothing(counted, cut, match):
    case, _ = counted
    with pytest.raises(GradSplitError, match=match):
        gsc.split(case.fn, case.input_signature, [cut])


def test_a_tensor_cut_twice_says_remove_the_repeat(counted):
    case, _ = counted
    with pytest.raises(GradSplitError, match=r"cut 1 names 'h1' .*, which cut 0 already names; "
                                             r"each tensor may be cut once\. Remove the repeated "
                                             r"entry\."):
        gsc.split(case.fn, case.input_signature, ["h1", "h1"])


def test_cuts_out_of_order_say_which_first():
    case = mlp(depth=3)
    with pytest.raises(GradSplitError, match=r"cut 0 \('h2'\) is computed from cut 1 "
                                             r"\('h1'\): cuts must be listed in data-flow order\. "
                                             r"Put 'h1' before 'h2'\."):
        gsc.split(case.fn, case.input_signature, ["h2", "h1"])


def test_a_stage_left_empty_says_remove_or_move_a_cut():
    W = tf.Variable(np.ones((3, 3)))

    @tf.function
    def loss(x):
        h = gsc.mark(tf.tanh(x @ W), "h")
        again = gsc.mark(h, "again")
        return tf.reduce_sum(again * again)

    with pytest.raises(GradSplitError, match=r"stage 1 would be empty: .* Remove a cut or move "
                                             r"it so every stage does some work\."):
        gsc.split(loss, [tf.TensorSpec([None, 3], F64)], ["h", "again"])


def test_an_ambiguous_mark_name_says_name_the_tensor():
    W = tf.Variable(np.ones((3, 3)))

    @tf.function
    def loss(x):
        a = gsc.mark(tf.tanh(x @ W), "twice")
        b = gsc.mark(tf.sin(a @ W), "twice")
        return tf.reduce_sum(b)

    with pytest.raises(GradSplitError, match=r"cut name 'twice' could mean more than one "
                                             r"tensor: .* Name the tensor itself \('op:index'\), "
                                             r"or give each gsc\.mark a name of its own\."):
        gsc.split(loss, [tf.TensorSpec([None, 3], F64)], ["twice"])


def test_a_cut_inside_a_body_says_cut_at_its_input_or_output():
    case = cond_between_cuts()
    with pytest.raises(GradSplitError, match=r"a cut may sit between control-flow ops, never "
                                             r"inside a body\. Cut at an input or an output of"):
        gsc.split(case.fn, case.input_signature, ["in_cond"])


def test_an_integer_cut_says_cut_at_a_float():
    W = tf.Variable(np.ones((3, 3)))

    @tf.function
    def loss(x):
        n = gsc.mark(tf.shape(x)[0], "n")
        return tf.reduce_sum(tf.tanh(x @ W)) / tf.cast(n, F64)

    with pytest.raises(GradSplitError, match=r"a cut must carry a floating-point tensor so a "
                                             r"cotangent can flow back through it\. Cut at a "
                                             r"float tensor"):
        gsc.split(loss, [tf.TensorSpec([None, 3], F64)], ["n"])


def test_a_mark_name_must_be_letters_digits():
    with pytest.raises(GradSplitError, match=r"gsc\.mark name 'h 1' must be a non-empty string "
                                             r"of letters, digits, '_', '\.' and '-', e\.g\. "
                                             r"'block1_out'\."):
        gsc.mark(tf.ones([2]), "h 1")


def test_a_cut_the_loss_does_not_use_is_refused():
    W = tf.Variable(np.ones((3, 3)))

    @tf.function
    def loss(x):
        h = gsc.mark(tf.tanh(x @ W), "h")
        gsc.mark(tf.sin(x), "unused")
        return tf.reduce_sum(h * h)

    with pytest.raises(GradSplitError, match=r"'unused'.*the loss does not depend on it") as e:
        gsc.split(loss, [tf.TensorSpec([None, 3], F64)], ["unused"])
    assert "and the loss does not depend on it (nor does any side effect of fn)" in str(e.value)


# -- input_signature and fn ------------------------------------------------------------------


def test_input_signature_not_a_list(counted):
    case, _ = counted
    with pytest.raises(GradSplitError, match=r"input_signature must be a list or tuple of "
                                             r"tf\.TensorSpec, e\.g\. \[tf\.TensorSpec\(\[None, "
                                             r"10\], tf\.float32\)\]"):
        gsc.split(case.fn, case.input_signature[0], ["h1"])


def test_input_signature_entry_not_a_spec(counted):
    case, _ = counted
    with pytest.raises(GradSplitError, match=r"input_signature entry 0 is 'x', not a "
                                             r"tf\.TensorSpec; write it as "
                                             r"tf\.TensorSpec\(shape, dtype\)\."):
        gsc.split(case.fn, ["x", case.input_signature[1]], ["h1"])


def test_a_non_differentiable_op_between_cut_and_value():
    W = tf.Variable(np.ones((3, 3)))

    @tf.function
    def loss(x):
        h = gsc.mark(tf.tanh(x @ W), "h")
        return tf.reduce_sum(tf.unique(tf.reshape(h, [-1]))[0])

    with pytest.raises(GradSplitError, match=r"stage 1 has an op TensorFlow cannot "
                                             r"differentiate: .*Unique.* Move the cut so this op "
                                             r"is not between a cut and the value, or wrap it in "
                                             r"tf\.stop_gradient\."):
        gsc.split(loss, [tf.TensorSpec([None, 3], F64)], ["h"])


def test_a_custom_gradient_closing_over_a_tensor_across_the_cut():
    W = tf.Variable(np.linspace(0.1, 0.9, 9).reshape(3, 3))

    @tf.function
    def loss(x):
        a = tf.tanh(x @ W)
        scale = tf.sin(a, name="closed_over")

        @tf.custom_gradient
        def doubled(y):
            def grad(dy):
                return dy * scale  # closes over a tensor of the stage before the cut
            return 2.0 * y, grad

        b = gsc.mark(a * a, "b")
        return tf.reduce_sum(doubled(b))

    with pytest.raises(GradSplitError, match=r"reads tensor .*closed_over.*, which is not in "
                                             r"the stage being differentiated\. Move the cut so "
                                             r"that "):
        gsc.split(loss, [tf.TensorSpec([None, 3], F64)], ["b"])


# -- XLA --------------------------------------------------------------------------------------


def _unbounded_while():
    W = tf.Variable(np.linspace(0.1, 0.9, 9).reshape(3, 3))

    @tf.function
    def loss(x):
        h = gsc.mark(tf.tanh(x @ W), "h")
        _, h = tf.while_loop(lambda i, h: i < 3, lambda i, h: (i + 1, tf.tanh(h @ W)),
                             [tf.constant(0), h])
        return tf.reduce_sum(h)

    return gsc.split(loss, [tf.TensorSpec([None, 3], F64)], ["h"])


def test_a_while_loop_without_maximum_iterations_under_xla():
    split = _unbounded_while()
    x = tf.ones([2, 3], F64)
    with pytest.raises(GradSplitError, match=r"stage 1 holds a tf\.while_loop without "
                                             r"maximum_iterations; XLA needs a bound to keep the "
                                             r"loop's values for the backward\. Pass "
                                             r"maximum_iterations= to tf\.while_loop, or run with "
                                             r"jit_compile=False\."):
        split.value_and_gradients(x, jit_compile=True)
    with pytest.raises(GradSplitError, match=r"Pass maximum_iterations= to tf\.while_loop, or "
                                             r"use compiled\(jit_compile=False\)\."):
        split.stages[1].compiled(jit_compile=True)
    # what the message offers works
    split.value_and_gradients(x, jit_compile=False)
    split.stages[1].compiled(jit_compile=False)


def test_stage_compiled_with_the_wrong_number_of_variables():
    case = mlp(depth=2)
    split = gsc.split(case.fn, case.input_signature, ["h1"])
    stage = split.stages[0]
    n = len(stage.variables)
    with pytest.raises(GradSplitError, match=rf"stage 0 reads {n} variables; got {n - 1} to "
                                             r"read instead\."):
        forward, _ = stage.compiled(jit_compile=False, variables=stage.variables[:-1])
        forward(case.args()[0])


def test_a_cond_stage_traced_with_a_none_batch_under_xla_says_call_it_with_tensors():
    case = cond_between_cuts()
    split = gsc.split(case.fn, case.input_signature, case.cuts)
    forward, _ = split.stages[1].compiled(jit_compile=True)
    with pytest.raises(GradSplitError, match=r"holds a tf\.cond whose gradient reads branch "
                                             r"intermediates; .* Call it with tensors \(not "
                                             r"inside a function with a None batch\), give "
                                             r"split\(\) an input_signature with a fixed batch "
                                             r"size, or use compiled\(jit_compile=False\)\."):
        forward.get_concrete_function(*split.stages[1].input_specs)


# -- verify -------------------------------------------------------------------------------------


@pytest.mark.parametrize("label, value", [("rtol", -1.0), ("atol", "tight"), ("rtol", True)])
def test_verify_tolerances_must_be_non_negative_numbers(counted, label, value):
    case, split = counted
    with pytest.raises(GradSplitError, match=rf"{label} must be a non-negative number \(or "
                                             r"None for the dtype's default\); got "):
        gsc.verify(split, *case.args(), jit_compile=False, **{label: value})
