"""Refusals of ``gsc.pipeline``, schedules and the cluster helpers: each test checks the
error type and quotes the words that tell the user what to do. Nothing here starts a
cluster: the ones that need worker processes are in test_cluster.py."""

from __future__ import annotations

import signal

import numpy as np
import pytest
import tensorflow as tf
from models import cpu_devices, mlp

import gradsplit_compiler as gsc
from gradsplit_compiler import GradSplitError
from gradsplit_compiler.run.cluster import LocalCluster, connect
from gradsplit_compiler.run.schedules import Action, gpipe_schedule, validate_schedule

F64 = tf.float64


@pytest.fixture(scope="module")
def two():
    case = mlp(depth=2)
    return case, gsc.split(case.fn, case.input_signature, ["h1"])


def _pipe(split, **kwargs):
    options = dict(microbatches=2, schedule="gpipe", loss_reduction="mean", jit_compile=False)
    options.update(kwargs)
    return gsc.pipeline(split, **options)


def test_pipeline_needs_a_split():
    with pytest.raises(GradSplitError, match=r"pipeline needs a gsc\.Split \(from gsc\.split\); "
                                             r"got function\."):
        gsc.pipeline(lambda x: x, microbatches=2, loss_reduction="mean")


def test_loss_reduction_says_mean_or_sum(two):
    _, split = two
    with pytest.raises(GradSplitError, match=r"say how fn reduces the losses of a batch, so that "
                                             r"the micro-batches add up to the full batch"):
        _pipe(split, loss_reduction=None)


@pytest.mark.parametrize("timeout", [0, -1.0, "60"])
def test_timeout_must_be_positive(two, timeout):
    _, split = two
    with pytest.raises(GradSplitError, match=r"timeout must be a positive number of seconds or "
                                             r"None; got "):
        _pipe(split, timeout=timeout)


def test_unknown_schedule_names_the_ones_that_exist(two):
    _, split = two
    with pytest.raises(GradSplitError, match=r"or a list with one list of Action\(kind, stage, "
                                             r"microbatch\) per device\."):
        _pipe(split, schedule="pipedream")


def test_a_schedule_that_is_not_a_list(two):
    _, split = two
    with pytest.raises(GradSplitError, match=r"a schedule is a list with one list of actions per "
                                             r"device; got "):
        _pipe(split, schedule=42)


def test_a_schedule_with_a_list_per_stage_missing(two):
    _, split = two
    with pytest.raises(GradSplitError, match=r"the schedule has 1 device lists, but the split has "
                                             r"2 stages: give one list per stage"):
        _pipe(split, schedule=gpipe_schedule(2, 2)[:1])


def test_a_schedule_entry_that_is_not_an_action(two):
    _, split = two
    schedule = gpipe_schedule(2, 2)
    schedule[0][0] = ("F", 0, 0, "extra")
    with pytest.raises(GradSplitError, match=r"is not an Action\(kind, stage, microbatch\)\."):
        _pipe(split, schedule=schedule)


def test_an_action_of_an_unknown_kind(two):
    _, split = two
    schedule = gpipe_schedule(2, 2)
    schedule[0][0] = Action("X", 0, 0)
    with pytest.raises(GradSplitError, match=r"use 'F' \(forward\), 'B' \(backward\) or 'W' "
                                             r"\(the weight gradients of a split backward, "
                                             r"after its B\)\."):
        _pipe(split, schedule=schedule)


def test_an_action_out_of_range(two):
    _, split = two
    schedule = gpipe_schedule(2, 2)
    schedule[0][0] = Action("F", 0, 7)
    with pytest.raises(GradSplitError, match=r"microbatch must be an int in \[0, 2\); got 7"):
        _pipe(split, schedule=schedule)


def test_an_action_on_another_stages_device(two):
    _, split = two
    schedule = gpipe_schedule(2, 2)
    schedule[0].append(schedule[1].pop())
    with pytest.raises(GradSplitError, match=r"list k holds the actions of stage k only\."):
        _pipe(split, schedule=schedule)


def test_an_action_listed_twice(two):
    _, split = two
    schedule = gpipe_schedule(2, 2)
    schedule[0].append(schedule[0][0])
    with pytest.raises(GradSplitError, match=r"is listed twice: .* Each action runs exactly "
                                             r"once\."):
        _pipe(split, schedule=schedule)


def test_an_action_never_run(two):
    _, split = two
    schedule = gpipe_schedule(2, 2)
    schedule[1].remove(Action("B", 1, 1))
    with pytest.raises(GradSplitError, match=r"the schedule never runs .*; device 1 must run the "
                                             r"forward and the backward of stage 1 on every "
                                             r"micro-batch\."):
        _pipe(split, schedule=schedule)


