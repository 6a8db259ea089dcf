"""auto_split under ``memory_limit`` choosing ``remat`` for the stages whose residuals would
not fit, and the pipeline built from such a split running it (float64, against the tape)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from models import assert_matches, cpu_devices, normal, tape_value_and_gradients, value_rel_error

import gradsplit_compiler as gsc
from gradsplit_compiler import GradSplitError
from gradsplit_compiler.plan import autosplit

TOL = 1e-12
K, M, MICRO = 3, 4, 16  # stages, micro-batches, examples per micro-batch
WIDTHS = [4, 24, 24, 4, 24, 24, 4, 4, 4]  # two wide blocks with narrow places between


class _Chain:
    """``tanh(h @ W)`` through ``WIDTHS``: each wide block keeps far more residuals than
    the narrow tensor entering it."""

    def __init__(self, seed: int = 0, random_at: int | None = None):
        rng = np.random.default_rng(seed)
        self.Ws = [tf.Variable(normal(rng, (a, b), tf.float64, 0.4), name=f"W{i}")
                   for i, (a, b) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:]))]
        self.random_at = random_at  # a layer whose output is scaled by random numbers
        self.signature = [tf.TensorSpec([None, WIDTHS[0]], tf.float64)]
        self.x = tf.constant(normal(rng, (M * MICRO, WIDTHS[0]), tf.float64))

    def loss(self, x):
        h = x
        for i, W in enumerate(self.Ws):
            h = tf.tanh(h @ W)
            if i == self.random_at:
                h = h * tf.random.uniform(tf.shape(h), 0.5, 1.5, tf.float64)
        return tf.reduce_mean(tf.reduce_sum(h ** 2, axis=1))

    def auto_split(self, limit):
        return gsc.auto_split(self.loss, self.signature, K, batch_size=MICRO, microbatches=M,
                              memory_limit=limit)


def _in_flight(k: int) -> int:
    return min(K - k, M)  # 1F1B


def _held(split, remat):
    """What each stage holds as the split measures it (``summary``): variables, plus its
    residuals per micro-batch in flight, or rematerialised its inputs per micro-batch in
    flight and one micro-batch's residuals while its backward runs the forward again."""
    rows = split.summary(batch_size=MICRO)
    return [r["variable_bytes"] + _in_flight(k) * (
        r["remat_residual_bytes"] if again else r["residual_bytes"]) + (
        r["residual_bytes"] if again else 0) for k, (r, again) in enumerate(zip(rows, remat))]


@pytest.fixture(scope="module")
def chain():
    return _Chain()


@pytest.fixture(scope="module")
def planned(chain):
    """A limit between what the stages need rematerialised and what they need as they are."""
    return chain.auto_split(16_000), 16_000


def test_a_limit_between_the_needs_rematerialises_exactly_the_stages_that_need_it(
        chain, planned):
    split, limit = planned
    plan = split.plan
    assert plan.remat == [True, True, False]
    # exactly the stages whose residuals, as the split holds them, exceed the limit
    assert plan.remat == [need > limit for need in _held(split, [False] * K)]
    assert max(_held(split, plan.remat)) <= limit
    assert max(plan.stage_memory) <= limit
    assert all(saved > 0 for saved, again in zip(plan.remat_saved, plan.remat) if again)
    # the second forward is in the stage's time, and so in the bottleneck
    assert all(s > 0 for s, again in zip(plan.remat_seconds, plan.remat) if again)
    assert plan.bottleneck == max(plan.stage_costs)
    text = plan.explain()
    assert "stage 0: " in text and "rematerialised: saves" in text
    assert "remat on stages 0, 1: their residuals would not fit memory_limit" in text
    # a smaller limit needs remat on the first stage only, with cuts moved
    tighter = chain.auto_split(14_000)
    assert tighter.plan.remat == [True, False, False]
    assert max(_held(tighter, tighter.plan.remat)) <= 14_000


def test_a_limit_large_enough_gives_no_remat(chain):
    split = chain.auto_split(30_000)
    assert split.plan.remat == [False] * K
    assert "no stage rematerialised" in split.plan.explain()
    assert max(_held(split, [False] * K)) <= 30_000


def test_the_pipeline_runs_the_plan_s_remat_and_equals_the_tape(chain, planned):
    split, limit = planned
    pipe = gsc.pipeline(split, M, "1f1b", cpu_devices(K), loss_reduction="mean")
    assert pipe.remat == split.plan.remat
    value, grads = pipe.step(chain.x)
    assert_matches(value, grads, split.value_and_gradients(chain.x), TOL, "split")
    assert_matches(value, grads, tape_value_and_gradients(chain.loss, split.variables,
                                                          [chain.x]), TOL, "tape")
    # measured: what the step kept alive per stage, with the recompute's residuals on top
    rows = split.summary(batch_size=MICRO)
    for k, row in enumerate(rows):
        again = split.plan.remat[k]
        held = row["variable_bytes"] + pipe.peak_live_residual_bytes[k] + (
            row["residual_bytes"] if again else 0)
        assert held <= limit, (k, held)
        if again:
            assert pipe.peak_live_residual_bytes[k] == _in_flight(k) * row[
                "remat_residual_bytes"]
    # an explicit remat= wins over the plan's
    assert gsc.pipeline(split, M, "1f1b", loss_reduction="mean", remat=False).remat == [
        False] * K


