"""Load: a thousand training steps on one split keep memory flat and never retrace.

The program is a small three-stage MLP with a step counter (a side effect every step); the
steps alternate two batch sizes (the signature's batch is ``None``), apply the gradients and
read the loss, as a training loop would. Memory is the process's resident set
(``VmRSS``) after a warm-up against after the thousand steps; traces are counted on the
composed ``tf.function`` and on every stage's compiled forward and backward.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
import tensorflow as tf
from models import mlp, normal

import gradsplit_compiler as gsc

STEPS = 1000
STAGE_STEPS = 1000
WARM_UP = 50
MAX_GROWTH_MB = 20.0
LEARNING_RATE = 1e-3


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmRSS in /proc/self/status")


def _batches(dtype):
    rng = np.random.default_rng(0)
    return [[tf.constant(normal(rng, (n, 6), dtype)), tf.constant(normal(rng, (n, 3), dtype))]
            for n in (4, 7)]


def _train(step, variables, batches, steps: int) -> list[float]:
    losses = []
    for i in range(steps):
        value, grads = step(*batches[i % len(batches)])
        for var, grad in zip(variables, grads):
            var.assign_sub(LEARNING_RATE * grad)
        losses.append(float(value))
    return losses


@pytest.fixture
def counted():
    """The mlp of the core tests, cut into three stages, plus a counter of steps."""
    case = mlp(tf.float64, depth=3, width=8)
    steps = tf.Variable(0, dtype=tf.int64, name="steps")
    inner = case.fn

    @tf.function
    def loss(x, target):
        steps.assign_add(1)
        return inner(x, target)

    split = gsc.split(loss, case.input_signature, ["h1", "h2"])
    trainable = [v for v in split.variables if v.dtype.is_floating]
    return split, steps, trainable


@pytest.mark.parametrize("jit_compile", [True, False], ids=["xla", "graph"])
def test_thousand_steps_keep_memory_flat_and_never_retrace(counted, jit_compile):
    split, steps, trainable = counted
    batches = _batches(tf.float64)

    def step(*args):
        value, grads = split.value_and_gradients(*args, jit_compile=jit_compile)
        return value, [g for g, v in zip(grads, split.variables) if v.dtype.is_floating]

    first = _train(step, trainable, batches, WARM_UP)
    gc.collect()
    before = rss_mb()
    losses = _train(step, trainable, batches, STEPS)
    gc.collect()
    growth = rss_mb() - before

    composed = [f for key, f in split._functions.items()
                if key[:2] == ("value_and_gradients", jit_compile)]
    assert [f.experimental_get_tracing_count() for f in composed] == [1]
    assert growth < MAX_GROWTH_MB, f"resident memory grew {growth:.1f} MB in {STEPS} steps"
    assert int(steps.numpy()) == WARM_UP + STEPS  # the side effect ran once per step
    assert np.mean(losses[-50:]) < np.mean(first[:50])  # and it trains


@pytest.mark.parametrize("jit_compile", [True, False], ids=["xla", "graph"])
def test_hand_driven_stages_keep_memory_flat_and_never_retrace(counted, jit_compile):
    split, steps, trainable = counted
    batches = _batches(tf.float64)
    floating = [i for i, v in enumerate(split.variables) if v.dtype.is_floating]

    def step(*args):
        outputs, _, grads = split.run_stages(list(args), jit_compile=jit_compile)
        return outputs, [grads[i] for i in floating]

    _train(step, trainable, batches, WARM_UP)
    gc.collect()
    before = rss_mb()
    _train(step, trainable, batches, STAGE_STEPS)
    gc.collect()
    growth = rss_mb() - before

    for stage in split.stages:
        forward, backward = (call.function for call in stage.callers(jit_compile))
        assert forward.experimental_get_tracing_count() == 1, f"stage {stage.index} forward"
        assert backward.experimental_get_tracing_count() == 1, f"stage {stage.index} backward"
    assert growth < MAX_GROWTH_MB, f"resident memory grew {growth:.1f} MB in {STAGE_STEPS} steps"
    assert int(steps.numpy()) == WARM_UP + STAGE_STEPS


def test_verify_after_training_still_agrees(counted):
    split, _, trainable = counted
    _train(lambda *a: _floating(split, *a), trainable, _batches(tf.float64), 100)
    report = gsc.verify(split, *_batches(tf.float64)[0], jit_compile=False)
    assert report.ok, str(report)


def _floating(split, *args):
    value, grads = split.value_and_gradients(*args, jit_compile=False)
    return value, [g for g, v in zip(grads, split.variables) if v.dtype.is_floating]


def _registered_functions() -> int:
    from tensorflow.python.eager import context

    return len(context.context().list_function_names())


def test_splitting_a_control_flow_program_again_and_again_keeps_the_registry_flat():
    from models import while_between_cuts

    case = while_between_cuts()
    args = case.args(0)

    def split_and_step():
        split = gsc.split(case.fn, case.input_signature, case.cuts)
        split.value_and_gradients(*args, jit_compile=False)

    split_and_step()
    gc.collect()  # a Split is a cycle (stages <-> functions): freed by the collector
    before = _registered_functions()
    for _ in range(10):
        split_and_step()
    gc.collect()
    added = _registered_functions() - before
    # Every piece's library functions are children of the functions that imported them,
    # and leave the eager context with them (they used to stay: ~1-2 MB per split).
    assert added == 0, f"{added} functions still registered after 10 splits were dropped"
