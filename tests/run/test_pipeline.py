"""``gsc.pipeline``: micro-batched GPipe and 1F1B over stages on their own devices.

Every step is checked against ``tf.GradientTape`` on the original function over the whole
batch (the oracle: never the library against itself), in float64 within 1e-12, on a model
whose skip connections cross stages, whose variable ``W2`` is shared between stages and which
takes two arguments every micro-batch gets whole (``scale``, a scalar, and ``shift``, of fixed
leading dimension). Multi-step tests give the weights new random values before every step, so
a stale replica on any device gives a wrong gradient. Splits and their XLA programs are built
once per module (compiles dominate); every result is compared with the tape at the weights it
was computed with. The devices are the four logical CPUs tests/conftest.py configures: a test
that needs them fails, never skips, when they are missing.
"""

import json
import re

import numpy as np
import pytest
import tensorflow as tf
from models import (
    NUM_CPU_DEVICES,
    RTOL,
    assert_matches,
    cpu_devices,
    max_rel_error,
    move_weights,
    tape_value_and_gradients,
)

import gradsplit_compiler as gsc
from gradsplit_compiler import zoo
from gradsplit_compiler.run.schedules import (
    Action,
    gpipe_schedule,
    one_f_one_b_schedule,
    schedule_dependencies,
    validate_schedule,
)

TOL = RTOL[tf.float64]
BATCH = 16  # divisible by every M below: 1, 2, 4, 8, 16
CUTS = {2: ["c2"], 4: ["c1", "c2", "c3"]}
SCHEDULES = ["gpipe", "1f1b"]
CASES = [(k, m) for k in (2, 4) for m in (1, k, 4 * k)]


def _devices(k):
    return cpu_devices(k)


# GPipe with the backwards in reverse micro-batch order, as plain tuples: a schedule that is
# neither built-in one.
def _custom_schedule(k, m):
    return [[("F", s, i) for i in range(m)] + [("B", s, i) for i in reversed(range(m))]
            for s in range(k)]


# -- the model ----------------------------------------------------------------------------------


def _model(reduction: str, seed: int = 0):
    """``zoo.skip_net``: four layers, a skip from the input to layer 3, a skip from layer 1 to
    the loss, and ``W2`` used by layers 2 and 3; ``scale`` (a scalar) and ``shift`` (fixed
    leading dimension) are replicated to every micro-batch. Weights, then arguments, from one
    stream."""
    rng = np.random.default_rng(seed)
    case = zoo.skip_net(reduction, replicated=True, batch=BATCH, seed=rng)
    return case, case.args(rng)


class _Bench:
    """Splits and stepped pipelines, each built once, with the tape's answer at the weights
    each step ran with."""

    def __init__(self):
        self.splits, self.stepped = {}, {}

    def split(self, k, reduction="mean"):
        if (k, reduction) not in self.splits:
            case, args = _model(reduction)
            split = gsc.split(case.fn, case.input_signature, CUTS[k])
            self.splits[(k, reduction)] = (split, args, case)
        split, args, _ = self.splits[(k, reduction)]
        return split, args

    def fn(self, k, reduction="mean"):
        self.split(k, reduction)
        return self.splits[(k, reduction)][2].fn

    def tape(self, k, reduction="mean", args=None):
        """The tape's ``(value, grads)`` on the original function, whole batch, now."""
        split, default_args = self.split(k, reduction)
        return tape_value_and_gradients(self.fn(k, reduction), split.variables,
                                        default_args if args is None else args)

    def step(self, k, m, schedule, reduction="mean"):
        """``(pipeline, value, grads, tape)`` after one step on ``k`` devices."""
        key = (k, m, schedule, reduction)
        if key not in self.stepped:
            split, args = self.split(k, reduction)
            pipe = gsc.pipeline(split, microbatches=m, schedule=schedule, devices=_devices(k),
                                loss_reduction=reduction)
            value, grads = pipe.step(*args)
            self.stepped[key] = (pipe, value, grads, self.tape(k, reduction))
        return self.stepped[key]


@pytest.fixture(scope="module")
def bench():
    return _Bench()


def _assert_matches(value, grads, reference, what=""):
    assert_matches(value, grads, reference, TOL, what)


def test_conftest_gives_four_logical_cpu_devices():
    """tests/conftest.py splits the CPU before TensorFlow starts; without it every
    multi-device test below fails (not skips)."""
    assert len(tf.config.list_logical_devices("CPU")) >= NUM_CPU_DEVICES


