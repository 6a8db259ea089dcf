"""Training state that lives on the tasks of a cluster: ``gsc.pipeline(..., optimizer=...)``
on a ``LocalCluster`` of 4 workers, against the same Keras optimizer on ``tf.GradientTape``
gradients of the original loss (float64, 20 steps, 1e-10); faults during training, then a
restarted cluster that resumes from a checkpoint and ends where an uninterrupted run ends.

Connecting changes the eager context of a whole process, so each test runs
``training_driver.py`` in a subprocess (one cluster per scenario stage, several
configurations each) and reads its JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import gradsplit_compiler as gsc

DRIVER = Path(__file__).with_name("training_driver.py")
TRAIN_TOL = 1e-10
RESUME_TOL = 1e-12
WIDTH = 8
PIPELINE_TIMEOUT = 60  # training_driver.resume's timeout= (but for the frozen task's 12 s)


def _drive(scenario: str, timeout: float = 600) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run([sys.executable, str(DRIVER), scenario], capture_output=True,
                          text=True, timeout=timeout, env=env)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"driver printed no result (exit {done.returncode}):\n{done.stderr[-3000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def test_train_steps_on_four_workers_equal_the_optimizer_on_tape_gradients():
    result = _drive("train")
    devices = result["devices"]
    assert len(devices) == 4 and all(d.startswith("/job:worker/") for d in devices)
    assert result["tied_stages"] == [0, 3]  # the embedding is read by the first and last
    runs = result["runs"]
    assert {r["optimizer"] for r in runs} == {"sgd-momentum", "adam", "adamw-schedule"}
    assert {r["schedule"] for r in runs} == {"gpipe", "1f1b"}
    assert any(r["clip"] for r in runs)
    for run in runs:
        assert run["iterations"] == 20, run
        assert run["loss_error"] < TRAIN_TOL, run
        assert run["variable_error"] < TRAIN_TOL, run
        assert run["moved_from_start"] > 1e-2, run  # the weights did move
        assert run["nontrainable_unchanged"], run
        assert run["user_variables_untouched"], run  # until write_back
        # every stage's copies live on its own task
        for k, placed in enumerate(run["copy_devices"]):
            assert placed and all(d == devices[k] for d in placed), (k, placed)
        moved = run["bytes_moved"]
        assert moved["replicas"] == 0, moved  # no variable values travel
        # gradients travel only for the tied variable, once each way between its devices
        assert moved["gradients"] == 2 * result["tied_bytes"], moved
        assert moved["results"] == 4 * 8, moved  # the four micro-batch losses
        assert 0 < moved["scalars"] <= 4 * (8 + 1 + 16), moved  # per device: norm, flag; scales
    clipped = next(r for r in runs if r["clip"])
    assert clipped["clipped_steps"] >= 10, clipped
    # a variable the program assigns (a running mean) lives on its stage's task
    assigned = result["assigned"]
    assert assigned["error"] < TRAIN_TOL, assigned
    assert assigned["mean_moved"] > 1e-3 and assigned["user_mean_untouched"], assigned
    assert assigned["mean_device"] == devices[0], assigned


def test_workers_killed_or_frozen_mid_training_then_resumed_from_a_checkpoint():
    result = _drive("resume")
    assert result["uninterrupted_moved"] > 1e-2

    # SIGKILL of task 2 during step 7, mid-schedule
    killed = result["killed"]
    assert killed["raised"] == "GradSplitError", killed
    assert "task 2 " in killed["message"] and "stage 2" in killed["message"], killed
    assert "no longer answers (it died or stopped answering)" in killed["message"]
    assert "restore its last checkpoint (pipeline.restore)" in killed["message"]
    # detected, not waited out: well under the pipeline's timeout (60 s), even under load
    assert killed["seconds"] < PIPELINE_TIMEOUT / 2, killed
    assert "within timeout" not in killed["message"], killed
    assert killed["user_variables_untouched"], killed
    # checkpoints every 3 steps, into the client's own memory filesystem (ram://): the
    # client wrote every shard, also those of copies held on the tasks
    assert killed["checkpoint"].startswith("ram://") and killed["checkpoint_step"] == 6

    # a new cluster, the pipeline built again, restored: ends where the uninterrupted run ends
    assert result["resumed_from"] == 6 and result["resumed_iterations"] == 12
    assert result["resumed_error"] <= RESUME_TOL, result
    assert result["load_variables_equal"]  # the plain model reads the same checkpoint

    # SIGSTOP of task 1 as the optimizer update starts: the pipeline's timeout gives up
    frozen = result["frozen"]
    assert frozen["raised"] == "GradSplitError", frozen
    message = frozen["message"]
    assert "the optimizer update of train_step did not finish within timeout=12" in message
    assert "task 1 " in message and "the update of stage 1 on task 1" in message, frozen
    assert "devices that finished may have applied their update" in message
    assert 11 < frozen["seconds"] < 30, frozen

    # restored again on another cluster; SIGKILL of task 3 as the update starts
    assert result["second_resume_error"] <= RESUME_TOL, result
    killed = result["killed_in_update"]
    assert killed["raised"] == "GradSplitError", killed
    assert "task 3 " in killed["message"] and "stage 3" in killed["message"], killed
    assert killed["seconds"] < PIPELINE_TIMEOUT / 2, killed
    assert "within timeout" not in killed["message"], killed


def test_a_checkpoint_in_a_memory_filesystem_restores_by_its_prefix():
    """``ram://`` has no directories; a prefix there is still read as a checkpoint."""
    rng = np.random.default_rng(31)
    w = tf.Variable(rng.normal(size=(WIDTH, WIDTH)), name="ram_w")
    v = tf.Variable(rng.normal(size=(WIDTH, 1)), name="ram_v")

    def loss(x):
        h = gsc.mark(tf.tanh(x @ w), "h")
        return tf.reduce_mean(tf.tanh(h @ v) ** 2)

    split = gsc.split(loss, [tf.TensorSpec([None, WIDTH], tf.float64)], cuts=["h"])
    make = lambda: gsc.pipeline(split, 2, "1f1b", ["/CPU:0", "/CPU:1"],  # noqa: E731
                                loss_reduction="mean", optimizer=keras.optimizers.Adam(0.05))
    xs = [rng.normal(size=(8, WIDTH)) for _ in range(4)]
    first = make()
    for x in xs[:2]:
        first.train_step(x)
    path = first.save("ram://gradsplit-tests/memory-ckpt")
    second = make()
    second.restore(path)
    assert second.iterations == 2
    for x in xs[2:]:
        first.train_step(x)
        second.train_step(x)
    for k in range(2):
        for a, b in zip(first.stage_variables(k), second.stage_variables(k)):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    moved = np.max(np.abs(first.stage_variables(0)[0].numpy() - w.numpy()))
    assert moved > 1e-3
    with pytest.raises(gsc.GradSplitError, match="cannot read a checkpoint at"):
        second.restore("ram://gradsplit-tests/no-such-checkpoint")


