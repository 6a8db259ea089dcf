"""Run ``gsc.pipeline`` on a ``LocalCluster`` and print the results as one JSON line.

Run by tests/run/test_cluster.py in a subprocess of its own: connecting to a cluster changes
the eager context of the whole process, which the pytest processes must not see.

    python tests/run/cluster_driver.py exact WORKERS   # 1F1B, GPipe (2 workers: ZB-H1 with
                                                       # remat too) against the tape
    python tests/run/cluster_driver.py fault           # SIGKILL/SIGSTOP a worker mid-step

Every step is compared with ``tf.GradientTape`` on the original function in this process
(tests/models.py: the tape, the relative error), at the weights the step ran with: before
every step but the first, the weights get new random values, so a task computing with a stale
copy of a variable is caught.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pathlib import Path

import numpy as np
import tensorflow as tf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: models.py

from models import (  # noqa: E402
    max_rel_error,
    move_weights,
    tape_value_and_gradients,
    value_rel_error,
)

import gradsplit_compiler as gsc  # noqa: E402
from gradsplit_compiler import zoo  # noqa: E402
from gradsplit_compiler.run import engine  # noqa: E402
from gradsplit_compiler.run.cluster import LocalCluster  # noqa: E402

BATCH = 16
CUTS = {2: ["c2"], 3: ["c1", "c2"], 4: ["c1", "c2", "c3"]}


def zoo_model(seed: int = 0):
    """``zoo.skip_net``: four layers, a skip from the input to layer 3 and from layer 1 to the
    loss, ``W2`` shared by layers 2 and 3 (float64), and two arguments every micro-batch gets
    whole (``scale``, a scalar, and ``shift``, of fixed leading dimension). Weights, then
    arguments, from one stream."""
    rng = np.random.default_rng(seed)
    case = zoo.skip_net("mean", replicated=True, batch=BATCH, seed=rng)
    return case.fn, case.input_signature, case.args(rng)


def max_error(result, reference) -> float:
    """The largest relative error of ``result = (value, grads)`` against ``reference``."""
    (value, grads), (ref_value, ref_grads) = result, reference
    return max(value_rel_error(value, ref_value), max_rel_error(grads, ref_grads))


def checked_steps(pipe, fn, split, args, steps: int, seed) -> tuple[list[float], list[float]]:
    """``steps`` calls of ``pipe.step``, the weights (and the batched arguments) redrawn
    before each but the first; per step, the relative error against the tape on ``fn`` at
    those weights, and how far the tape's gradients moved since the previous step."""
    rng = np.random.default_rng(seed)
    errors, moved, previous = [], [], None
    for step in range(steps):
        if step:
            move_weights(split.variables, rng)
            args = [tf.constant(rng.normal(size=a.shape)) if a.shape.rank and
                    a.shape[0] == BATCH else a for a in args]
        result = pipe.step(*args)
        reference = tape_value_and_gradients(fn, split.variables, args)
        errors.append(max_error(result, reference))
        if previous is not None:
            moved.append(max_rel_error(previous, reference[1]))
        previous = reference[1]
    return errors, moved


def boundary_bytes(split) -> int:
    """Bytes of every stage input that another stage produces, for the whole batch."""
    total = 0
    for stage in split.stages:
        for name, spec in zip(stage.inputs, stage.input_specs):
            if name not in split.arg_names:
                shape = [BATCH if d is None else d for d in spec.shape]
                total += int(np.prod(shape)) * spec.dtype.size
    return total


def unchanged(before, variables) -> bool:
    """Whether every variable still holds its value in ``before``."""
    return all(np.array_equal(b, v.numpy()) for b, v in zip(before, variables))


def step_under_fault(pipe, args, variables, fault: threading.Timer) -> dict:
    """One ``pipe.step`` while ``fault`` (started here) harms a task: what the step raised
    (type, message, seconds after the start) or ``raised: None``, and whether
    ``variables`` kept their values."""
    before = [v.numpy() for v in variables]
    fault.start()
    t0 = time.perf_counter()
    try:
        pipe.step(*args)
        result = {"raised": None}
    except Exception as exc:
        result = {"raised": type(exc).__name__, "message": str(exc),
                  "seconds": time.perf_counter() - t0}
    fault.join()
    result["variables_unchanged"] = unchanged(before, variables)
    return result