# -- the result equals the tape on the whole batch ------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("k,m", CASES, ids=[f"K{k}-M{m}" for k, m in CASES])
def test_step_equals_the_tape_on_the_whole_batch(bench, k, m, schedule, reduction):
    _, value, grads, tape = bench.step(k, m, schedule, reduction)
    _assert_matches(value, grads, tape)


def test_step_equals_the_library_s_own_full_batch_result_too(bench):
    """Beside the tape: ``split.value_and_gradients`` on the whole batch (the composition
    without micro-batches) gives the same, so a difference is the pipeline's own."""
    split, args = bench.split(4)
    pipe, _, _, _ = bench.step(4, 4, "1f1b")
    value, grads = pipe.step(*args)
    _assert_matches(value, grads, split.value_and_gradients(*args))
    _assert_matches(value, grads, bench.tape(4))


def test_step_on_the_default_device_equals_the_tape(bench):
    split, args = bench.split(4)
    pipe = gsc.pipeline(split, microbatches=4, schedule="1f1b", loss_reduction="mean")
    value, grads = pipe.step(*args)
    _assert_matches(value, grads, bench.tape(4))
    assert len(set(pipe.devices)) == 1 and pipe.devices[0].endswith("device:CPU:0")


@pytest.mark.parametrize("schedule", [*SCHEDULES, "custom"])
@pytest.mark.parametrize("k,m", [(2, 4), (4, 4)], ids=["K2-M4", "K4-M4"])
def test_every_step_equals_the_tape_at_new_weights(bench, k, m, schedule):
    """Three steps, new random weights and arguments before each: each step equals the tape
    at the weights it ran with. A replica on another device that was not refreshed, or
    refreshed from the previous step, fails here (the gradients move by O(1) between steps,
    checked)."""
    split, args = bench.split(k)
    plan = _custom_schedule(k, m) if schedule == "custom" else schedule
    pipe = gsc.pipeline(split, m, plan, _devices(k), loss_reduction="mean")
    rng = np.random.default_rng([k, m, len(schedule)])
    previous = None
    for step in range(3):
        move_weights(split.variables, rng)
        x = tf.constant(rng.normal(size=(BATCH, 4)))
        step_args = [x, *args[1:]]
        value, grads = pipe.step(*step_args)
        tape = bench.tape(k, args=step_args)
        _assert_matches(value, grads, tape, f"step {step}")
        if previous is not None:
            assert max_rel_error(previous, tape[1]) > 1e-2, "the weights did not move"
        previous = tape[1]


@pytest.mark.parametrize("scale", [0.5, -2.0])
def test_arguments_given_whole_to_every_microbatch_are_not_cut(bench, scale):
    """``scale`` and ``shift`` (no batch dimension) reach every micro-batch whole: another
    ``scale`` and ``shift`` give the tape's answer for those."""
    split, (x, y, _, shift) = bench.split(4)
    args = [x, y, tf.constant(scale, tf.float64), shift * scale]
    pipe, _, _, _ = bench.step(4, 4, "1f1b")
    value, grads = pipe.step(*args)
    _assert_matches(value, grads, bench.tape(4, args=args))


def test_stages_run_on_their_devices(bench):
    pipe, _, _, _ = bench.step(4, 4, "gpipe")
    assert [d.rsplit("/", 1)[-1] for d in pipe.devices] == [f"device:CPU:{d}" for d in range(4)]
    assert {(e.device_index, e.stage, e.device) for e in pipe.timeline()} == {
        (d, d, pipe.devices[d]) for d in range(4)}


def test_user_schedule_list_gives_the_tape_s_result(bench):
    split, args = bench.split(2)
    pipe = gsc.pipeline(split, 2, _custom_schedule(2, 2), _devices(2), loss_reduction="mean")
    value, grads = pipe.step(*args)
    _assert_matches(value, grads, bench.tape(2))
    assert pipe.schedule[0][2] == Action("B", 0, 1)


def test_pipeline_is_exported():
    assert {"pipeline", "Pipeline"} <= set(gsc.__all__)
    (split,) = _static_split()
    assert isinstance(gsc.pipeline(split, 1, loss_reduction="sum"), gsc.Pipeline)


# -- memory: live residual sets -------------------------------------------------------------------


@pytest.mark.parametrize("k,m", CASES, ids=[f"K{k}-M{m}" for k, m in CASES])
def test_1f1b_keeps_at_most_min_of_stages_left_and_microbatches(bench, k, m):
    pipe, _, _, _ = bench.step(k, m, "1f1b")
    assert pipe.peak_live_residuals == [min(k - s, m) for s in range(k)]


