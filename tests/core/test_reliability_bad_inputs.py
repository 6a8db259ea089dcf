"""A corpus of bad inputs: every one raises ``gsc.GradSplitError`` (a ``ValueError``) whose
message names the input in the caller's terms, carries no TensorFlow traceback, changes no
variable and leaves nothing behind on ``fn``.

Table-driven: each ``Bad`` is an action on ``Programs`` (a program with marks before, inside
and after control flow, integer and boolean tensors, a side effect that counts its calls, a
structured-argument program and a good split of each) and the substrings its message must
hold. ``fn`` counts its own runs (``steps.assign_add(1)``), so a refusal that ran part of the
program shows in the variables.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import tensorflow as tf
from models import keras_floatx, keras_small_functional, normal, snapshot, variable

import gradsplit_compiler as gsc

F64 = tf.float64
SIGNATURE = [tf.TensorSpec([None, 6], F64), tf.TensorSpec([None, 3], F64)]
# Text that only a TensorFlow traceback or op error would put in a message.
LEAKS = ("Traceback", "tensorflow/python", "[Op:", 'File "', "site-packages")


class Programs:
    """The programs the corpus calls, built once per test module (refusals change nothing)."""

    def __init__(self):
        rng = np.random.default_rng(0)
        self.W1 = variable(rng, (6, 8), F64, "W1")
        self.W2 = variable(rng, (8, 8), F64, "W2")
        self.W3 = variable(rng, (8, 3), F64, "W3")
        self.steps = tf.Variable(tf.zeros([], F64), name="steps")
        self.names: dict = {}
        W1, W2, W3, steps, names = self.W1, self.W2, self.W3, self.steps, self.names

        def body(i, h):
            return i + 1, gsc.mark(tf.tanh(tf.matmul(h, W2)), "in_while")

        def true_branch(h1):
            t = tf.sin(tf.matmul(h1, W2), name="cond_sin")
            names["cond_sin"] = t.name
            return gsc.mark(t, "in_cond")

        @tf.function
        def loss(x, target):
            steps.assign_add(tf.ones([], F64))
            h1 = gsc.mark(tf.tanh(tf.matmul(x, W1)), "h1")
            batch = tf.shape(h1, name="batch_shape")
            positive = tf.greater(h1, 0.0, name="positive")
            c = tf.cond(tf.reduce_mean(h1) > -1e9, lambda: true_branch(h1),
                        lambda: tf.cos(tf.matmul(h1, W2)))
            _, w = tf.while_loop(lambda i, h: i < 2, body, [tf.constant(0), h1],
                                 maximum_iterations=2)
            h2 = gsc.mark(tf.tanh(c + w) * tf.cast(positive, F64), "h2")
            same = gsc.mark(h2, "h2_again")  # no op between h2 and h2_again
            twice = gsc.mark(tf.sin(same), "twice") + gsc.mark(tf.cos(same), "twice")
            scale = tf.cast(batch[0], F64) / tf.cast(tf.shape(x)[0], F64)
            out = tf.reduce_mean(tf.square(tf.matmul(twice, W3) * scale - target))
            names.update(h1=h1.name, out=out.name, x=x.name)
            return out

        @tf.function
        def features(x, target):
            steps.assign_add(tf.ones([], F64))
            return gsc.mark(tf.tanh(tf.matmul(x, W1)), "h1") * 2.0 - target[:, :1]

        @tf.function
        def with_numpy(x, target):
            steps.assign_add(tf.ones([], F64))
            h1 = gsc.mark(tf.tanh(tf.matmul(x, W1)), "h1")
            h2 = tf.numpy_function(lambda a: a * 2.0, [h1], F64, name="double")
            h2.set_shape(h1.shape)
            return tf.reduce_mean(tf.square(tf.matmul(tf.sin(h2), W3) - target))

        @tf.function
        def with_py_function(x, target):
            steps.assign_add(tf.ones([], F64))
            h1 = gsc.mark(tf.tanh(tf.matmul(x, W1)), "h1")
            h2 = tf.py_function(lambda a: a * 2.0, [h1], F64, name="double")
            h2.set_shape(h1.shape)
            return tf.reduce_mean(tf.square(tf.matmul(tf.sin(h2), W3) - target))

        @tf.function
        def structured(inputs):
            steps.assign_add(tf.ones([], F64))
            h1 = gsc.mark(tf.tanh(tf.matmul(inputs["x"], W1)), "h1")
            return tf.reduce_mean(tf.square(tf.matmul(h1, W2)[:, :3] - inputs["target"]))

        self.fn, self.features, self.structured = loss, features, structured
        self.with_numpy, self.with_py_function = with_numpy, with_py_function
        self.structured_signature = [{"x": SIGNATURE[0], "target": SIGNATURE[1]}]
        loss.get_concrete_function(*SIGNATURE)  # fills names
        self.split = gsc.split(loss, SIGNATURE, ["h1", "h2"])
        self.features_split = gsc.split(features, SIGNATURE, ["h1"])
        self.numpy_split = gsc.split(with_numpy, SIGNATURE, ["h1"])
        self.py_function_split = gsc.split(with_py_function, SIGNATURE, ["h1"])
        self.structured_split = gsc.split(structured, self.structured_signature, ["h1"])
        with keras_floatx("float64"):
            self.keras = keras_small_functional(F64)
        self.variables = [W1, W2, W3, self.steps, *self.keras.variables]
        self.x = tf.constant(normal(rng, (5, 6), F64))
        self.target = tf.constant(normal(rng, (5, 3), F64))

    def resource_tensor(self) -> str:
        graph = self.fn.get_concrete_function(*SIGNATURE).graph
        return next(t for _, t in graph.captures if t.dtype == tf.resource).name

    def split_fn(self, cuts, fn=None, signature=None):
        return gsc.split(self.fn if fn is None else fn,
                         SIGNATURE if signature is None else signature, cuts)


@dataclass
class Bad:
    """A bad input: ``action(programs)`` must raise a GradSplitError holding ``expect``."""

    id: str
    action: Callable[[Programs], object]
    expect: tuple[str, ...]
    is_split: bool = True  # the action is a call of gsc.split

    def __repr__(self) -> str:
        return self.id


def _cut(*cuts):
    return lambda p: p.split_fn(list(cuts))


def _trace(fn):
    return lambda p: p.split_fn(["h1"], fn=fn)


@tf.function(autograph=False)
def _tanh_layer(h):
    return tf.tanh(h)


def _cond_call(x, target):
    h1 = gsc.mark(tf.sin(x), "h1")
    return tf.reduce_sum(tf.cond(tf.reduce_sum(h1) > 0, lambda: _tanh_layer(h1), lambda: h1))


def _raising(x, target):
    raise RuntimeError("boom while tracing")


def _undefined(x, target):
    return tf.reduce_sum(undefined_helper(x))  # noqa: F821 - the point of the case


CORPUS = [
    # -- names ---------------------------------------------------------------------------------
    Bad("unknown_mark_name", _cut("h11"), ("'h11'", "'h1'")),
    Bad("unknown_graph_tensor", _cut("Tahn"), ("'Tahn'", "Tanh")),
    Bad("output_index_out_of_range", _cut("Tanh:7"), ("'Tanh:7'",)),
    Bad("negative_output_index", _cut("Tanh:-1"), ("'Tanh:-1'",)),
    Bad("unknown_name_in_a_cut_of_several", _cut(["h1", "nowhere"]), ("'nowhere'",)),
    Bad("ambiguous_mark_name", _cut("twice"), ("'twice'", "gsc.mark.twice.")),
    Bad("unknown_keras_layer",
        lambda p: gsc.split(p.keras.fn, p.keras.input_signature, ["dense_z"]),
        ("'dense_z'", "dense_a")),
    Bad("mark_name_with_a_space",
        _trace(lambda x, target: tf.reduce_sum(gsc.mark(tf.tanh(x), "h 1"))),
        ("gsc.mark name 'h 1'", "letters, digits")),
    Bad("empty_mark_name",
        _trace(lambda x, target: tf.reduce_sum(gsc.mark(tf.tanh(x), ""))),
        ("gsc.mark name ''",)),
    Bad("mark_name_not_a_string",
        _trace(lambda x, target: tf.reduce_sum(gsc.mark(tf.tanh(x), 3))),
        ("gsc.mark name 3",)),
    # -- dtypes --------------------------------------------------------------------------------
    Bad("integer_tensor", _cut("batch_shape"), ("'batch_shape'", "int32", "floating-point")),
    Bad("boolean_tensor", _cut("positive"), ("'positive'", "bool", "floating-point")),
    Bad("resource_tensor", lambda p: p.split_fn([p.resource_tensor()]), ("resource",)),
    # -- order, repetition, empty stages -------------------------------------------------------
    Bad("out_of_data_flow_order", _cut("h2", "h1"), ("'h1'", "'h2'", "order")),
    Bad("repeated_cut", _cut("h1", "h1"), ("'h1'", "once")),
    Bad("repeated_within_one_cut", _cut(["h1", "h1"]), ("'h1'",)),
    Bad("same_tensor_by_two_names", lambda p: p.split_fn(["h1", p.names["h1"]]),
        ("gsc.mark.h1.",)),
    Bad("stage_left_empty", _cut("h2", "h2_again"), ("'h2_again'", "empty")),
    Bad("cut_at_the_output", lambda p: p.split_fn([p.names["out"]]), ("empty",)),
    Bad("cut_at_an_argument", lambda p: p.split_fn([p.names["x"]]), ("x:0", "input of fn")),
    Bad("empty_cut", _cut([]), ("cut 0", "empty")),
    # -- what cuts is --------------------------------------------------------------------------
    Bad("cuts_a_string", lambda p: p.split_fn("h1"), ("cuts must be a list", "'h1'")),
    Bad("cuts_none", lambda p: p.split_fn(None), ("cuts must be a list", "None")),
    Bad("cuts_a_set", lambda p: p.split_fn({"h1"}), ("cuts must be a list",)),
    Bad("cuts_a_dict", lambda p: p.split_fn({"h1": 0}), ("cuts must be a list",)),
    Bad("cut_entry_an_int", _cut(3), ("cut 0", "3", "strings")),
    Bad("cut_entry_none", _cut(None), ("cut 0", "None", "strings")),
    Bad("cut_entry_a_tensor", lambda p: p.split_fn([tf.constant(1.0)]), ("cut 0", "strings")),
    Bad("cut_entry_a_set", _cut({"h1"}), ("cut 0", "strings")),
    # -- control-flow bodies -------------------------------------------------------------------
    Bad("mark_inside_cond_branch", _cut("in_cond"), ("'in_cond'", "body")),
    Bad("mark_inside_while_body", _cut("in_while"), ("'in_while'", "body")),
    Bad("graph_name_inside_cond_branch", lambda p: p.split_fn([p.names["cond_sin"]]),
        ("cond_sin", "body")),
    Bad("tf_function_called_in_a_cond_branch", lambda p: p.split_fn(["h1"], fn=_cond_call),
        ("calls a tf.function",)),
    # -- input_signature and fn ----------------------------------------------------------------
    Bad("signature_a_single_spec", lambda p: p.split_fn(["h1"], signature=SIGNATURE[0]),
        ("input_signature", "list")),
    Bad("signature_none", lambda p: gsc.split(p.fn, None, ["h1"]), ("input_signature",)),
    Bad("signature_of_tuples", lambda p: p.split_fn(["h1"], signature=[(None, 6), (None, 3)]),
        ("input_signature", "TensorSpec")),
    Bad("signature_too_short", lambda p: p.split_fn(["h1"], signature=SIGNATURE[:1]),
        ("could not be traced", "'target'")),
    Bad("signature_too_long", lambda p: p.split_fn(["h1"], signature=SIGNATURE * 2),
        ("could not be traced",)),
    Bad("signature_wrong_dtype",
        lambda p: p.split_fn(["h1"], signature=[tf.TensorSpec([None, 6], tf.float32),
                                                SIGNATURE[1]]),
        ("could not be traced", "float32")),
    Bad("signature_wrong_rank",
        lambda p: p.split_fn(["h1"], signature=[tf.TensorSpec([None, 6, 2], F64),
                                                SIGNATURE[1]]),
        ("could not be traced", "(None, 6, 2)")),
    Bad("fn_not_callable", lambda p: gsc.split(42, SIGNATURE, ["h1"]), ("fn must be", "int")),
    Bad("fn_raises_while_tracing", _trace(_raising), ("boom while tracing",)),
    Bad("fn_uses_an_undefined_name", _trace(_undefined), ("undefined_helper",)),
    Bad("fn_returns_none", _trace(lambda x, target: None), ("fn must return tensors", "None")),
    # -- calling a split -----------------------------------------------------------------------
    Bad("non_scalar_fn_in_value_and_gradients",
        lambda p: p.features_split.value_and_gradients(p.x, p.target),
        ("scalar", "vjp"), is_split=False),
    Bad("too_few_arguments", lambda p: p.split.value_and_gradients(p.x),
        ("2 arguments", "got 1"), is_split=False),
    Bad("too_many_arguments", lambda p: p.split.value_and_gradients(p.x, p.target, p.x),
        ("2 arguments", "got 3"), is_split=False),
    Bad("argument_wrong_dtype",
        lambda p: p.split.value_and_gradients(tf.cast(p.x, tf.float32), p.target),
        ("'x'", "float32", "float64"), is_split=False),
    Bad("argument_wrong_width",
        lambda p: p.split.value_and_gradients(tf.ones([5, 7], F64), p.target),
        ("'x'", "(5, 7)", "(None, 6)"), is_split=False),
    Bad("argument_wrong_rank",
        lambda p: p.split.value_and_gradients(p.x[:, :, None], p.target),
        ("'x'", "(5, 6, 1)"), is_split=False),
    Bad("argument_a_string", lambda p: p.split.value_and_gradients("x", p.target),
        ("'x'", "string"), is_split=False),
    Bad("argument_ragged", lambda p: p.split.value_and_gradients([[1.0], [1.0, 2.0]], p.target),
        ("'x'",), is_split=False),
    Bad("arguments_of_another_structure",
        lambda p: p.structured_split.value_and_gradients({"x": p.x, "y": p.target}),
        ("structure",), is_split=False),
    Bad("vjp_too_many_cotangents",
        lambda p: p.split.vjp([p.x, p.target], [tf.ones([], F64)] * 2),
        ("2", "1 outputs"), is_split=False),
    Bad("vjp_cotangent_wrong_shape",
        lambda p: p.split.vjp([p.x, p.target], tf.ones([3], F64)),
        ("output cotangent", "shape"), is_split=False),
    Bad("vjp_cotangent_a_string", lambda p: p.split.vjp([p.x, p.target], "one"),
        ("output cotangent",), is_split=False),
    Bad("run_stages_too_few_arguments", lambda p: p.split.run_stages([p.x], jit_compile=False),
        ("2 arguments", "got 1"), is_split=False),
    Bad("run_stages_cotangent_wrong_shape",
        lambda p: p.split.run_stages([p.x, p.target], [tf.ones([4], F64)], jit_compile=False),
        ("output cotangent", "shape"), is_split=False),
    Bad("run_stages_too_many_cotangents",
        lambda p: p.split.run_stages([p.x, p.target], [1.0, 2.0], jit_compile=False),
        ("2", "1 outputs"), is_split=False),
    Bad("run_stages_cotangent_a_string",
        lambda p: p.split.run_stages([p.x, p.target], ["one"], jit_compile=False),
        ("output cotangent",), is_split=False),
    Bad("verify_too_few_arguments", lambda p: gsc.verify(p.split, p.x),
        ("2 arguments", "got 1"), is_split=False),
    Bad("verify_rtol_not_a_number",
        lambda p: gsc.verify(p.split, p.x, p.target, jit_compile=False, rtol="tight"),
        ("rtol", "'tight'"), is_split=False),
    # -- ops XLA cannot compile ----------------------------------------------------------------
    Bad("numpy_function_under_xla",
        lambda p: p.numpy_split.value_and_gradients(p.x, p.target, jit_compile=True),
        ("PyFunc", "jit_compile=False"), is_split=False),
    Bad("py_function_under_xla",
        lambda p: p.py_function_split.vjp([p.x, p.target], tf.ones([], F64), jit_compile=True),
        ("EagerPyFunc", "jit_compile=False"), is_split=False),
    Bad("numpy_function_in_a_later_stage_under_xla",
        lambda p: p.numpy_split.run_stages([p.x, p.target], jit_compile=True),
        ("PyFunc", "stage 1"), is_split=False),
    Bad("verify_numpy_function_under_xla",
        lambda p: gsc.verify(p.numpy_split, p.x, p.target, jit_compile=True),
        ("PyFunc",), is_split=False),
]


@pytest.fixture(scope="module")
def programs():
    return Programs()


def _refused(programs: Programs, bad: Bad) -> str:
    """Run ``bad``; return its message, checking variables and ``fn`` are as they were."""
    before = snapshot(programs.variables)
    fn_attributes = sorted(vars(programs.fn))
    with pytest.raises(gsc.GradSplitError) as info:
        bad.action(programs)
    assert isinstance(info.value, ValueError)
    for var, b, a in zip(programs.variables, before, snapshot(programs.variables)):
        np.testing.assert_array_equal(a, b, err_msg=f"{var.name} changed")
    assert sorted(vars(programs.fn)) == fn_attributes
    return str(info.value)


def test_the_corpus_has_at_least_thirty_cases_with_distinct_ids():
    assert len(CORPUS) >= 30
    assert len({b.id for b in CORPUS}) == len(CORPUS)


@pytest.mark.parametrize("bad", CORPUS, ids=[b.id for b in CORPUS])
def test_bad_input_is_refused_in_the_callers_terms(programs, bad):
    message = _refused(programs, bad)
    missing = [s for s in bad.expect if s not in message]
    assert not missing, f"{missing} not in message: {message}"
    leaked = [s for s in LEAKS if s in message]
    assert not leaked, f"TensorFlow traceback text {leaked} in message: {message}"


def test_every_refused_split_leaves_nothing_behind(programs):
    """After every refused ``split`` of ``fn``, a correct split of the same ``fn`` works and
    verifies, and the split made before the refusals still gives the same gradients."""
    x, target = programs.x, programs.target
    before_value, before_grads = programs.split.value_and_gradients(x, target, jit_compile=False)
    for bad in CORPUS:
        if bad.is_split:
            # the message is the other test's job; the type is checked here too
            with pytest.raises(gsc.GradSplitError):
                bad.action(programs)
    after = gsc.split(programs.fn, SIGNATURE, ["h1", "h2"])
    assert [s.inputs for s in after.stages] == [s.inputs for s in programs.split.stages]
    report = gsc.verify(after, x, target, jit_compile=False)
    assert report.ok, str(report)
    value, grads = programs.split.value_and_gradients(x, target, jit_compile=False)
    assert float(value) == float(before_value)
    for g, b in zip(grads, before_grads):
        np.testing.assert_array_equal(g, b)
