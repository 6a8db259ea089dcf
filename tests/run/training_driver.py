"""Train with ``gsc.pipeline(..., optimizer=...)`` on a ``LocalCluster``; print one JSON line.

Run by tests/run/test_cluster_training.py in a subprocess of its own: connecting to a cluster
changes the eager context of the whole process, which the pytest processes must not see.
Each scenario runs several configurations in one process, so that the suite starts few
clusters.

    python tests/run/training_driver.py train    # optimizers x schedules, clipping; 4 workers
    python tests/run/training_driver.py resume   # workers killed or frozen mid-training,
                                                 # restarted, restored from a checkpoint
    python tests/run/training_driver.py grid     # 2 stages x 2 replicas: trained, a worker
                                                 # killed, restored on a new cluster

The oracle is the tape: the same Keras optimizer applied to ``tf.GradientTape`` gradients of
the original loss on the whole batch, on the user's own variables (which the pipeline never
touches), in this process.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf
from tied_model import BATCH, OPTIMIZERS, WIDTH, TiedModel

import gradsplit_compiler as gsc
from gradsplit_compiler.run import training
from gradsplit_compiler.run.cluster import LocalCluster
from gradsplit_compiler.run.grid import GridPipeline

WORKERS = 4
STEPS = 20
ASSIGNED_STEPS = 6  # the running mean's placement and updates, not an optimizer's


class CountingModel:
    """Two stages; the first assigns a non-trainable running mean (as batch norm keeps its
    statistics), which the second does not read."""

    def __init__(self, seed: int = 17):
        rng = np.random.default_rng(seed)
        self.w0 = tf.Variable(rng.normal(size=(WIDTH, WIDTH)) * 0.4, name="w0")
        self.w1 = tf.Variable(rng.normal(size=(WIDTH, 1)) * 0.4, name="w1")
        self.mean = tf.Variable(np.zeros(WIDTH), trainable=False, name="running_mean")
        self.variables = [self.w0, self.w1, self.mean]

    def loss(self, x):
        h = tf.tanh(x @ self.w0)
        self.mean.assign(0.9 * self.mean + 0.1 * tf.reduce_mean(h, axis=0))
        h = gsc.mark(h - self.mean, "h")
        return tf.reduce_mean(tf.tanh(h @ self.w1) ** 2)


def batches(n: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(BATCH, WIDTH)), rng.normal(size=(BATCH, WIDTH)))
            for _ in range(n)]


def tape_training(model: TiedModel, optimizer, data, clip=None) -> tuple[list, list]:
    """The oracle, on the model's own trainable variables: the losses, and the global norm
    of each step's gradients (before clipping)."""
    trainable = [v for v in model.variables if v.trainable]
    losses, norms = [], []
    for x, y in data:
        with tf.GradientTape() as tape:
            loss = model.loss(tf.constant(x), tf.constant(y))
        grads = tape.gradient(loss, trainable)
        norms.append(float(tf.linalg.global_norm(grads)))
        if clip is not None:
            grads, _ = tf.clip_by_global_norm(grads, clip)
        optimizer.apply(grads, trainable)
        losses.append(float(loss))
    return losses, norms


def resident(pipe) -> dict[str, np.ndarray]:
    """Each variable's stage-resident value (from the first stage reading it)."""
    values = {}
    for k, stage in enumerate(pipe.split.stages):
        for idx, copy in zip(stage.variable_indices, pipe.stage_variables(k)):
            values.setdefault(pipe.split.variables[idx].name, copy.numpy())
    return values