def test_a_backward_before_its_forward(two):
    _, split = two
    schedule = gpipe_schedule(2, 2)
    schedule[1].remove(Action("B", 1, 0))
    schedule[1].insert(0, Action("B", 1, 0))
    with pytest.raises(GradSplitError, match=r"a backward needs the residuals of its forward\."):
        _pipe(split, schedule=schedule)


def test_a_deadlocked_schedule_says_move_the_awaited_actions(two):
    _, split = two
    schedule = gpipe_schedule(2, 2)
    # stage 0 waits for stage 1's backward of micro-batch 0 before its forward of 1, while
    # stage 1 runs both forwards first
    schedule[0] = [Action("F", 0, 0), Action("B", 0, 0), Action("F", 0, 1), Action("B", 0, 1)]
    schedule[1] = [Action("F", 1, 0), Action("F", 1, 1), Action("B", 1, 0), Action("B", 1, 1)]
    with pytest.raises(GradSplitError, match=r"the schedule deadlocks when each device runs its "
                                             r"list in order: .* Move the awaited actions earlier "
                                             r"on their devices"):
        validate_schedule(schedule, split, microbatches=2)


def test_schedule_counts_must_be_positive():
    with pytest.raises(GradSplitError, match=r"the number of stages must be a positive int; got"):
        gpipe_schedule(0, 2)


def test_devices_must_be_a_list(two):
    _, split = two
    with pytest.raises(GradSplitError, match=r"devices must be a list of device names, one per "
                                             r"stage \(e\.g\. \['/CPU:0', '/CPU:1'\]\); got "):
        _pipe(split, devices="/CPU:0")


def test_fewer_devices_than_stages(two):
    _, split = two
    with pytest.raises(GradSplitError, match=r"give one device per stage \(a name may repeat\), "
                                             r"or devices=None to run every stage on the "):
        _pipe(split, devices=["/CPU:0"])


@pytest.mark.parametrize("name", ["/job:worker/task:x", "not//a/device:::"])
def test_a_malformed_device_name(two, name):
    _, split = two
    with pytest.raises(GradSplitError, match=r"is not a device name: "):
        _pipe(split, devices=[name, name])


def test_a_device_that_does_not_exist(two):
    _, split = two
    with pytest.raises(GradSplitError, match=r"More CPU devices come from "
                                             r"tf\.config\.set_logical_device_configuration "
                                             r"before TensorFlow starts\."):
        _pipe(split, devices=["/CPU:0", "/CPU:99"])


def test_batched_arguments_of_different_sizes_in_a_step(two):
    case, split = two
    x, t = case.args()
    with pytest.raises(GradSplitError, match=r"have different batch sizes: .*; they must share "
                                             r"one batch size\."):
        _pipe(split).step(x, t[:4])


def test_a_batch_the_microbatches_do_not_divide(two):
    case, split = two
    x, t = case.args()  # a batch of 5
    with pytest.raises(GradSplitError, match=r"a batch of 5 does not cut into 2 equal "
                                             r"micro-batches; use a number of micro-batches that "
                                             r"divides it \(1, 5\) or a batch that 2 divides\."):
        _pipe(split).step(x, t)


def test_the_timeline_before_any_step(two):
    _, split = two
    with pytest.raises(GradSplitError, match=r"no step has run yet: call step\(\*args\) first\."):
        _pipe(split).timeline()


def test_an_assigned_variable_read_on_two_devices_under_xla():
    W = tf.Variable(np.linspace(0.1, 0.9, 9).reshape(3, 3), name="W_shared")
    calls = tf.Variable(tf.zeros([], F64), name="calls")

    @tf.function
    def loss(x):
        calls.assign_add(tf.ones([], F64))
        h = gsc.mark(tf.tanh(x @ W) * calls, "h")
        return tf.reduce_mean(tf.sin(h @ W) * calls)

    split = gsc.split(loss, [tf.TensorSpec([None, 3], F64)], ["h"])
    devices = cpu_devices(2)  # fails, never skips, without them
    with pytest.raises(GradSplitError, match=r"is assigned by the program and read by 2 stages; "
                                             r".* and XLA cannot read across devices\. Create it "
                                             r"under `with tf\.device\("):
        gsc.pipeline(split, microbatches=1, schedule="gpipe", loss_reduction="mean",
                     devices=devices, jit_compile=True)


