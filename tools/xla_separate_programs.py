"""Separate XLA programs on XLA:CPU, outside the compiler: what one training step costs when
its stages are each their own program, in plain TensorFlow (nothing of gradsplit_compiler).

The model is the benchmark's MLP (8 dense ReLU layers 512 wide, biases, batch 128, a mean
squared error against a target, float32). Every side computes the same gradient:

- ``mono``: forward and ``GradientTape`` backward in one ``tf.function(jit_compile=True)``;
- ``M stages`` (M = 1, 2, 4, 8): each stage's forward and each stage's backward its own
  ``tf.function(jit_compile=True)``, called one after the other as a pipeline does. A forward
  returns the activations its backward needs (never its own input: the caller holds it); a
  backward is the stage's vector-Jacobian product written out (ReLU mask, two matmuls and a
  bias sum per layer), the ops the tape emits. M = 1 is the monolithic step cut between its
  forward and its backward;
- ``4 stages, input copied``: each forward also returns its input, as a program that hands
  back every residual does (XLA copies a parameter it returns);
- ``4 stages, remat``: each forward returns only its output, and each backward runs the
  stage's forward again from its input;
- ``4 stages, one at a time``: each of the 8 programs timed in blocks of back-to-back calls of
  itself (warm caches, warm threads), the times summed: what the sequence would cost if
  switching programs cost nothing;
- ``empty program``: one call of a jit-compiled ``x + 1`` on a scalar, the fixed cost of a
  call (TensorFlow's dispatch, XLA's launch, one output allocated); a 4-stage step pays it
  8 times.

Every program is called the same way, through its concrete function's public
``inference_fn.call_flat`` on flat tensors, so no side pays ``tf.function``'s argument
binding. Times are medians of interleaved repeats after warm-up; each row is a ratio over
``mono`` measured in the same process. Every stage side is checked against ``mono``'s
gradients (float32, 1e-5 relative) before timing.

Process-wide settings (``XLA_FLAGS``, ``tf.config.threading``) are measured in a child process
per setting, each timing ``mono`` and the 4 stages again, so each setting's ratio is its own.

Another child process records TensorFlow's profiler trace of ``mono`` and the 4 stages and
splits each step into XLA's executables running (``CpuExecutable::ExecuteAsyncOnStream``),
TensorFlow's eager call around each (dispatch, XLA's program cache, arguments and results)
and the host's Python between calls (``step_breakdown``), and counts the instructions,
fusions, dots and copies of every program's optimized HLO from ``--xla_dump_to``
(``hlo_counts``).

Run ``python tools/xla_separate_programs.py [--quick]``; the last line is ``RESULT {json}``.
``tools/bench.py --only 11`` runs it and writes its tables into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

__all__ = ["FLAG_SETTINGS", "MLP", "flat_call", "hlo_counts", "interleaved", "main", "measure",
           "per_setting", "profile", "step_breakdown", "trace_steps"]

# Settings measured each in a process of its own: (label, XLA_FLAGS added, threads), threads
# as (intra_op, inter_op) for tf.config.threading or None for TensorFlow's defaults.
FLAG_SETTINGS = [
    ("defaults", "", None),
    ("--xla_cpu_multi_thread_eigen=false", "--xla_cpu_multi_thread_eigen=false", None),
    ("--xla_cpu_use_xnnpack=true", "--xla_cpu_use_xnnpack=true", None),
    ("--xla_cpu_enable_concurrency_optimized_scheduler=false",
     "--xla_cpu_enable_concurrency_optimized_scheduler=false", None),
    ("--xla_cpu_parallel_codegen_split_count=1", "--xla_cpu_parallel_codegen_split_count=1",
     None),
    ("--xla_cpu_enable_fast_math=true (changes results)", "--xla_cpu_enable_fast_math=true",
     None),
    ("intra-op threads 1, inter-op 1", "", (1, 1)),
    ("intra-op threads 2, inter-op 1", "", (2, 1)),
]


def interleaved(fns: dict, repeats: int, warmup: int = 2) -> dict:
    """Median seconds per call of each function, calls interleaved round-robin (the loop of
    ``tools/bench.py``)."""
    for fn in fns.values():
        for _ in range(warmup):
            _block(fn())
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            _block(fn())
            times[k].append(time.perf_counter() - t)
    return {k: float(np.median(v)) for k, v in times.items()}


def _block(result) -> None:
    for t in tf.nest.flatten(result):
        if hasattr(t, "numpy"):
            t.numpy()


def flat_call(function, *specs):
    """``function`` traced for ``specs``, as ``call(*flat_tensors) -> flat outputs``: the
    concrete function's ``inference_fn.call_flat``, no argument binding."""
    concrete = function.get_concrete_function(*specs)
    atomic, captured = concrete.inference_fn, list(concrete.captured_inputs)
    return lambda *args: atomic.call_flat(*args, *captured)