@pytest.mark.parametrize("k,m", CASES, ids=[f"K{k}-M{m}" for k, m in CASES])
def test_gpipe_keeps_every_microbatch(bench, k, m):
    pipe, _, _, _ = bench.step(k, m, "gpipe")
    assert pipe.peak_live_residuals == [m] * k


# -- schedules as data ----------------------------------------------------------------------------


def test_one_f_one_b_alternates_after_the_warm_up():
    first, last = one_f_one_b_schedule(2, 3)
    assert [str(a)[0] + str(a.microbatch) for a in first] == ["F0", "F1", "B0", "F2", "B1", "B2"]
    assert [str(a)[0] + str(a.microbatch) for a in last] == ["F0", "B0", "F1", "B1", "F2", "B2"]


def test_gpipe_runs_every_forward_before_any_backward():
    for actions in gpipe_schedule(3, 4):
        assert [a.kind for a in actions] == ["F"] * 4 + ["B"] * 4


@pytest.mark.parametrize("k", range(1, 7))
@pytest.mark.parametrize("m", range(1, 10))
def test_builtin_schedules_have_the_ideal_bubble(k, m):
    from gradsplit_compiler.run.schedules import Dependencies, ideal_idle_fraction

    chain = Dependencies([frozenset({s - 1} if s else ()) for s in range(k)],
                         [frozenset({s + 1} if s < k - 1 else ()) for s in range(k)])
    for make in (gpipe_schedule, one_f_one_b_schedule):
        assert ideal_idle_fraction(make(k, m), chain) == pytest.approx((k - 1) / (m + k - 1))


def test_dependencies_follow_skip_connections(bench):
    split, _ = bench.split(4)
    deps = schedule_dependencies(split)
    assert deps.forward == [set(), {0}, {1}, {0, 2}]  # stage 3 reads c1 from stage 0
    assert deps.backward == [{1, 3}, {2}, {3}, set()]  # c1's cotangent comes from 1 and 3


def _mutated(mutate, k=4, m=2):
    schedule = [list(actions) for actions in one_f_one_b_schedule(k, m)]
    mutate(schedule)
    return schedule


BAD_SCHEDULES = {
    "missing": (lambda s: s[1].remove(Action("B", 1, 1)),
                "never runs B(stage=1, microbatch=1)"),
    "twice": (lambda s: s[2].append(Action("F", 2, 0)),
              "F(stage=2, microbatch=0) is listed twice"),
    "backward_first": (lambda s: s[3].reverse(),
                       "B(stage=3, microbatch=1) comes before F(stage=3, microbatch=1)"),
    "wrong_device": (lambda s: s[0].append(s[1].pop()),
                     "B(stage=1, microbatch=1) is on device 0"),
    "microbatch_out_of_range": (lambda s: s[0].append(Action("F", 0, 2)),
                                "F(stage=0, microbatch=2) on device 0: microbatch"),
    "unknown_kind": (lambda s: s[0].append(("X", 0, 0)), "has kind 'X'"),
    "not_an_action": (lambda s: s[0].append("F00"), "'F00' on device 0 is not an Action"),
    "too_few_lists": (lambda s: s.pop(), "3 device lists, but the split has 4 stages"),
}


@pytest.mark.parametrize("name", sorted(BAD_SCHEDULES))
def test_bad_schedule_is_refused_naming_the_action(bench, name):
    mutate, message = BAD_SCHEDULES[name]
    split, _ = bench.split(4)
    with pytest.raises(gsc.GradSplitError, match=re.escape(message)):
        validate_schedule(_mutated(mutate), split, 2)
    with pytest.raises(gsc.GradSplitError, match=re.escape(message)):
        gsc.pipeline(split, 2, _mutated(mutate), loss_reduction="mean")


def test_deadlocking_schedule_is_refused_naming_the_stuck_actions(bench):
    split, _ = bench.split(2)
    # Device 0 wants B(0, 0) (after B(1, 0)) before F(0, 1); device 1 wants F(1, 1) first.
    schedule = [[("F", 0, 0), ("B", 0, 0), ("F", 0, 1), ("B", 0, 1)],
                [("F", 1, 1), ("F", 1, 0), ("B", 1, 0), ("B", 1, 1)]]
    with pytest.raises(gsc.GradSplitError, match="deadlocks") as info:
        validate_schedule(schedule, split, 2)
    assert "device 0 is stuck at B(stage=0, microbatch=0), waiting for B(stage=1, " \
           "microbatch=0)" in str(info.value)
    assert "device 1 is stuck at F(stage=1, microbatch=1), waiting for F(stage=0, " \
           "microbatch=1)" in str(info.value)


