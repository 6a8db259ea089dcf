"""``gsc.to_function(gsc.capture(fn))`` is ``fn`` again: on random programs (the generator of
the reliability tests: matmuls, broadcasts, skip connections, shared, frozen and unused
variables, several outputs, ``tf.cond``, ``tf.while_loop``, ``tf.switch_case``, nested
``tf.function``s, a counter variable assigned in the program), its outputs, variable
gradients, input cotangents (``tf.GradientTape``, random output cotangents) and variable
updates equal ``fn``'s within 1e-12 in float64, in graph mode and under XLA (like with like:
both sides compiled). Kept small: 6 programs in graph mode, 4 under XLA."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, Phase, given, seed, settings
from models import reference_vjp
from random_programs import assert_close, build, programs

import gradsplit_compiler as gsc
from gradsplit_compiler import _tf_internal


def _check(program, jit_compile: bool) -> None:
    built = build(program)
    captured = gsc.capture(built.fn, built.input_signature)
    assert {id(v) for v in captured.variables} == {id(v) for v in built.variables}
    rebuilt = gsc.to_function(captured)
    args = built.args()
    cotangents = built.output_cotangents()
    variables = list(captured.variables)
    start = [v.numpy() for v in variables]
    reference_fn = built.fn.python_function if jit_compile else built.fn
    try:
        ref = reference_vjp(reference_fn, variables, jit_compile)(args, cotangents)
        ref_after = [v.numpy() for v in variables]
        for v, value in zip(variables, start):
            v.assign(value)
        got = reference_vjp(rebuilt, variables, jit_compile)(args, cotangents)
        got_after = [v.numpy() for v in variables]
    finally:
        for v, value in zip(variables, start):
            v.assign(value)
    assert_close(tf.nest.flatten(got[0]), tf.nest.flatten(ref[0]), "outputs")
    assert_close([c for c in got[1] if c is not None] + list(got[2]),
                 [c for c in ref[1] if c is not None] + list(ref[2]),
                 "input cotangents and variable gradients")
    assert_close(got_after, ref_after, "variable updates")


def _run(strategy, examples: int, shard: int, jit_compile: bool) -> None:
    @seed(40_000 + shard)
    @settings(max_examples=examples, deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def prop(program):
        _check(program, jit_compile)

    prop()


def test_to_function_of_capture_is_fn_on_random_programs():
    _run(programs(max_ops=5), 6, 0, jit_compile=False)


def test_to_function_of_capture_is_fn_on_random_programs_under_xla():
    _run(programs(max_ops=5, static_batch=True), 4, 1, jit_compile=True)


def test_to_function_reads_the_variables_themselves_and_xla_compiles_it():
    rng = np.random.default_rng(3)
    w = tf.Variable(rng.normal(size=(3, 2)))
    program = gsc.capture(lambda x: tf.reduce_sum(tf.sin(x @ w)),
                          [tf.TensorSpec([None, 3], tf.float64)])
    f = gsc.to_function(program, jit_compile=True)
    x = tf.constant(rng.normal(size=(4, 3)))
    before = float(f(x))
    w.assign(w * 2.0)  # the function reads w, not a copy taken at capture
    after = float(f(x))
    assert abs(after - float(tf.reduce_sum(tf.sin(x @ w)))) <= 1e-12 and after != before
    with tf.GradientTape() as tape:
        value = f(x)
    expected = tf.cos(x @ w)
    assert np.max(np.abs(tape.gradient(value, w) - tf.transpose(x) @ expected)) <= 1e-12
    assert f.experimental_get_tracing_count() == 1


def test_to_function_refuses_what_is_not_a_program():
    with pytest.raises(gsc.GradSplitError, match=r"to_function needs a gsc.Program \(from "
                       r"gsc.capture\); got function. Capture a function first: "
                       r"gsc.to_function\(gsc.capture\(fn, input_signature\)\)."):
        gsc.to_function(lambda x: x)


def test_to_function_refuses_a_broken_graph_before_importing_it():
    program = gsc.capture(lambda x: tf.tanh(x) * 2.0, [tf.TensorSpec([None])])
    del program.graph.nodes["Tanh"]["node_def"].attr["T"]
    before = _tf_internal.eager_function_names()
    with pytest.raises(gsc.GradSplitError, match=r"to_function cannot run this program: node "
                       r"'Tanh' \(Tanh\) has no attribute 'T', which the op requires"):
        gsc.to_function(program)
    assert not _tf_internal.eager_function_names() - before


def test_to_function_keeps_a_custom_gradient():
    rng = np.random.default_rng(5)
    w = tf.Variable(rng.normal(size=(3, 2)))

    @tf.custom_gradient
    def cube(a):
        def grad(dy):
            return 3.0 * a * a * dy
        return a * a * a, grad

    def f(x):
        return tf.reduce_sum(cube(tf.tanh(x @ w)))

    g = gsc.to_function(gsc.capture(f, [tf.TensorSpec([None, 3], tf.float64)]))
    x = tf.constant(rng.normal(size=(4, 3)))
    with tf.GradientTape(persistent=True) as tape:
        value, expected = g(x), f(x)
    assert abs(float(value - expected)) <= 1e-12
    assert np.max(np.abs(tape.gradient(value, w) - tape.gradient(expected, w))) <= 1e-12