class MLP:
    """The benchmark's MLP with random weights and data, and its step as 1 or M programs."""

    def __init__(self, layers=8, width=512, batch=128, seed=0):
        rng = np.random.default_rng(seed)
        self.layers, self.width, self.batch = layers, width, batch
        self.ws = [tf.Variable((rng.normal(size=(width, width)) / np.sqrt(width))
                               .astype(np.float32)) for _ in range(layers)]
        self.bs = [tf.Variable(0.1 * rng.normal(size=(width,)).astype(np.float32))
                   for _ in range(layers)]
        self.x = tf.constant(rng.normal(size=(batch, width)).astype(np.float32))
        self.y = tf.constant(rng.normal(size=(batch, width)).astype(np.float32))
        self.spec = tf.TensorSpec([batch, width], tf.float32)
        self.variables = [v for pair in zip(self.ws, self.bs) for v in pair]

    def loss(self, x, y):
        h = x
        for w, b in zip(self.ws, self.bs):
            h = tf.nn.relu(h @ w + b)
        return tf.reduce_mean(tf.square(h - y))

    def mono(self):
        """``step() -> [loss, dW0, db0, dW1, ...]``: one program."""
        @tf.function(jit_compile=True, autograph=False)
        def step(x, y):
            with tf.GradientTape() as tape:
                value = self.loss(x, y)
            return [value, *tape.gradient(value, self.variables)]

        call = flat_call(step, self.spec, self.spec)
        return lambda: call(self.x, self.y)

    # -- stages ----------------------------------------------------------------------------

    def _layer_vjp(self, i, h_in, h_out, g):
        """The tape's VJP of ``h_out = relu(h_in @ W_i + b_i)``: ``(g_in, dW, db)``."""
        g = tf.raw_ops.ReluGrad(gradients=g, features=h_out)
        return (tf.matmul(g, self.ws[i], transpose_b=True),
                tf.matmul(h_in, g, transpose_a=True), tf.reduce_sum(g, 0))

    def staged(self, m: int, mode: str = "lean"):
        """``(step, programs)``: the step as ``m`` forward and ``m`` backward programs.

        ``mode``: ``"lean"`` (a forward returns the activations its backward reads, its input
        excluded), ``"copy"`` (also its input) or ``"remat"`` (only its output; the backward
        runs the forward again). ``programs`` are ``(name, call, args)`` of one step, for
        timing each alone."""
        per = self.layers // m
        spec, forwards, backwards = self.spec, [], []
        for s in range(m):
            layers = list(range(s * per, (s + 1) * per))
            last = s == m - 1

            def run(h, layers=layers):
                acts = []
                for i in layers:
                    h = tf.nn.relu(h @ self.ws[i] + self.bs[i])
                    acts.append(h)
                return acts

            def vjp(h, acts, g, layers=layers):
                grads = []
                ins = [h, *acts[:-1]]
                for k in reversed(range(len(layers))):
                    g, dw, db = self._layer_vjp(layers[k], ins[k], acts[k], g)
                    grads = [dw, db, *grads]
                return g, grads

            if mode == "remat":
                def forward(h, y, run=run, last=last):
                    out = run(h)[-1]
                    return [out, tf.reduce_mean(tf.square(out - y))] if last else [out]

                def backward(h, y, g, run=run, vjp=vjp, last=last):
                    acts = run(h)
                    if last:
                        g = 2.0 * (acts[-1] - y) / float(self.batch * self.width)
                    g_in, grads = vjp(h, acts, g)
                    return [g_in, *grads]
            else:
                def forward(h, y, run=run, last=last, copy=mode == "copy"):
                    acts = run(h)
                    extra = [tf.reduce_mean(tf.square(acts[-1] - y))] if last else []
                    return ([h] if copy else []) + acts + extra

                def backward(h, y, *acts_and_g, vjp=vjp, last=last):
                    *acts, g = acts_and_g
                    if last:
                        g = 2.0 * (acts[-1] - y) / float(self.batch * self.width)
                    g_in, grads = vjp(h, acts, g)
                    return [g_in, *grads]

            forwards.append(flat_call(tf.function(forward, jit_compile=True, autograph=False),
                                      spec, spec))
            keep = 0 if mode == "remat" else per
            backwards.append(flat_call(tf.function(backward, jit_compile=True,
                                                   autograph=False),
                                       *[spec] * (3 + keep)))

        x, y, one = self.x, self.y, tf.ones([self.batch, self.width])

        def step(record=None):
            h, saved = x, []
            for s, forward in enumerate(forwards):
                got = forward(h, y)
                if mode == "copy":
                    got = got[1:]  # the caller's own input, copied back
                if s == m - 1:
                    got, value = got[:-1], got[-1]
                acts = [] if mode == "remat" else got
                if record is not None:
                    record.append((f"forward {s}", forwards[s], [h, y]))
                saved.append((h, acts))
                h = got[-1]
            g, grads = one, []  # the last backward ignores g and seeds from the loss
            for s in reversed(range(m)):
                h_in, acts = saved[s]
                if record is not None:
                    record.append((f"backward {s}", backwards[s], [h_in, y, *acts, g]))
                g, *stage_grads = backwards[s](h_in, y, *acts, g)
                grads = stage_grads + grads
            return [value, *grads]

        programs = []
        step(programs)
        return step, programs


