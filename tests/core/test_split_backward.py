"""Each stage's backward cut in two for zero-bubble schedules: ``B`` (``backward_input``, the
input cotangents) and ``W`` (``backward_weight``, the variable gradients).

B then W gives the fused backward's results (float64 within 1e-12, and the fused backward is
held to ``tf.GradientTape`` elsewhere); neither program repeats the other's work, read from
their ops (the weight-gradient matmuls ``x^T g`` only in W, the input-cotangent matmuls
``g W^T`` only in B, no op that reads a cotangent in both) and from XLA's HLO (the dots of B
and W add up to the fused backward's). What W keeps from B is counted in ``split.summary``.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest
import tensorflow as tf
from models import normal, rel_errors, tape_value_and_gradients

import gradsplit_compiler as gsc
from gradsplit_compiler.core.rebuild import external_inputs

WIDTH, BATCH = 5, 6


@pytest.fixture(scope="module")
def tied():
    """Three stages; ``E`` read by the first and the last, ``h1`` skips stage 1."""
    rng = np.random.default_rng(7)
    E = tf.Variable(normal(rng, (WIDTH, WIDTH), tf.float64), name="E")
    W1 = tf.Variable(normal(rng, (WIDTH, WIDTH), tf.float64), name="W1")
    b1 = tf.Variable(normal(rng, (WIDTH,), tf.float64), name="b1")

    def loss(x):
        h1 = gsc.mark(tf.tanh(x @ E), "h1")
        h2 = gsc.mark(tf.sin(h1 @ W1 + b1), "h2")
        return tf.reduce_mean(tf.square((h2 + h1) @ tf.transpose(E)))

    split = gsc.split(loss, [tf.TensorSpec([None, WIDTH], tf.float64)], ["h1", "h2"])
    x = tf.constant(normal(rng, (BATCH, WIDTH), tf.float64))
    return split, loss, [E, W1, b1], x, rng


def _stage_runs(split, x, rng):
    """Per stage: its residuals and random output cotangents, from a forward pass."""
    values = {split.arg_names[0]: x}
    runs = []
    for stage in split.stages:
        outputs, residuals = stage.forward(*[values[n] for n in stage.inputs])
        values.update(zip(stage.outputs, outputs))
        cotangents = [tf.constant(normal(rng, tuple(o.shape), tf.float64)) for o in outputs]
        runs.append((residuals, cotangents))
    return runs


def test_b_then_w_equals_the_fused_backward(tied):
    split, _, _, x, rng = tied
    for stage, (residuals, cotangents) in zip(split.stages, _stage_runs(split, x, rng)):
        fused_inputs, fused_grads = stage.backward(residuals, cotangents)
        inputs, carried = stage.backward_input(residuals, cotangents)
        assert len(carried) == len(stage.carried_specs) and all(
            s.shape.is_compatible_with(c.shape) and s.dtype == c.dtype
            for s, c in zip(stage.carried_specs, carried))
        grads = stage.backward_weight(stage.weight_inputs_of(residuals, cotangents, carried))
        got = [g for g in inputs if g is not None] + list(grads)
        want = [g for g in fused_inputs if g is not None] + list(fused_grads)
        assert len(got) == len(want) and max(rel_errors(got, want)) <= 1e-12, stage.index


def test_the_pipeline_route_through_b_and_w_gives_the_tape_gradient(tied):
    """Stages chained by hand through B and W (what a zero-bubble device runs), against the
    tape on the original function."""
    split, loss, variables, x, rng = tied
    values = {split.arg_names[0]: x}
    kept = []
    for stage in split.stages:
        outputs, residuals = stage.forward(*[values[n] for n in stage.inputs])
        values.update(zip(stage.outputs, outputs))
        kept.append(residuals)
    cotangent = {split.output_names[0]: tf.constant(1.0, tf.float64)}
    grads = {id(v): tf.zeros_like(v) for v in split.variables}
    for stage in reversed(split.stages):
        cots = [cotangent.get(n, tf.zeros_like(values[n])) for n in stage.outputs]
        inputs, carried = stage.backward_input(kept[stage.index], cots)
        for name, g in zip(stage.inputs, inputs):
            if g is not None:
                cotangent[name] = cotangent[name] + g if name in cotangent else g
        for v, g in zip(stage.variables, stage.backward_weight(
                stage.weight_inputs_of(kept[stage.index], cots, carried))):
            grads[id(v)] = grads[id(v)] + g
    value, ref = tape_value_and_gradients(loss, split.variables, [x])
    assert sorted(map(id, split.variables)) == sorted(map(id, variables))
    assert max(rel_errors([grads[id(v)] for v in split.variables], ref)) <= 1e-12
    assert abs(float(values[split.output_names[0]]) - float(value)) <= 1e-12 * abs(float(value))


def _ops(graph_def):
    return [(nd.name, nd.op, dict(nd.attr)) for nd in graph_def.node]


def _matmuls(graph_def):
    return sorted((bool(a["transpose_a"].b), bool(a["transpose_b"].b))
                  for _, op, a in _ops(graph_def) if op == "MatMul")


def test_weight_gradient_matmuls_run_only_in_w_and_input_cotangent_ones_only_in_b(tied):
    split = tied[0]
    for stage in split.stages:
        vjp = stage.pieces
        pieces = vjp.split_backward
        b, w = _matmuls(pieces.input_graph_def), _matmuls(pieces.weight_graph_def)
        # dL/dW = x^T g (transpose_a) in W; dL/dx = g W^T (transpose_b) in B
        assert w and all(ta and not tb for ta, tb in w), (stage.index, w)
        assert all(tb and not ta for ta, tb in b), (stage.index, b)
        assert Counter(b) + Counter(w) == Counter(_matmuls(vjp.backward_graph_def))
        # no op that reads a cotangent runs in both; what W needs of B's work is carried
        b_names = {n for n, _, _ in _ops(pieces.input_graph_def)}
        shared = [(n, op) for n, op, _ in _ops(pieces.weight_graph_def) if n in b_names]
        assert all(op in ("Const", "Shape", "Reshape", "BroadcastGradientArgs")
                   for _, op in shared), shared
        read = {re.sub(r":0$", "", n) for n in external_inputs(pieces.weight_graph_def)}
        assert {re.sub(r":0$", "", n) for n in pieces.carried_names} <= read


def test_xla_dots_of_b_and_w_add_up_to_the_fused_backward(tied):
    split, _, _, x, rng = tied
    stage = split.stages[1]
    residuals, cotangents = _stage_runs(split, x, rng)[1]
    _, carried = stage.backward_input(residuals, cotangents)
    weight_inputs = stage.weight_inputs_of(residuals, cotangents, carried)

    def dots(body, *args):
        hlo = tf.function(body, jit_compile=True, autograph=False) \
            .experimental_get_compiler_ir(*args)(stage="hlo")
        return len(re.findall(r"\bdot\(", hlo))

    fused = dots(lambda r, c: stage.backward(r, c), residuals, cotangents)
    b = dots(lambda r, c: stage.backward_input(r, c), residuals, cotangents)
    w = dots(lambda i: stage.backward_weight(i), weight_inputs)
    assert (b, w) == (1, 1) and b + w == fused


def test_summary_counts_what_w_keeps_and_what_remat_keeps(tied):
    split = tied[0]
    rows = split.summary(batch_size=BATCH)
    for row, stage in zip(rows, split.stages):
        assert row["weight_input_bytes"] == sum(
            8 * BATCH * s.shape[1] for s in stage.weight_input_specs)
        assert row["remat_residual_bytes"] == 8 * BATCH * WIDTH * len(stage.inputs)
    # stage 1 (h1 @ W1 + b1): W reads h1 (a residual) and the cotangent of the sum, which B
    # carries: two [BATCH, WIDTH] tensors
    assert rows[1]["weight_input_bytes"] == 2 * 8 * BATCH * WIDTH
