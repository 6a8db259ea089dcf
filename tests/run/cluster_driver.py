"""Run ``gsc.pipeline`` on a ``LocalCluster`` and print the results as one JSON line.

Run by tests/test_cluster.py in a subprocess of its own: connecting to a cluster changes the
eager context of the whole process, which the pytest processes must not see.

    python tests/cluster_driver.py exact WORKERS   # 1F1B and GPipe against the one-process run
    python tests/cluster_driver.py fault           # SIGKILL/SIGSTOP a worker mid-step, restart
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

import gradsplit_compiler as gsc
from gradsplit_compiler import zoo
from gradsplit_compiler.run.cluster import LocalCluster

BATCH = 16
CUTS = {2: ["c2"], 3: ["c1", "c2"], 4: ["c1", "c2", "c3"]}


def model(slow: int = 0, seed: int = 0):
    """``zoo.skip_net``: four layers, a skip from the input to layer 3 and from layer 1 to the
    loss, ``W2`` shared by layers 2 and 3 (float64). ``slow``: that many 600x600 matmuls in
    stage 1's forward (outside the gradient), so a step takes long enough to kill a worker in
    it. Weights, then arguments, from one stream."""
    rng = np.random.default_rng(seed)
    case = zoo.skip_net("mean", slow=slow, batch=BATCH, seed=rng)
    return case.fn, case.input_signature, case.args(rng)


def rel_error(got, want) -> float:
    got, want = np.asarray(got), np.asarray(want)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-300))


def max_error(result, reference) -> float:
    (value, grads), (ref_value, ref_grads) = result, reference
    return max([rel_error(value, ref_value)]
               + [rel_error(g, r) for g, r in zip(grads, ref_grads)])


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
        reference = split.value_and_gradients(*args)  # one process, this process's CPU
        before = [v.numpy() for v in split.variables]
        plans = [("1f1b", 4, True), ("gpipe", 2, True)]
        if workers == 2:
            plans.append(("1f1b", 4, False))  # plain graph functions on the tasks
        for schedule, m, jit in plans:
            pipe = gsc.pipeline(split, m, schedule, devices=devices, loss_reduction="mean",
                                timeout=60, jit_compile=jit)
            t0 = time.perf_counter()
            result = pipe.step(*args)
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            result = pipe.step(*args)
            second = time.perf_counter() - t0
            placed = sorted({e.device for e in pipe.timeline()})
            out["runs"].append({
                "schedule": schedule, "microbatches": m, "jit_compile": jit,
                "max_rel_error": max_error(
                    result, reference),
                "value_device": result[0].device, "first_step_s": first,
                "second_step_s": second, "bytes_moved": pipe.bytes_moved(),
                "devices_used": placed,
            })
        out["boundary_bytes"] = boundary_bytes(split)
        out["variables_unchanged"] = unchanged(before, split.variables)
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
        reference = split.value_and_gradients(*args)
        pipe = gsc.pipeline(split, 4, "1f1b", devices=devices, loss_reduction="mean",
                            timeout=60)
        out["restarted_max_rel_error"] = max_error(pipe.step(*args), reference)
    return out


def main() -> None:
    scenario = sys.argv[1]
    result = exact(int(sys.argv[2])) if scenario == "exact" else fault()
    print("RESULT " + json.dumps(result), flush=True)
    sys.stdout.flush()
    os._exit(0)  # threads stuck in calls to a dead task must not hold the exit


if __name__ == "__main__":
    main()