def _check(want, got, label: str) -> None:
    for a, b in zip(want, got):
        err = float(tf.reduce_max(tf.abs(a - b)) / (tf.reduce_max(tf.abs(a)) + 1e-30))
        if err > 1e-5:
            raise AssertionError(f"{label}: gradient differs from the tape's by {err:.1e}")


def measure(config: dict) -> dict:
    """The rows of the in-process table: median seconds of each side (``mono`` first) and the
    number of programs each runs. ``config``: ``layers``, ``width``, ``batch``, ``repeats``,
    ``stages`` (the list of M), ``variants`` (bool: the 4-stage variants and the empty
    program)."""
    model = MLP(config["layers"], config["width"], config["batch"])
    mono = model.mono()
    want = mono()
    sides, programs = {"mono": mono}, {"mono": 1}
    variant = 4 if 4 in config["stages"] else config["stages"][-1]
    recorded = []
    for m in config["stages"]:
        step, calls = model.staged(m)
        _check(want, step(), f"{m} stages")
        sides[f"{m} stages"], programs[f"{m} stages"] = step, 2 * m
        if m == variant:
            recorded = calls
    alone, block = [], 4
    if config.get("variants", True):
        m = variant
        for mode, label in (("copy", "input copied"), ("remat", "remat")):
            step, _ = model.staged(m, mode)
            _check(want, step(), f"{m} stages, {label}")
            sides[f"{m} stages, {label}"], programs[f"{m} stages, {label}"] = step, 2 * m
        for name, call, args in recorded:
            sides[f"alone: {name}"] = (lambda call=call, args=args:
                                       [call(*args) for _ in range(block)])
            alone.append(f"alone: {name}")
        empty = flat_call(tf.function(lambda t: t + 1.0, jit_compile=True, autograph=False),
                          tf.TensorSpec([], tf.float32))
        scalar = tf.constant(1.0)
        sides["empty program"] = lambda: empty(scalar)
    times = interleaved(sides, config["repeats"])
    if alone:
        times[f"{m} stages, one at a time"] = sum(times.pop(k) / block for k in alone)
        programs[f"{m} stages, one at a time"] = 2 * m
    return {"times": times, "programs": programs}