def exact(workers: int) -> dict:
    out: dict = {"workers": workers, "runs": []}
    with LocalCluster(workers) as cluster:
        devices = cluster.connect()
        out["devices"] = devices
        fn, signature, args = zoo_model()
        split = gsc.split(fn, signature, CUTS[workers])
        plans = [("1f1b", 4, True, False), ("gpipe", 2, True, False)]
        if workers == 2:
            plans.append(("1f1b", 4, False, False))  # plain graph functions on the tasks
            # B and W on the tasks, stage 0 rematerialised (its B runs its forward again)
            plans.append(("zb-h1", 4, True, [True, False]))
        for i, (schedule, m, jit, remat) in enumerate(plans):
            pipe = gsc.pipeline(split, m, schedule, devices=devices, loss_reduction="mean",
                                timeout=60, jit_compile=jit, remat=remat)
            errors, moved = checked_steps(pipe, fn, split, args, 3, seed=[workers, i])
            # one more step at the same weights: it must leave them as they are
            before = [v.numpy() for v in split.variables]
            result = pipe.step(*args)
            placed = sorted({e.device for e in pipe.timeline()})
            out["runs"].append({
                "schedule": schedule, "microbatches": m, "jit_compile": jit, "remat": remat,
                "kinds": sorted({e.kind for e in pipe.timeline()}),
                "step_errors": errors, "gradients_moved": moved,
                "value_device": result[0].device, "bytes_moved": pipe.bytes_moved(),
                "devices_used": placed,
                "variables_unchanged": unchanged(before, split.variables),
            })
        out["boundary_bytes"] = boundary_bytes(split)
    return out


# -- fault: workers killed (SIGKILL) or frozen (SIGSTOP) mid-step -----------------------------

FAULT_TIMEOUT = 60  # a kill must be detected well before this, not timed out
STOP_TIMEOUT = 8
KILL_DELAY = 0.05  # seconds between the engine starting the action and the kill
# (action kind, stage, micro-batch, jit_compile): stage k runs on task k, which is killed.
# In 1F1B over 2 stages and 2 micro-batches, device 0 runs F0 F1 B0 B1 and device 1 runs
# F0 B0 F1 B1: each killed action comes after a forward of its stage assigned a variable.
KILLS = [("F", 1, 1, True), ("F", 0, 1, False), ("B", 1, 0, False), ("B", 0, 0, True)]