def test_validate_schedule_returns_actions(bench):
    split, _ = bench.split(2)
    checked = validate_schedule([[("F", 0, 0), ("B", 0, 0)], [("F", 1, 0), ("B", 1, 0)]],
                                split, 1)
    assert checked == [[Action("F", 0, 0), Action("B", 0, 0)],
                       [Action("F", 1, 0), Action("B", 1, 0)]]


# -- timeline -------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_timeline_has_every_action_once_in_its_device_order(bench, schedule):
    pipe, _, _, _ = bench.step(4, 4, schedule)
    events = pipe.timeline()
    assert len(events) == 2 * 4 * 4
    assert all(0 <= e.start <= e.end for e in events)
    for d in range(4):
        ran = [Action(e.kind, e.stage, e.microbatch) for e in events if e.device_index == d]
        assert ran == pipe.schedule[d]


def test_chrome_trace_is_json_with_one_complete_event_per_action(bench, tmp_path):
    pipe, _, _, _ = bench.step(4, 16, "1f1b")
    path = pipe.write_chrome_trace(tmp_path / "trace.json")
    with open(path) as f:
        trace = json.load(f)
    complete = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(complete) == 2 * 4 * 16
    assert {e["pid"] for e in trace["traceEvents"]} == {0}
    assert {e["tid"] for e in complete} == {0, 1, 2, 3}
    assert all(e["ts"] >= 0 and e["dur"] >= 0 for e in complete)
    assert {e["name"][0] for e in complete} == {"F", "B"}
    assert {e["args"]["stage"] for e in complete if e["tid"] == 2} == {2}


def test_plot_timeline_writes_a_png(bench, tmp_path):
    import matplotlib.image  # the test environment installs the render extra

    pipe, _, _, _ = bench.step(2, 8, "gpipe")
    path = pipe.plot_timeline(tmp_path / "timeline.png")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 400


@pytest.mark.parametrize("k,m", CASES, ids=[f"K{k}-M{m}" for k, m in CASES])
def test_idle_fraction_reports_the_ideal_beside_the_measured(bench, k, m):
    pipe, _, _, _ = bench.step(k, m, "1f1b")
    measured, ideal = pipe.idle_fraction()
    assert ideal == pytest.approx((k - 1) / (m + k - 1))
    assert 0.0 <= measured < 1.0


def test_timeline_before_any_step_is_an_error(bench):
    split, _ = bench.split(2)
    pipe = gsc.pipeline(split, 2, loss_reduction="mean")
    for ask in (pipe.timeline, lambda: pipe.peak_live_residuals, pipe.idle_fraction):
        with pytest.raises(gsc.GradSplitError, match="call step"):
            ask()


# -- bad input: GradSplitError, nothing run -------------------------------------------------------


def test_microbatches_that_do_not_divide_the_batch_run_nothing(bench):
    split, args = bench.split(2)
    pipe = gsc.pipeline(split, microbatches=3, loss_reduction="mean")
    before = [v.numpy().copy() for v in split.variables]
    with pytest.raises(gsc.GradSplitError, match="batch of 16 does not cut into 3 .*1, 2, 4, 8"):
        pipe.step(*args)
    with pytest.raises(gsc.GradSplitError, match="call step"):
        pipe.timeline()
    for v, b in zip(split.variables, before):
        np.testing.assert_array_equal(v.numpy(), b)


def test_batched_arguments_of_different_sizes_are_refused(bench):
    split, (x, y, scale, shift) = bench.split(2)
    pipe = gsc.pipeline(split, microbatches=2, loss_reduction="mean")
    with pytest.raises(gsc.GradSplitError, match="different batch sizes"):
        pipe.step(x, y[:8], scale, shift)


def test_fewer_devices_than_stages_is_refused(bench):
    split, _ = bench.split(4)
    with pytest.raises(gsc.GradSplitError, match="4 stages but only 2 devices"):
        gsc.pipeline(split, 4, devices=["/CPU:0", "/CPU:0"], loss_reduction="mean")


def test_a_device_that_does_not_exist_is_refused(bench):
    split, _ = bench.split(2)
    with pytest.raises(gsc.GradSplitError, match="'/CPU:99' does not exist"):
        gsc.pipeline(split, 2, devices=["/CPU:0", "/CPU:99"], loss_reduction="mean")