_CHILD = r"""
import json, os, sys
sys.path.insert(0, {tools!r})
import tensorflow as tf
threads = {threads!r}
if threads is not None:
    tf.config.threading.set_intra_op_parallelism_threads(threads[0])
    tf.config.threading.set_inter_op_parallelism_threads(threads[1])
import xla_separate_programs as x
got = x.measure({config!r})
print("RESULT " + json.dumps(got), flush=True)
"""


def per_setting(config: dict, settings=None) -> list[dict]:
    """Each of ``settings`` (default ``FLAG_SETTINGS``) in a child process timing ``mono``
    and 4 stages: ``[{"setting", "mono", "stages", "ratio"}]`` (``None`` times if the child
    failed, its error in ``"error"``)."""
    rows = []
    child = {**config, "variants": False}
    for label, flags, threads in settings or FLAG_SETTINGS:
        env = dict(os.environ)
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flags).strip()
        code = _CHILD.format(tools=str(Path(__file__).resolve().parent), threads=threads,
                             config=child)
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env=env, timeout=900)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
        row = {"setting": label, "mono": None, "stages": None, "ratio": None}
        if lines:
            times = json.loads(lines[-1][len("RESULT "):])["times"]
            key = next(k for k in times if k.endswith("stages"))
            row.update(mono=times["mono"], stages=times[key],
                       ratio=times[key] / times["mono"])
        else:
            row["error"] = done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]
        rows.append(row)
        print(f"  {label}: " + (f"mono {row['mono'] * 1e3:.2f} ms, 4 stages "
                                f"{row['ratio']:.3f}x" if lines else f"failed {row['error']}"),
              flush=True)
    return rows


# -- XLA's own view: optimized HLO and per-thunk trace events ----------------------------------


def hlo_counts(dump: Path) -> dict:
    """Per compiled program in an ``--xla_dump_to`` directory (by its function's name):
    the instructions of its optimized entry computation, its fusions, dots, copies and
    parameters."""
    import re

    found = {}
    for path in sorted(dump.glob("*after_optimizations.txt")):
        text = path.read_text()
        entry = text[text.index("\nENTRY"):]
        lines = [ln for ln in entry[: entry.index("\n}")].splitlines()[2:] if " = " in ln]
        kinds = [m.group(1) for ln in lines
                 if (m := re.search(r"\s([a-z][\w\-]*)\(", ln.split(" = ", 1)[1]))]
        name = re.search(r"inference_(\w+?)_\d+__", path.name)
        found[name.group(1) if name else path.name] = found.get(
            name.group(1) if name else path.name, []) + [
            {"instructions": len(kinds), "fusions": kinds.count("fusion"),
             "dots": kinds.count("dot"), "copies": kinds.count("copy"),
             "parameters": kinds.count("parameter")}]
    return found


_PROFILE_CHILD = r"""
import json, sys
from pathlib import Path
sys.path.insert(0, {tools!r})
import tensorflow as tf
import xla_separate_programs as x
config, logdir = {config!r}, Path({logdir!r})
model = x.MLP(config["layers"], config["width"], config["batch"])
sides = {{"mono": model.mono(), **{{f"{{m}} stages": model.staged(m)[0]
                                 for m in config["profiled"]}}}}
steps = x.trace_steps(sides, logdir / "trace", config["profile_repeats"])
print("RESULT " + json.dumps({{"steps": steps, "hlo": x.hlo_counts(logdir / "dump")}}),
      flush=True)
"""

# The host thread's trace events of one call of an XLA program, outermost first.
_CALL, _EXECUTE = "TFE_Py_ExecuteCancelable", "CpuExecutable::ExecuteAsyncOnStream"


