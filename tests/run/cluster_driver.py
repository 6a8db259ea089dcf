"""Run ``gsc.pipeline`` on a ``LocalCluster`` and print the results as one JSON line.

Run by tests/run/test_cluster.py in a subprocess of its own: connecting to a cluster changes
the eager context of the whole process, which the pytest processes must not see.

    python tests/run/cluster_driver.py exact WORKERS   # 1F1B and GPipe against the tape
    python tests/run/cluster_driver.py fault           # SIGKILL/SIGSTOP a worker mid-step

Every step is compared with ``tf.GradientTape`` on the original function in this process
(tests/models.py: the tape, the relative error), at the weights the step ran with: before
every step but the first, the weights get new random values, so a task computing with a stale
copy of a variable is caught.
"""

from __future__ import annotations

import json
import os
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
from gradsplit_compiler.run.cluster import LocalCluster  # noqa: E402

BATCH = 16
CUTS = {2: ["c2"], 3: ["c1", "c2"], 4: ["c1", "c2", "c3"]}


def model(slow: int = 0, seed: int = 0):
    """``zoo.skip_net``: four layers, a skip from the input to layer 3 and from layer 1 to the
    loss, ``W2`` shared by layers 2 and 3 (float64), and two arguments every micro-batch gets
    whole (``scale``, a scalar, and ``shift``, of fixed leading dimension). ``slow``: that
    many 600x600 matmuls in stage 1's forward (outside the gradient), so a step takes long
    enough to kill a worker in it. Weights, then arguments, from one stream."""
    rng = np.random.default_rng(seed)
    case = zoo.skip_net("mean", replicated=True, slow=slow, batch=BATCH, seed=rng)
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
        fn, signature, args = model()
        split = gsc.split(fn, signature, CUTS[workers])
        plans = [("1f1b", 4, True), ("gpipe", 2, True)]
        if workers == 2:
            plans.append(("1f1b", 4, False))  # plain graph functions on the tasks
        for i, (schedule, m, jit) in enumerate(plans):
            pipe = gsc.pipeline(split, m, schedule, devices=devices, loss_reduction="mean",
                                timeout=60, jit_compile=jit)
            errors, moved = checked_steps(pipe, fn, split, args, 3, seed=[workers, i])
            # one more step at the same weights: it must leave them as they are
            before = [v.numpy() for v in split.variables]
            result = pipe.step(*args)
            placed = sorted({e.device for e in pipe.timeline()})
            out["runs"].append({
                "schedule": schedule, "microbatches": m, "jit_compile": jit,
                "step_errors": errors, "gradients_moved": moved,
                "value_device": result[0].device, "bytes_moved": pipe.bytes_moved(),
                "devices_used": placed,
                "variables_unchanged": unchanged(before, split.variables),
            })
        out["boundary_bytes"] = boundary_bytes(split)
    return out


def fault() -> dict:
    out: dict = {}
    cluster = LocalCluster(2)
    devices = cluster.connect()
    fn, signature, args = model(slow=60)
    split = gsc.split(fn, signature, CUTS[2])
    pipe = gsc.pipeline(split, 2, "1f1b", devices=devices, loss_reduction="mean", timeout=20)
    t0 = time.perf_counter()
    pipe.step(*args)  # compiles on the tasks
    out["warm_step_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    pipe.step(*args)
    step = out["slow_step_s"] = time.perf_counter() - t0

    # A task that dies in the middle of a step: SIGKILL task 1 (stage 1's slow forward).
    killer = threading.Timer(min(0.5, step / 4), cluster.kill, args=(1,))
    out["killed"] = step_under_fault(pipe, args, split.variables, killer)
    cluster.stop()

    # A task that stops answering: SIGSTOP, caught by the timeout.
    cluster = LocalCluster(2)
    devices = cluster.connect()
    # The arguments given whole to every micro-batch (scale, shift) are the same tensors in
    # every step; TensorFlow keeps their copies on the dead cluster's tasks and fails on them
    # after reconnecting ("Unable to find the relevant tensor remote_handle"). Recorded for
    # the test, then the arguments are made anew.
    out["reused_arguments"] = step_under_fault(
        gsc.pipeline(split, 2, "1f1b", devices=devices, loss_reduction="mean", timeout=60),
        args, split.variables, threading.Timer(0.0, lambda: None))
    args = [tf.constant(a.numpy()) for a in args]
    # Warm up (compile on the new tasks) without the short timeout: on a loaded machine that
    # alone can take longer than 8 s. The pipeline under test shares the compiled stages.
    gsc.pipeline(split, 2, "1f1b", devices=devices, loss_reduction="mean",
                 timeout=60).step(*args)
    pipe = gsc.pipeline(split, 2, "1f1b", devices=devices, loss_reduction="mean", timeout=8)
    stopper = threading.Timer(0.2, cluster.kill, args=(1, 19))  # SIGSTOP
    out["stopped"] = step_under_fault(pipe, args, split.variables, stopper)
    cluster.stop()

    # A restarted cluster: a new pipeline works and is exact.
    with LocalCluster(2) as cluster:
        devices = cluster.connect()
        fn, signature, args = model()
        split = gsc.split(fn, signature, CUTS[2])
        pipe = gsc.pipeline(split, 4, "1f1b", devices=devices, loss_reduction="mean",
                            timeout=60)
        out["restarted_step_errors"], _ = checked_steps(pipe, fn, split, args, 2, seed=7)
    return out


def main() -> None:
    scenario = sys.argv[1]
    result = exact(int(sys.argv[2])) if scenario == "exact" else fault()
    print("RESULT " + json.dumps(result), flush=True)
    sys.stdout.flush()
    os._exit(0)  # threads stuck in calls to a dead task must not hold the exit


if __name__ == "__main__":
    main()