def test_step_inside_a_tf_function_is_refused(two):
    case, split = two
    pipe = _pipe(split, microbatches=1)

    # autograph=False: with autograph, TensorFlow re-raises an error from traced user code
    # as its own StagingError (our message inside); the refusal itself is the same.
    @tf.function(autograph=False)
    def train(x, t):
        return pipe.step(x, t)[0]

    with pytest.raises(GradSplitError,
                       match=r"pipeline\.step was called inside a tf\.function.*Call step\(\) "
                             r"from plain Python"):
        train(*case.args())


# -- the cluster helpers, without starting a cluster ------------------------------------------


def test_connect_without_a_spec_or_tf_config(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(GradSplitError, match=r"connect\(\) got no cluster_spec and TF_CONFIG is "
                                             r"not set; pass a tf\.train\.ClusterSpec or "
                                             r"\{'worker': \['host:port', \.\.\.\]\}, or set "
                                             r"TF_CONFIG"):
        connect()


@pytest.mark.parametrize("n", [0, -1, 1.5, "2"])
def test_a_local_cluster_needs_a_positive_number_of_workers(n):
    with pytest.raises(GradSplitError, match=r"num_workers must be a positive int; got "):
        LocalCluster(n)


def test_a_worker_that_never_starts_says_raise_start_timeout():
    # a worker imports TensorFlow before it serves: far longer than a millisecond
    with pytest.raises(GradSplitError, match=r"worker tasks \[0\] did not start within 0\.001 "
                                             r"s; raise start_timeout or check that TensorFlow "
                                             r"imports\."):
        LocalCluster(1, start_timeout=0.001)


def test_a_worker_that_exits_before_serving():
    # a Python that cannot start (no standard library) exits at once
    with pytest.raises(GradSplitError, match=r"worker task 0 \(localhost:\d+\) exited with code "
                                             r"\d+ before its server started\."):
        LocalCluster(1, env={"PYTHONHOME": "/nonexistent", "PATH": "/usr/bin:/bin"},
                     start_timeout=60)


def test_connect_to_a_local_cluster_whose_worker_died():
    with LocalCluster(1, start_timeout=120) as cluster:
        cluster.processes[0].kill()
        assert cluster.processes[0].wait(30) == -signal.SIGKILL
        with pytest.raises(GradSplitError, match=r"cannot connect: worker tasks \[0\] are not "
                                                 r"running\."):
            cluster.connect()


@pytest.mark.parametrize("options, why", [
    ({}, r"it needs optimizer= \(train_step runs as one program; step\(\) runs per action\)"),
    ({"devices": ["/CPU:0", "/CPU:1"], "optimizer": "sgd"},
     "the stages run on several devices"),
    ({"devices": ["/CPU:0"] * 2, "optimizer": "sgd", "remat": True},
     "remat= keeps a stage's residuals small by running its forward again"),
])
def test_one_program_where_it_does_not_apply(two, options, why):
    import keras

    _, split = two
    if options.get("optimizer"):
        options = dict(options, optimizer=keras.optimizers.SGD(0.1))
    with pytest.raises(GradSplitError, match=r"one_program=True runs a training step as one "
                                             r"program on the one device that holds every "
                                             r"stage, but " + why) as e:
        _pipe(split, one_program=True, **options)
    assert "Leave one_program unset (None) to use it only where it applies." in str(e.value)
    with pytest.raises(GradSplitError, match=r"a grid of devices sums each stage's gradients "
                                             r"over its replicas between the schedule and the "
                                             r"update. Leave one_program unset for a grid"):
        _pipe(split, one_program=True, devices=[["/CPU:0", "/CPU:1"], ["/CPU:2", "/CPU:3"]])
    with pytest.raises(GradSplitError, match=r"one_program must be True, False or None "
                                             r"\(decide by the devices\); got 'yes'"):
        _pipe(split, one_program="yes")


def test_simulating_a_step_that_ran_as_one_program(two):
    import keras

    case, split = two
    pipe = _pipe(split, devices=["/CPU:0"] * 2, optimizer=keras.optimizers.SGD(0.1))
    pipe.train_step(*case.make_args(np.random.default_rng(5), 4))
    assert [e.kind for e in pipe.timeline()] == ["S"]
    with pytest.raises(GradSplitError, match=r"the last step ran as one program \(every stage "
                                             r"on one device, see one_program=\): it has no "
                                             r"time per action to simulate from"):
        pipe.simulate()
    predicted = pipe.simulate({"F": 1.0, "B": 2.0}, latency=0.0)
    # the schedule per action, as the stages would run apart: GPipe's (M + K - 1)(F + B)
    assert predicted.step_time == pytest.approx((2 + 2 - 1) * (1.0 + 2.0))