def step_breakdown(trace: Path) -> dict:
    """Per ``step <side>`` annotation in a profiler trace, medians over the steps, seconds:
    ``step`` (wall time), ``xla`` (XLA's executables running: ``CpuExecutable::
    ExecuteAsyncOnStream``, thunks and the wait for them), ``runtime`` (TensorFlow's eager
    call around each executable: dispatch, XLA's cache lookup, arguments and results),
    ``host`` (the rest: Python between and around the calls), and ``calls``."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    space.ParseFromString(next(trace.rglob("*.xplane.pb")).read_bytes())
    plane = next(p for p in space.planes if p.name == "/host:CPU")
    names = {k: m.name for k, m in plane.event_metadata.items()}
    events = []
    for line in plane.lines:
        for e in line.events:
            start = line.timestamp_ns * 1000 + e.offset_ps
            events.append((names[e.metadata_id], start, start + e.duration_ps))
    steps = [e for e in events if e[0].startswith("step ")]
    out = {}
    for side in dict.fromkeys(e[0] for e in steps):
        rows = []
        for _, s0, s1 in (e for e in steps if e[0] == side):
            inside = [e for e in events if s0 <= e[1] < s1]
            calls = sum(b - a for n, a, b in inside if n == _CALL)
            xla = sum(b - a for n, a, b in inside if n == _EXECUTE)
            count = sum(n == _CALL for n, _, _ in inside)
            rows.append([s1 - s0, xla, calls - xla, s1 - s0 - calls, count])
        med = np.median(np.array(rows, dtype=float), axis=0)
        out[side[len("step "):]] = {"step": med[0] * 1e-12, "xla": med[1] * 1e-12,
                                    "runtime": med[2] * 1e-12, "host": med[3] * 1e-12,
                                    "calls": int(med[4])}
    return out


def trace_steps(sides: dict, trace: Path, repeats: int, warmup: int = 3) -> dict:
    """``step_breakdown`` of ``sides`` (name -> ``step()``): each warmed up, then ``repeats``
    rounds of one step of each, interleaved, under TensorFlow's profiler, each step annotated
    ``step <name>``; the trace is written under ``trace``. Any step function works (this
    file's stages, or a driver of one's own called in the same process)."""
    for fn in sides.values():
        for _ in range(warmup):
            _block(fn())
    tf.profiler.experimental.start(str(trace))
    try:
        for _ in range(repeats):
            for name, fn in sides.items():
                with tf.profiler.experimental.Trace("step " + name):
                    _block(fn())
    finally:
        tf.profiler.experimental.stop()
    return step_breakdown(Path(trace))


def profile(config: dict) -> dict:
    """TensorFlow's profiler and XLA's dumps, in a child process (XLA reads ``XLA_FLAGS``
    once): ``{"steps": step_breakdown, "hlo": hlo_counts}`` for ``mono`` and the stages of
    ``config["profiled"]`` (a list of M)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ)
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_dump_to={tmp}/dump").strip()
        code = _PROFILE_CHILD.format(tools=str(Path(__file__).resolve().parent),
                                     config=config, logdir=tmp)
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env=env, timeout=900)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
        if not lines:
            raise RuntimeError(f"the profile failed: {done.stderr[-2000:]}")
        return json.loads(lines[-1][len("RESULT "):])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny MLP, few repeats")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--no-settings", action="store_true",
                        help="skip the per-process settings (XLA flags, threads)")
    parser.add_argument("--no-profile", action="store_true",
                        help="skip the profiler's breakdown and XLA's HLO counts")
    args = parser.parse_args(argv)
    config = ({"layers": 8, "width": 32, "batch": 8, "repeats": args.repeats or 3,
               "stages": [1, 4], "profiled": [4], "profile_repeats": 3} if args.quick else
              {"layers": 8, "width": 512, "batch": 128, "repeats": args.repeats or 41,
               "stages": [1, 2, 4, 8], "profiled": [4], "profile_repeats": 15})
    got = measure(config)
    mono = got["times"]["mono"]
    for k, t in got["times"].items():
        print(f"  {k}: {t * 1e3:.3f} ms, {t / mono:.3f}x", flush=True)
    settings = [] if args.no_settings else per_setting(
        config, FLAG_SETTINGS[:2] if args.quick else FLAG_SETTINGS)
    profiled = {} if args.no_profile else profile(config)
    for side, row in profiled.get("steps", {}).items():
        print(f"  profile {side}: " + ", ".join(
            f"{k} {v * 1e3:.2f} ms" if k != "calls" else f"{v} calls" for k, v in row.items()),
            flush=True)
    print("RESULT " + json.dumps({"config": config, **got, "settings": settings,
                                  "profile": profiled}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