def test_unknown_schedule_is_refused_listing_the_known_ones(bench):
    split, _ = bench.split(2)
    with pytest.raises(gsc.GradSplitError, match="unknown schedule 'pipedream'.*'gpipe', '1f1b'"):
        gsc.pipeline(split, 2, "pipedream", loss_reduction="mean")


@pytest.mark.parametrize("reduction", [None, "avg"])
def test_loss_reduction_must_be_given_as_mean_or_sum(bench, reduction):
    split, _ = bench.split(2)
    with pytest.raises(gsc.GradSplitError, match="loss_reduction='mean'.*loss_reduction='sum'"):
        gsc.pipeline(split, 2, loss_reduction=reduction)


@pytest.mark.parametrize("m", [0, -1, 2.0, True])
def test_microbatches_must_be_a_positive_int(bench, m):
    split, _ = bench.split(2)
    with pytest.raises(gsc.GradSplitError, match="microbatches must be a positive int"):
        gsc.pipeline(split, m, loss_reduction="mean")


def _static_split():
    w = tf.Variable(np.ones((3, 1)))

    def fn(x):
        return tf.reduce_sum(gsc.mark(tf.tanh(x @ w), "h") ** 2)

    return (gsc.split(fn, [tf.TensorSpec([4, 3], tf.float64)], ["h"]),)


def test_microbatches_without_a_batch_dimension_are_refused():
    (split,) = _static_split()
    with pytest.raises(gsc.GradSplitError, match="no argument of fn has a batch dimension"):
        gsc.pipeline(split, 2, loss_reduction="sum")


def test_a_program_that_does_not_return_a_scalar_is_refused():
    w = tf.Variable(np.ones((3, 2)))

    def fn(x):
        return tf.tanh(gsc.mark(x @ w, "h"))

    split = gsc.split(fn, [tf.TensorSpec([None, 3], tf.float64)], ["h"])
    with pytest.raises(gsc.GradSplitError, match="one floating-point scalar"):
        gsc.pipeline(split, 2, loss_reduction="mean")


# -- failures and side effects --------------------------------------------------------------------


@pytest.fixture(scope="module")
def counting_split():
    """Stage 0 counts its runs in a variable; stage 1 fails on a non-finite value."""
    rng = np.random.default_rng(3)
    w = tf.Variable(rng.normal(size=(3, 3)))
    runs = tf.Variable(0.0, dtype=tf.float64)

    def fn(x):
        runs.assign_add(tf.constant(1.0, tf.float64))
        h = gsc.mark(tf.tanh(x @ w), "h")
        return tf.reduce_mean(tf.debugging.check_numerics(h @ w, "stage 1 saw a NaN") ** 2)

    split = gsc.split(fn, [tf.TensorSpec([None, 3], tf.float64)], ["h"])
    return split, runs, rng.normal(size=(8, 3)), fn


def test_assigned_variable_is_assigned_once_per_microbatch(counting_split):
    split, runs, x, _ = counting_split
    runs.assign(0.0)
    pipe = gsc.pipeline(split, 4, "gpipe", loss_reduction="mean", jit_compile=False)
    pipe.step(x)
    assert runs.numpy() == 4.0


def test_failure_in_one_device_stops_the_step_and_undoes_assignments(counting_split):
    split, runs, x, fn = counting_split
    runs.assign(10.0)
    bad = x.copy()
    bad[-1, 0] = np.nan  # only the last micro-batch fails, in stage 1
    pipe = gsc.pipeline(split, 4, "gpipe", loss_reduction="mean", jit_compile=False)
    with pytest.raises(tf.errors.InvalidArgumentError, match="stage 1 saw a NaN") as info:
        pipe.step(bad)
    assert "F(stage=1, microbatch=3)" in "".join(getattr(info.value, "__notes__", []))
    assert runs.numpy() == 10.0  # the four forwards of stage 0 were undone
    # The pipeline is still usable and exact afterwards.
    runs.assign(10.0)
    reference = tape_value_and_gradients(fn, split.variables, [tf.constant(x)])
    _assert_matches(*pipe.step(x), reference)


def test_assigned_variable_on_another_device_is_copied_back(counting_split):
    split, runs, x, _ = counting_split
    runs.assign(0.0)
    pipe = gsc.pipeline(split, 2, "1f1b", devices=_devices(3)[1:], loss_reduction="mean")
    pipe.step(x)
    assert runs.numpy() == 2.0