class AssigningModel:
    """Two stages cut at ``h`` (float64), each of whose forwards assigns a variable of the
    program, as batch normalisation keeps its statistics: stage 0 a running mean of its
    hidden layer, stage 1 a running mean square of its output and a count of the examples
    it saw. ``slow`` 600x600 matmuls in each stage, in the gradient (of weight on the loss
    1e-30), so that each forward and backward takes long enough for a kill to land in it.
    ``scale`` is an argument every micro-batch gets whole. Weights from ``seed``."""

    def __init__(self, seed: int, slow: int = 6):
        rng = np.random.default_rng(seed)
        self.w0 = tf.Variable(rng.normal(size=(4, 4)) * 0.5, name="w0")
        self.w1 = tf.Variable(rng.normal(size=(4, 2)) * 0.5, name="w1")
        self.mean = tf.Variable(rng.normal(size=(4,)) * 0.1, trainable=False,
                                name="running_mean")
        self.square = tf.Variable(1.0 + rng.random((2,)), trainable=False,
                                  name="running_square")
        self.seen = tf.Variable(rng.integers(1, 100) * 1.0, dtype=tf.float64,
                                trainable=False, name="examples_seen")
        self.written = [self.mean, self.square, self.seen]
        self.slow = slow
        self.signature = [tf.TensorSpec([None, 4], tf.float64),
                          tf.TensorSpec([None, 2], tf.float64),
                          tf.TensorSpec([], tf.float64)]
        self.args = [tf.constant(rng.normal(size=(BATCH, 4))),
                     tf.constant(rng.normal(size=(BATCH, 2))), tf.constant(1.5, tf.float64)]

    def _busy(self, w):
        """1e-30 times the sum of ``slow`` chained 600x600 matmuls of a tiling of ``w``."""
        b = tf.tile(w, [600 // w.shape[0], 600 // w.shape[1]]) * 0.01
        for _ in range(self.slow):
            b = tf.tanh(b @ b)
        return 1e-30 * tf.reduce_sum(b)

    def loss(self, x, y, scale):
        h = tf.tanh(x @ self.w0)
        self.mean.assign(0.9 * self.mean + 0.1 * tf.reduce_mean(h, axis=0))
        h = gsc.mark(h - self.mean + self._busy(self.w0), "h")
        out = h @ self.w1 * scale + self._busy(self.w1)
        self.square.assign(0.9 * self.square + 0.1 * tf.reduce_mean(out ** 2, axis=0))
        self.seen.assign_add(tf.cast(tf.shape(out)[0], tf.float64))
        out = out / tf.sqrt(self.square)
        return tf.reduce_mean(tf.reduce_sum((out - y) ** 2, axis=1))

    def split(self):
        return gsc.split(self.loss, self.signature, ["h"])


class KillDuring:
    """A context in which the pipeline engine, when it starts running ``kind`` of ``stage``
    on ``microbatch`` (counting that device's actions of that kind from entering), kills
    ``task`` of ``cluster`` ``KILL_DELAY`` seconds later, the action running, and records the
    time of the kill and the values of ``watched`` just before it.

    It wraps ``engine.run_reporting_xla_errors``, through which the engine runs every
    forward and backward; the device thread's name gives the device (stage ``d`` runs on
    device ``d`` here), the arguments the kind (a backward gets residuals and cotangents,
    two lists; a forward, tensors)."""

    def __init__(self, cluster, task, kind, stage, microbatch, watched):
        self.cluster, self.task = cluster, task
        self.target = (kind, stage, microbatch)
        self.watched = watched
        self.seen: dict = {}
        self.killed_at = None
        self.values_at_kill = None
        self.timer = None

    def _kill(self):
        self.values_at_kill = [v.numpy() for v in self.watched]
        self.killed_at = time.perf_counter()
        self.cluster.kill(self.task)

    def _run(self, fn, *args):
        device = int(threading.current_thread().name.rsplit("device", 1)[1])
        kind = "F" if all(isinstance(a, tf.Tensor) for a in args) else "B"
        count = self.seen[(kind, device)] = self.seen.get((kind, device), -1) + 1
        if (kind, device, count) == self.target and self.timer is None:
            self.timer = threading.Timer(KILL_DELAY, self._kill)
            self.timer.start()
        return self.real(fn, *args)

    def __enter__(self):
        self.real = engine.run_reporting_xla_errors
        engine.run_reporting_xla_errors = self._run
        return self

    def __exit__(self, *exc):
        engine.run_reporting_xla_errors = self.real
        if self.timer is not None:
            self.timer.join()


def killed_step(pipe, args, variables, fault: KillDuring) -> dict:
    """One ``pipe.step`` under ``fault``: what it raised, how long after the kill, whether
    ``variables`` kept their values and whether the step had assigned them when the task
    died."""
    before = [v.numpy() for v in variables]
    watched = [v.numpy() for v in fault.watched]
    t0 = time.perf_counter()
    try:
        with fault:
            pipe.step(*args)
        result = {"raised": None}
    except Exception as exc:
        now = time.perf_counter()
        result = {"raised": type(exc).__name__, "message": str(exc), "seconds": now - t0,
                  "after_kill": None if fault.killed_at is None else now - fault.killed_at}
    result["killed"] = fault.killed_at is not None
    result["variables_unchanged"] = unchanged(before, variables)
    if fault.values_at_kill is not None:  # had the step assigned them when the task died?
        result["assigned_before_kill"] = not all(
            np.array_equal(b, k) for b, k in zip(watched, fault.values_at_kill))
    return result


def clusters(count: int):
    """``count`` clusters of 2 workers, one after the other, each stopped when the next is
    taken (LocalCluster forks them from one starter: no TensorFlow import per cluster)."""
    for _ in range(count):
        with LocalCluster(2) as cluster:
            yield cluster


def warm_step(pipe, model) -> dict:
    """A step that compiles on the tasks; whether it changed the variables the program
    assigns (so that a failed step that kept its assignments would be seen)."""
    before = [v.numpy() for v in model.written]
    t0 = time.perf_counter()
    pipe.step(*model.args)
    return {"warm_step_s": time.perf_counter() - t0,
            "a_step_assigns": not unchanged(before, model.written)}


def fault() -> dict:
    """Each kill of KILLS on a cluster of its own (after a task dies, this process's calls
    to every task fail until it connects again). On the first, before its kill, task 1 is
    frozen (SIGSTOP) during a step, then resumed (SIGCONT). The second also runs the first
    cluster's argument tensors, then a pipeline of another program against the tape."""
    out: dict = {"kills": [], "cluster_seconds": []}
    model = split = None
    for i, ((kind, stage, microbatch, jit), cluster) in enumerate(
            zip(KILLS, clusters(len(KILLS)))):
        t0 = time.perf_counter()
        devices = cluster.connect()
        if i == 1:
            # The argument given whole to every micro-batch (scale) is the same tensor in
            # every step; TensorFlow keeps its copies on the dead cluster's tasks and fails
            # on them after reconnecting ("Unable to find the relevant tensor
            # remote_handle"). Recorded for the test, then the arguments are made anew.
            out["reused_arguments"] = step_under_fault(
                gsc.pipeline(split, 2, "1f1b", devices=devices, loss_reduction="mean",
                             timeout=FAULT_TIMEOUT),
                model.args, split.variables, threading.Timer(0.0, lambda: None))
            # A restarted cluster runs a new pipeline exactly.
            fn, signature, args = zoo_model()
            exact_split = gsc.split(fn, signature, CUTS[2])
            pipe = gsc.pipeline(exact_split, 4, "1f1b", devices=devices,
                                loss_reduction="mean", timeout=FAULT_TIMEOUT)
            out["restarted_step_errors"], _ = checked_steps(pipe, fn, exact_split, args, 2,
                                                            seed=7)
        # A new model on every cluster: a graph function (jit_compile=False) cannot read a
        # variable created before this process connected again.
        model = AssigningModel(seed=3 + i)
        split = model.split()
        pipe = gsc.pipeline(split, 2, "1f1b", devices=devices, loss_reduction="mean",
                            timeout=FAULT_TIMEOUT, jit_compile=jit)
        report = {"kind": kind, "stage": stage, "microbatch": microbatch, "jit_compile": jit,
                  **warm_step(pipe, model)}
        if i == 0:
            # A task that stops answering: SIGSTOP, caught by the timeout. The pipeline
            # under test shares the stages compiled by the warm step (compiling alone can
            # take longer than STOP_TIMEOUT on a loaded machine).
            frozen = gsc.pipeline(split, 2, "1f1b", devices=devices, loss_reduction="mean",
                                  timeout=STOP_TIMEOUT, jit_compile=jit)
            stopper = threading.Timer(0.2, cluster.kill, args=(1, signal.SIGSTOP))
            out["stopped"] = step_under_fault(frozen, model.args, split.variables, stopper)
            # resumed, the task answers again: the step before the kill runs as any other
            cluster.kill(1, signal.SIGCONT)
            out["resumed"] = warm_step(pipe, model)
        action = [e for e in pipe.timeline()
                  if (e.kind, e.stage, e.microbatch) == (kind, stage, microbatch)]
        report["action_s"] = action[0].end - action[0].start
        report.update(killed_step(pipe, model.args, split.variables,
                                  KillDuring(cluster, stage, kind, stage, microbatch,
                                             model.written)))
        out["kills"].append(report)
        out["cluster_seconds"].append(time.perf_counter() - t0)
    return out


def main() -> None:
    scenario = sys.argv[1]
    result = exact(int(sys.argv[2])) if scenario == "exact" else fault()
    print("RESULT " + json.dumps(result), flush=True)
    sys.stdout.flush()
    os._exit(0)  # threads stuck in calls to a dead task must not hold the exit


if __name__ == "__main__":
    main()