def test_train_steps_of_the_planned_pipeline_equal_the_optimizer_on_tape_gradients(chain):
    ref = _Chain(seed=3)
    model = _Chain(seed=3)
    split = model.auto_split(16_000)
    assert split.plan.remat == [True, True, False]
    pipe = gsc.pipeline(split, M, "1f1b", cpu_devices(K), loss_reduction="mean",
                        optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    assert pipe.remat == split.plan.remat
    optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
    rng = np.random.default_rng(4)
    start = [v.numpy() for v in ref.Ws]
    for _ in range(2):
        x = normal(rng, (M * MICRO, WIDTHS[0]), tf.float64)
        loss = pipe.train_step(x)
        with tf.GradientTape() as tape:
            want = ref.loss(tf.constant(x))
        optimizer.apply(tape.gradient(want, ref.Ws), ref.Ws)
        assert value_rel_error(loss, want) <= 1e-10
    pipe.write_back()
    for got, want, before in zip(model.Ws, ref.Ws, start):
        assert value_rel_error(got, want) <= 1e-10, got.name
        assert not np.allclose(want.numpy(), before), f"{got.name} did not move"


def test_a_limit_too_small_even_for_remat_names_the_stage_its_inputs_and_what_would_work(
        chain):
    with pytest.raises(GradSplitError, match=(
            r"memory_limit=1 bytes per stage cannot hold this program in 3 stages, even with "
            r"remat on the stages whose residuals do not fit \(a stage needs its variables \+ "
            r"residuals x micro-batches in flight; rematerialised, its variables \+ inputs x "
            r"micro-batches in flight \+ one micro-batch's residuals while its backward runs "
            r"the forward again\)\. Stage \d, ops '.*' to '.*', needs .* at best: its inputs "
            r"are .* per micro-batch with \d in flight, its residuals .* per micro-batch, its "
            r"variables .*\. The smallest limit that works is .*\((\d+) bytes\)\. Raise "
            r"memory_limit or ask for more stages")) as info:
        chain.auto_split(1)
    smallest = int(str(info.value).rsplit("(", 1)[1].split()[0])
    assert chain.auto_split(smallest).plan.remat  # it works, rematerialised
    with pytest.raises(GradSplitError, match=r"even with remat"):
        chain.auto_split(smallest - 64)


def test_a_stage_that_draws_random_numbers_is_never_rematerialised():
    chain = _Chain(random_at=4)  # in the second wide block
    split = chain.auto_split(16_000)
    g = split.graph
    drawing = {g.nodes[n]["stage"] for n in g.nodes if g.nodes[n]["op"] == "RandomUniform"}
    assert len(drawing) == 1 and any(split.plan.remat)
    assert not split.plan.remat[drawing.pop()]
    with pytest.raises(GradSplitError, match=r"Remat is ruled out for it: it assigns a variable "
                                             r"or draws random numbers"):
        chain.auto_split(14_000)  # the stage drawing them would need remat


def test_a_planned_remat_of_a_stage_xla_compiles_per_shape_is_refused_under_xla_and_runs_without(
        ):
    """A tf.cond in the first wide block (its gradient reads branch intermediates): the plan
    rematerialises that stage, which XLA compiles per input shape, so its backward cannot run
    the forward again inside one XLA program. The pipeline says so when it is made, naming the
    plan as the reason and what would work; without XLA the same plan runs and equals the
    tape."""
    rng = np.random.default_rng(5)
    Ws = [tf.Variable(normal(rng, (a, b), tf.float64, 0.4), name=f"W{i}")
          for i, (a, b) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:]))]

    def loss(x, flag):
        h = x
        for i, W in enumerate(Ws):
            h = tf.tanh(h @ W)
            if i == 1:
                h = tf.cond(flag, lambda h=h: tf.tanh(h), lambda h=h: tf.sin(h) * h)
        return tf.reduce_mean(tf.reduce_sum(h ** 2, axis=1))

    split = gsc.auto_split(loss, [tf.TensorSpec([None, WIDTHS[0]], tf.float64),
                                  tf.TensorSpec([], tf.bool)], K, batch_size=MICRO,
                           microbatches=M, memory_limit=16_000)
    assert split.plan.remat == [True, False, False]
    assert [stage.compiles_per_shape for stage in split.stages] == [True, False, False]
    with pytest.raises(GradSplitError, match=r"remat for stage 0 is the plan's choice "
                                             r"\(auto_split's memory_limit\), but stage 0 holds "
                                             r"a tf\.cond whose gradient reads branch "
                                             r"intermediates.* Give split's input_signature a "
                                             r"fixed batch size, pass remat=\[\] \(the plan's "
                                             r"other stages\) and more memory, plan with a "
                                             r"larger memory_limit, or use jit_compile=False"):
        gsc.pipeline(split, M, "1f1b", cpu_devices(K), loss_reduction="mean")
    pipe = gsc.pipeline(split, M, "1f1b", cpu_devices(K), loss_reduction="mean",
                        jit_compile=False)
    assert pipe.remat == [True, False, False]
    x = tf.constant(normal(rng, (M * MICRO, WIDTHS[0]), tf.float64))
    for flag in (True, False):
        args = [x, tf.constant(flag)]
        value, grads = pipe.step(*args)
        assert_matches(value, grads, tape_value_and_gradients(loss, split.variables, args),
                       TOL, f"flag {flag}")


@pytest.mark.parametrize("seed", range(3))
def test_interval_min_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = 57
    values = rng.normal(size=n)
    values[rng.random(n) < 0.2] = np.inf
    ends = np.minimum(np.arange(n) + rng.integers(0, 20, n), n - 1)
    best, arg = autosplit._interval_min(values, ends)
    for i in range(n):
        options = [j for j in range(n) if j < i <= ends[j] and np.isfinite(values[j])]
        if not options:
            assert arg[i] == -1 and best[i] == np.inf
        else:
            j = min(options, key=lambda j: (values[j], j))
            assert (arg[i], best[i]) == (j, values[j])