def test_a_two_by_two_grid_on_four_workers_trains_survives_a_kill_and_resumes():
    """2 stages x 2 replicas (stage 0 on tasks 0 and 2, stage 1 on tasks 1 and 3), each
    stage's gradients all-reduced between its two tasks by TensorFlow's collectives."""
    result = _drive("grid")
    devices = result["devices"]
    for name, run in result["runs"].items():
        assert run["iterations"] == 20, (name, run)
        assert run["loss_error"] < TRAIN_TOL and run["variable_error"] < TRAIN_TOL, run
        assert run["moved_from_start"] > 1e-2, run
        assert run["replicas_equal"], run  # bitwise
        assert run["copy_devices"] == [[[devices[0]], [devices[2]]],
                                       [[devices[1]], [devices[3]]]], run
        assert run["allreduce_events"] == [[0, 0], [1, 1], [2, 0], [3, 1]], run
        moved = run["bytes_moved"]
        assert moved["replicas"] == 0 and moved["allreduce"] > 0, moved

    # task 3 (stage 1 of replica 1) killed mid-training
    killed = result["killed"]
    assert killed["raised"] == "GradSplitError", killed
    message = killed["message"]
    # seen in replica 1's schedule or, when the kill lands after it, in the all-reduce that
    # follows (a race with the step): either way the task, its stage and its replica
    in_schedule = message.startswith("replica 1 of the grid failed (stage 0 on ") and \
        "stage 1 ran there" in message
    in_allreduce = "during the all-reduce of the gradients" in message and \
        "ran stage 1 of replica 1" in message
    assert in_schedule or in_allreduce, message
    assert "task 3 " in message, message
    assert "no longer answers (it died or stopped answering)" in message
    assert killed["seconds"] < PIPELINE_TIMEOUT / 2 and "within timeout" not in message

    # a new cluster, the grid built again and restored: the uninterrupted run's end
    assert result["resumed_from"] == killed["checkpoint_step"] > 0
    assert result["resumed_iterations"] == 20
    assert result["resumed_error"] <= RESUME_TOL, result

    # task 0 (stage 0 of replica 0) killed as the all-reduce starts
    killed = result["killed_in_allreduce"]
    assert killed["raised"] == "GradSplitError", killed
    assert ("no longer answers (it died or stopped answering) during the all-reduce of "
            "the gradients: task 0 of job 'worker'") in killed["message"], killed
    assert "ran stage 0 of replica 0" in killed["message"], killed
    assert killed["seconds"] < PIPELINE_TIMEOUT / 2, killed