def rel(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def values_of(variables) -> dict[str, np.ndarray]:
    return {v.name: v.numpy() for v in variables}


# -- train: optimizers x schedules against the tape ---------------------------------------------


def train() -> dict:
    out: dict = {"runs": []}
    with LocalCluster(WORKERS) as cluster:
        devices = cluster.connect()
        out["devices"] = devices
        model = TiedModel(seed=3)
        split = model.split()  # after connecting: variables of this context
        start = values_of(model.variables)
        embed = next(i for i, v in enumerate(split.variables) if v is model.embed)
        out["tied_stages"] = [k for k, s in enumerate(split.stages)
                              if embed in s.variable_indices]
        out["tied_bytes"] = int(np.prod(model.embed.shape)) * 8
        data = batches(STEPS, seed=1)
        with tf.GradientTape() as tape:
            first = model.loss(*map(tf.constant, data[0]))
        norm = float(tf.linalg.global_norm(tape.gradient(first, split.trainable_variables)))
        # every optimizer once, both schedules, AdamW's steps clipped (each optimizer and
        # schedule, with and without clipping, is tested on logical devices in
        # test_training.py)
        plans = [(name, ("gpipe", "1f1b")[i % 2], norm / 3 if name == "adamw-schedule"
                  else None) for i, name in enumerate(sorted(OPTIMIZERS))]
        for name, schedule, clip in plans:
            pipe = gsc.pipeline(split, 4, schedule, devices, loss_reduction="mean",
                                optimizer=OPTIMIZERS[name](), clip_global_norm=clip,
                                timeout=120)
            losses = [float(pipe.train_step(x, y)) for x, y in data]
            untouched = all(np.array_equal(v.numpy(), start[v.name])
                            for v in model.variables)
            got = resident(pipe)
            copies = [[c.device for c in pipe.stage_variables(k)]
                      for k in range(len(split.stages))]
            moved = pipe.bytes_moved()
            iterations = pipe.iterations
            # the oracle on the user's variables, then put them back for the next run
            expected, norms = tape_training(model, OPTIMIZERS[name](), data, clip)
            want = values_of(model.variables)
            for v in model.variables:
                v.assign(start[v.name])
            out["runs"].append({
                "optimizer": name, "schedule": schedule, "clip": clip,
                "clipped_steps": 0 if clip is None else sum(n > clip for n in norms),
                "loss_error": rel(losses, expected),
                "variable_error": max(rel(got[n], want[n]) for n in want),
                "moved_from_start": max(rel(got[n], start[n]) for n in want),
                "nontrainable_unchanged": bool(np.array_equal(got["scale:0"],
                                                              start["scale:0"])),
                "user_variables_untouched": untouched,
                "copy_devices": copies, "bytes_moved": moved, "iterations": iterations,
            })
        out["assigned"] = assigned_on_a_task(devices)
    return out


def assigned_on_a_task(devices) -> dict:
    """A variable the program assigns lives on its stage's task and follows the program's
    assignments there (one micro-batch: the full batch's statistics); against the tape."""
    model = CountingModel()
    split = gsc.split(model.loss, [tf.TensorSpec([None, WIDTH], tf.float64)], cuts=["h"])
    pipe = gsc.pipeline(split, 1, "1f1b", devices[:2], loss_reduction="mean",
                        optimizer=keras.optimizers.SGD(0.1), timeout=120)
    xs = [x for x, _ in batches(ASSIGNED_STEPS, seed=18)]
    for x in xs:
        pipe.train_step(x)
    untouched = float(np.max(np.abs(model.mean.numpy()))) == 0.0
    got = resident(pipe)
    optimizer = keras.optimizers.SGD(0.1)
    for x in xs:
        with tf.GradientTape() as tape:
            loss = model.loss(tf.constant(x))
        optimizer.apply(tape.gradient(loss, [model.w0, model.w1]), [model.w0, model.w1])
    mean = next(i for i, v in enumerate(split.variables) if v is model.mean)
    mean_copy = pipe.stage_variables(0)[split.stages[0].variable_indices.index(mean)]
    return {"error": max(rel(got[v.name], v.numpy()) for v in model.variables),
            "mean_moved": float(np.max(np.abs(model.mean.numpy()))),
            "user_mean_untouched": untouched, "mean_device": mean_copy.device}


# -- resume: faults mid-training, restart, restore -----------------------------------------------

RESUME_STEPS, EVERY = 12, 3
FROZEN_TIMEOUT = 12


def resume() -> dict:
    out: dict = {}
    model = None
    data = batches(RESUME_STEPS, seed=5)

    def make_pipeline(split, devices, timeout=60):
        return gsc.pipeline(split, 4, "1f1b", devices, loss_reduction="mean",
                            optimizer=keras.optimizers.Adam(0.01), clip_global_norm=2.0,
                            timeout=timeout)

    def finish(pipe, path):
        """Restore ``path`` into ``pipe`` and train to the end; the steps it had and the
        values it restored."""
        pipe.restore(path)
        done, restored = pipe.iterations, resident(pipe)
        for x, y in data[done:]:
            pipe.train_step(x, y)
        return done, restored

    # 1. An uninterrupted run, then the same run with task 2 killed during step 7.
    cluster = LocalCluster(WORKERS)
    devices = cluster.connect()
    model = TiedModel(seed=7)
    split = model.split()
    start = values_of(model.variables)
    whole = make_pipeline(split, devices)
    for x, y in data:
        whole.train_step(x, y)
    want = resident(whole)
    out["uninterrupted_moved"] = max(rel(want[n], start[n]) for n in want)
    del whole
    pipe = make_pipeline(split, devices)
    killer = threading.Timer(0.05, cluster.kill, args=(2,))
    out["killed"] = train_until_failure(pipe, data, 7, killer.start)
    killer.join()
    out["killed"]["user_variables_untouched"] = all(
        np.array_equal(v.numpy(), start[v.name]) for v in model.variables)
    checkpoint = out["killed"]["checkpoint"]
    cluster.stop()

    # 2. A new cluster, the pipeline built again, the checkpoint restored: the same end.
    cluster = LocalCluster(WORKERS)
    devices = cluster.connect()
    pipe = make_pipeline(split, devices)
    out["resumed_from"], restored = finish(pipe, checkpoint)
    got = resident(pipe)
    out["resumed_error"] = max(rel(got[n], want[n]) for n in want)
    out["resumed_iterations"] = pipe.iterations
    plain = TiedModel(seed=99)  # the plain model reads the same checkpoint
    gsc.load_variables(checkpoint, plain.variables)
    out["load_variables_equal"] = all(np.array_equal(v.numpy(), restored[v.name])
                                      for v in plain.variables)

    # 3. Task 1 frozen (SIGSTOP) just as the optimizer update starts: timeout= gives up.
    pipe = make_pipeline(split, devices, timeout=FROZEN_TIMEOUT)
    out["frozen"] = fault_in_update(pipe, data, lambda: cluster.kill(1, signal.SIGSTOP))
    cluster.stop()

    # 4. Again from the checkpoint on a new cluster; task 3 killed as the update starts.
    cluster = LocalCluster(WORKERS)
    devices = cluster.connect()
    pipe = make_pipeline(split, devices)
    finish(pipe, checkpoint)
    got = resident(pipe)
    out["second_resume_error"] = max(rel(got[n], want[n]) for n in want)
    out["killed_in_update"] = fault_in_update(pipe, data, lambda: cluster.kill(3))
    cluster.stop()
    return out


def train_until_failure(pipe, data, kill_at: int, fault, where: str = "resume") -> dict:
    """Train, saving every EVERY steps (into this process's memory filesystem: the client
    must write every shard itself); ``fault`` starts before step ``kill_at``."""
    report: dict = {"checkpoint": None, "checkpoint_step": None}
    for i, (x, y) in enumerate(data):
        if i and i % EVERY == 0:
            report["checkpoint"] = pipe.save(f"ram://gradsplit-{where}/step{i}")
            report["checkpoint_step"] = i
        if i == kill_at:
            fault()
        t0 = time.perf_counter()
        try:
            pipe.train_step(x, y)
        except Exception as exc:
            report.update(raised=type(exc).__name__, message=str(exc),
                          seconds=time.perf_counter() - t0, step=i)
            break
    else:
        report["raised"] = None
    return report


# -- grid: 2 stages x 2 replicas, gradients all-reduced with TensorFlow's collectives ---------

GRID_STEPS = STEPS  # 20


def grid() -> dict:
    """Train a 2x2 grid against the tape (SGD with momentum, Adam); kill a worker mid-training
    (a replica's schedule), restart the cluster, restore the checkpoint into the grid and
    finish as the uninterrupted run; then kill a worker as the all-reduce starts."""
    out: dict = {"runs": {}}
    data = batches(GRID_STEPS, seed=9)

    def make(split, devices, name, timeout=60):
        return gsc.pipeline(split, 2, "1f1b", [[devices[0], devices[2]],
                                               [devices[1], devices[3]]],
                            loss_reduction="mean", optimizer=OPTIMIZERS[name](),
                            timeout=timeout, jit_compile=False)

    cluster = LocalCluster(WORKERS)
    devices = cluster.connect()
    out["devices"] = devices
    model = TiedModel(seed=11)
    split = model.split(cuts=("c2",))
    start = values_of(model.variables)
    final = None
    for name in ("sgd-momentum", "adam"):
        pipe = make(split, devices, name)
        losses = [float(pipe.train_step(x, y)) for x, y in data]
        got = resident(pipe)
        expected, _ = tape_training(model, OPTIMIZERS[name](), data)
        want = values_of(model.variables)
        for v in model.variables:
            v.assign(start[v.name])
        out["runs"][name] = {
            "loss_error": rel(losses, expected),
            "variable_error": max(rel(got[n], want[n]) for n in want),
            "moved_from_start": max(rel(got[n], start[n]) for n in want),
            "replicas_equal": all(
                np.array_equal(a.numpy(), b.numpy()) for k in range(2)
                for a, b in zip(pipe.stage_variables(k, 0), pipe.stage_variables(k, 1))),
            "copy_devices": [[sorted({c.device for c in pipe.stage_variables(k, r)})
                              for r in range(2)] for k in range(2)],
            "bytes_moved": pipe.bytes_moved(), "iterations": pipe.iterations,
            "allreduce_events": sorted((e.device_index, e.stage) for e in pipe.timeline()
                                       if e.kind == "A")}
        final = got
    del pipe

    # task 3 (stage 1 of replica 1) killed during step 7
    pipe = make(split, devices, "adam")
    killer = threading.Timer(0.05, cluster.kill, args=(3,))
    out["killed"] = train_until_failure(pipe, data, 7, killer.start, where="grid")
    killer.join()
    checkpoint = out["killed"]["checkpoint"]
    cluster.stop()

    # a new cluster, the grid built again, the checkpoint restored: the uninterrupted end
    cluster = LocalCluster(WORKERS)
    devices = cluster.connect()
    pipe = make(split, devices, "adam")
    pipe.restore(checkpoint)
    out["resumed_from"] = pipe.iterations
    for x, y in data[pipe.iterations:]:
        pipe.train_step(x, y)
    got = resident(pipe)
    out["resumed_error"] = max(rel(got[n], final[n]) for n in final)
    out["resumed_iterations"] = pipe.iterations

    # task 0 (stage 0 of replica 0) killed as the all-reduce starts
    real = GridPipeline._all_reduce

    def all_reduce(self, *args, **kwargs):
        cluster.kill(0)
        time.sleep(0.3)  # the signal has landed
        return real(self, *args, **kwargs)

    GridPipeline._all_reduce = all_reduce
    t0 = time.perf_counter()
    try:
        pipe.train_step(*data[0])
        out["killed_in_allreduce"] = {"raised": None}
    except Exception as exc:
        out["killed_in_allreduce"] = {"raised": type(exc).__name__, "message": str(exc),
                                      "seconds": time.perf_counter() - t0}
    finally:
        GridPipeline._all_reduce = real
    cluster.stop()
    return out


def fault_in_update(pipe, data, fault) -> dict:
    """A ``train_step`` (compiling), then one whose optimizer update starts with
    ``fault()``: what that one raised."""
    pipe.train_step(*data[0])
    real = training.TrainingState.update

    def update(self, *args, **kwargs):
        fault()
        time.sleep(0.3)  # the signal has landed
        return real(self, *args, **kwargs)

    training.TrainingState.update = update
    t0 = time.perf_counter()
    try:
        pipe.train_step(*data[1])
        report = {"raised": None}
    except Exception as exc:
        report = {"raised": type(exc).__name__, "message": str(exc),
                  "seconds": time.perf_counter() - t0}
    finally:
        training.TrainingState.update = real
    return report


def main() -> None:
    result = {"train": train, "resume": resume, "grid": grid}[sys.argv[1]]()
    print("RESULT " + json.dumps(result), flush=True)
    os._exit(0)  # threads stuck in calls to a dead or frozen task must not hold the exit


if __name__ == "__main__":
    main()
