"""Benchmarks: the composed gradient against the monolithic one and the thread's answers.

Run as ``make bench`` (or ``python tools/bench.py [--quick] [--only N ...]``). Every figure is
a ratio measured in this run: medians of interleaved repeats after warm-up, so both sides see
the same machine. Writes BENCHMARKS.md (with the command that made it) and
docs/bench_cut_size.png (figure 5).

1. ``value_and_gradients(jit_compile=True)`` / one XLA-compiled ``tape.gradient`` of the
   original function: MLP (8x512, batch 128, 4 stages), ResNet50 at 64x64 (4 stages), a
   small transformer (4 stages).
2. The stages driven one by one (``run_stages``), each forward and backward its own XLA
   program, / the monolithic step; for the MLP, beside section 11's plain-TensorFlow stages
   of the same model in the same loop (their ratio, and TensorFlow's profiler's split of
   each step into XLA, TensorFlow's call and host Python).
3. Peak memory of the composed step / the monolithic step (each in a fresh process).
4. ``split()`` time / TF's own trace of the training step, on ResNet50 and chains of 250,
   1,000 and 25,000 layers (100,000 graph nodes), with time per graph node, and where the
   split spends it (``Split.profile``, by phase) beside the first XLA call, and what plain
   TensorFlow charges for exporting the trace and importing it back
   (``tools/split_floor.py``).
5. The thread's answers on the demo's program as the cut grows: per-scalar
   ``tf.gradients``, ``GradientTape.jacobian``, and ours, all interleaved in one loop.
6. The pipeline's ``step`` on a LocalCluster beside the same pipeline in one process.
7. Training steps: ``pipeline.step`` plus the caller's optimizer, against ``train_step``
   (variables and optimizers resident on the stages), in one process (4 logical CPUs) and
   on 4 worker processes, over one XLA program doing forward, backward and the optimizer.
8. ``PipelineModel.fit`` per step against plain ``model.fit(jit_compile=True)``, with one
   stage (the pipeline's own cost) and with four.
9. Schedules: the simulator's idle share against each schedule's formula, then predicted
   against measured step time, idle share and peak residual bytes on 4 logical CPUs.
10. Grids: 2 stages x 2 replicas (gradients all-reduced with TensorFlow's collectives)
    against 1-D pipelines of 2 and 4 stages on the same 4 logical CPUs: bytes per step by
    kind against what the grid predicts, and ``train_step`` time.
11. Separate XLA programs on XLA:CPU, outside the compiler: ``tools/xla_separate_programs.py``
    (plain TensorFlow) run in a process of its own: the MLP's step as 1, 2, 4 and 8 stages
    of hand-written programs over one program, the fixed cost of a call, XLA flags and
    thread settings each in a process of its own, and TensorFlow's profiler and XLA's
    optimized HLO of the one program against the 4 stages.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf

import gradsplit_compiler as gsc
from gradsplit_compiler import _tf_internal, zoo

ROOT = Path(__file__).resolve().parent.parent


def log(msg: str) -> None:
    print(msg, flush=True)


def interleaved(fns: dict, repeats: int, warmup: int = 2, samples: dict | None = None
                ) -> dict:
    """Median seconds per call of each function, calls interleaved round-robin; every
    round's times go to ``samples`` (one list per function) when given."""
    for fn in fns.values():
        for _ in range(warmup):
            _block(fn())
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            _block(fn())
            times[k].append(time.perf_counter() - t)
    if samples is not None:
        samples.update(times)
    return {k: float(np.median(v)) for k, v in times.items()}


def flat(fn, *args):
    """``fn(*args)`` as our stages are called: the traced program on flat tensors, without
    ``tf.function``'s per-call argument binding (the same ``flat_caller`` that
    ``stage.callers`` and ``value_and_gradients`` use), so every side pays the same Python."""
    call = _tf_internal.flat_caller(fn, *args)
    return lambda: call(*args)


def _block(result) -> None:
    for t in tf.nest.flatten(result):
        if hasattr(t, "numpy"):
            t.numpy()


# -- models -------------------------------------------------------------------------------


def mlp(rng, layers=8, width=512, batch=128, stages=4):
    """``zoo.dense_chain``: ReLU layers with biases, a squared error against a target, cut
    into ``stages``; weights, then ``x`` and ``y``, from ``rng``."""
    case = zoo.dense_chain(layers, width, activation="relu", bias=True, loss="mse",
                           stages=stages, dtype=tf.float32, batch=batch, seed=rng)
    args = case.args(rng)
    ws, bs = case.extras["weights"], case.extras["biases"]
    _HAND_WRITTEN[id(case.fn)] = lambda: hand_staged_mlp(ws, bs, stages, args)
    _PLAIN_STAGES[id(case.fn)] = lambda: plain_staged_mlp(ws, bs, stages, args)
    return (f"MLP {layers}x{width}, batch {batch}", case.fn, case.input_signature, case.cuts,
            args)


# loss function id -> builder of a hand-written per-stage step of the same model
_HAND_WRITTEN: dict = {}
# loss function id -> builder of section 11's plain-TensorFlow stages of the same model
_PLAIN_STAGES: dict = {}


def separate_programs_module():
    """``tools/xla_separate_programs.py`` (section 11), imported also when this file is
    loaded by its path (tools/ not on ``sys.path``)."""
    tools = str(ROOT / "tools")
    if tools not in sys.path:
        sys.path.insert(0, tools)
    import xla_separate_programs

    return xla_separate_programs


def plain_staged_mlp(ws, bs, stages, args):
    """Section 11's program (``xla_separate_programs.MLP.staged``: a jit-compiled forward
    and backward per stage, called through their concrete functions on flat tensors) on
    this MLP's weights and data. Returns ``(step, order)``: ``step() -> [loss, dW0, db0,
    dW1, ...]`` and the variables those gradients belong to."""
    x, y = args
    batch, width = x.shape
    model = separate_programs_module().MLP(len(ws), width, batch)
    for mine, theirs in zip(model.variables, [v for pair in zip(ws, bs) for v in pair]):
        mine.assign(theirs)
    model.x, model.y = tf.convert_to_tensor(x), tf.convert_to_tensor(y)
    step, _ = model.staged(stages)
    return step, [None, *(v for pair in zip(ws, bs) for v in pair)]


def hand_staged_mlp(ws, bs, stages, args):
    """What a user writes by hand without this tool: the MLP's stages as separate XLA
    programs, each forward returning its activations and each backward an explicit VJP
    (ReLU mask, two matmuls and a bias sum per layer), called as concrete functions.
    Returns ``step() -> grads``."""
    x, y = args
    per = len(ws) // stages
    batch, width = x.shape
    forwards, backwards = [], []
    for s in range(stages):
        layers = range(s * per, (s + 1) * per)

        @tf.function(jit_compile=True)
        def forward(h, layers=layers):
            acts = [h]
            for i in layers:
                h = tf.nn.relu(h @ ws[i] + bs[i])
                acts.append(h)
            return acts

        @tf.function(jit_compile=True)
        def backward(*acts_and_g, layers=layers):
            *acts, g = acts_and_g
            grads = []
            for k, i in reversed(list(enumerate(layers))):
                g = tf.where(acts[k + 1] > 0, g, tf.zeros_like(g))
                grads += [tf.matmul(acts[k], g, transpose_a=True), tf.reduce_sum(g, 0)]
                g = tf.matmul(g, ws[i], transpose_b=True)
            return g, grads

        spec = tf.TensorSpec([batch, width])
        forwards.append(forward.get_concrete_function(spec))
        backwards.append(backward.get_concrete_function(*[spec] * (per + 2)))

    @tf.function(jit_compile=True)
    def loss_grad(h, y):
        return 2.0 * (h - y) / tf.cast(tf.size(h), h.dtype)

    seed = loss_grad.get_concrete_function(x, y)

    def step():
        h, saved = x, []
        for forward in forwards:
            acts = forward(h)
            saved.append(acts)
            h = acts[-1]
        g, grads = seed(h, y), []
        for s in reversed(range(stages)):
            g, stage_grads = backwards[s](*saved[s], g)
            grads += stage_grads
        return grads

    order = [v for i in reversed(range(len(ws))) for v in (ws[i], bs[i])]
    return step, order


def resnet50(rng, batch=16):
    """``zoo.resnet50`` at 64x64, float32, cut at three blocks."""
    case = zoo.resnet50(tf.float32, batch=batch, resolution=64)
    return (f"ResNet50 64x64, batch {batch}", case.fn, case.input_signature, case.cuts,
            case.args(rng))


def transformer(rng, blocks=4, seq=64, dim=128, heads=4, batch=16):
    """``zoo.transformer``: GELU feed-forward, squared error against a target, cut after
    every block but the last."""
    case = zoo.transformer(tf.float32, batch=batch, blocks=blocks, seq=seq, dim=dim,
                           heads=heads, activation="gelu", loss="mse")
    return (f"transformer {blocks}x(d{dim}, seq {seq}), batch {batch}", case.fn,
            case.input_signature, case.cuts, case.args(rng))


def monolithic_step(loss, variables, jit_compile=True):
    python_fn = loss.python_function

    @tf.function(jit_compile=jit_compile)
    def step(*args):
        with tf.GradientTape() as tape:
            value = python_fn(*args)
        return value, tape.gradient(value, variables)

    return step


# -- figures 1 and 2 ------------------------------------------------------------------------


def figure_speed(models, repeats):
    return [_speed_of(build, repeats) for build in models]


def _check_against_tape(label, got, order, want, variables, tolerance):
    """Each gradient in ``got`` (of ``order``'s variable; ``None``: not a gradient) against
    the monolithic tape's ``want`` (aligned with ``variables``), relative to its largest
    entry."""
    for g, v in zip(got, order):
        if v is None:
            continue
        ref = want[next(i for i, w in enumerate(variables) if w is v)]
        err = float(tf.reduce_max(tf.abs(g - ref)) / tf.reduce_max(tf.abs(ref)))
        assert err < tolerance, f"{label} differs from the tape by {err:.1e}"


def _speed_of(build, repeats):
    """``(name, stages, times, profile, paired)``: the sides' median step times, and for a
    model with section 11's plain stages (the MLP) TensorFlow's profiler breakdown of the
    monolithic step, ``run_stages`` and the plain stages in this process (``{}``
    otherwise) and ``run_stages`` over the plain stages as the median of the rounds' own
    ratios with their quartiles (``None`` otherwise)."""
    name, loss, sig, cuts, args = build(np.random.default_rng(0))
    log(f"[1,2] {name}: split at {len(cuts)} cuts ...")
    split = gsc.split(loss, sig, cuts)
    mono = monolithic_step(loss, split.variables)
    written = split.written_variables()
    start = [v.numpy() for v in written]
    sides = {
        "mono": flat(mono, *args),
        "composed": lambda: split.value_and_gradients(*args),
        # run_stages also returns the arguments' cotangents; every side is blocked on (copied
        # to the host as) the loss and the variables' gradients only: eager XLA calls on the
        # CPU return when their program has run, so nothing of the step goes untimed
        "stages": lambda: split.run_stages(args)[::2],
    }
    want = mono(*args)[1] if id(loss) in _HAND_WRITTEN or id(loss) in _PLAIN_STAGES else None
    if id(loss) in _HAND_WRITTEN:
        hand, order = _HAND_WRITTEN[id(loss)]()
        # the hand-written chain computes the same gradient
        _check_against_tape("hand-written chain", hand(), order, want, split.variables, 1e-4)
        sides["hand"] = hand
    if id(loss) in _PLAIN_STAGES:
        plain, order = _PLAIN_STAGES[id(loss)]()
        _check_against_tape("section 11's plain stages", plain(), order, want,
                            split.variables, 1e-5)
        sides["plain"] = plain
    # run_stages against the plain stages: the median of each round's own ratio (both
    # sides called within milliseconds of each other), over ten times the rounds
    samples: dict = {}
    times = interleaved(sides, repeats * 10 if "plain" in sides else repeats,
                        samples=samples)
    paired = None
    if "plain" in sides:
        paired = median_and_quartiles([a / b for a, b in zip(samples["stages"],
                                                              samples["plain"])])
    profile = {}
    if "plain" in sides:
        profile = profile_stages({"mono": sides["mono"], "run_stages": sides["stages"],
                                  "plain": sides["plain"]}, max(repeats, 3))
    for v, value in zip(written, start):
        v.assign(value)
    log(f"      monolithic {times['mono'] * 1e3:.2f} ms, composed "
        f"{times['composed'] / times['mono']:.3f}x, by stage "
        f"{times['stages'] / times['mono']:.3f}x"
        + (f", by hand {times['hand'] / times['mono']:.3f}x" if "hand" in times else "")
        + (f", plain stages {times['plain'] / times['mono']:.3f}x (run_stages / plain: "
           f"median of rounds {paired[0]:.3f}, quartiles {paired[1]:.2f}-{paired[2]:.2f})"
           if paired else ""))
    for side, row in profile.items():
        log(f"      profile {side}: " + ", ".join(
            f"{k} {v * 1e3:.3f} ms" if k != "calls" else f"{v} calls"
            for k, v in row.items()))
    return name, len(split.stages), times, profile, paired


def profile_table(steps: dict, sides: list, labels: list[str], digits: int) -> list[str]:
    """The markdown rows of a profiler table (sections 1-2 and 11): one column per side of
    ``steps`` (``trace_steps``' medians), its header and the rows step, XLA, runtime, host
    and programs called."""
    lines = ["| | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(sides)]
    for key, row in (("step", "step"),
                     ("xla", "XLA executables (`ExecuteAsyncOnStream`)"),
                     ("runtime", "TensorFlow's call around them (`runtime`)"),
                     ("host", "host Python between calls (`host`)")):
        lines.append(f"| {row} | " + " | ".join(
            f"{steps[s][key] * 1e3:.{digits}f} ms" for s in sides) + " |")
    lines.append("| programs called | " + " | ".join(
        str(steps[s]["calls"]) for s in sides) + " |")
    return lines


def profile_stages(sides: dict, repeats: int) -> dict:
    """Section 11's ``trace_steps`` of ``sides`` in this process: per side, medians of
    ``step``, ``xla`` (XLA's executables), ``runtime`` (TensorFlow's call around them),
    ``host`` (Python between calls) and ``calls``."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return separate_programs_module().trace_steps(sides, Path(tmp) / "trace", repeats)


# -- figure 3: memory, each side in a fresh process ------------------------------------------

_MEMORY_CHILD = r"""
import os, sys, json
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
os.environ["XLA_FLAGS"] = "--xla_dump_to=" + {dump!r}
sys.path.insert(0, {root!r})
sys.path.insert(0, {tools!r})
import numpy as np, tensorflow as tf
import bench, gradsplit_compiler as gsc
name, loss, sig, cuts, args = getattr(bench, {model!r})(np.random.default_rng(0))
split = gsc.split(loss, sig, cuts)
mono = bench.monolithic_step(loss, split.variables)
sides = {{"mono": lambda: mono(*args), "composed": lambda: split.value_and_gradients(*args),
         "stages": lambda: split.run_stages(args)}}
bench._block(sides[{side!r}]())
"""


def _xla_bytes(dump: Path) -> list[int]:
    """'Total bytes used' of every XLA program compiled, from XLA's buffer assignments."""
    sizes = []
    for path in dump.glob("*after_optimizations-buffer-assignment.txt"):
        for line in path.read_text().splitlines():
            if line.startswith("Total bytes used:"):
                sizes.append(int(line.split(":")[1].split()[0]))
    return sizes


def figure_memory(model_names):
    """XLA's own buffer plan (parameters, outputs and temporaries of each compiled program),
    read from its dumps: deterministic, unlike the process's resident set."""
    import tempfile

    rows = []
    for model in model_names:
        result = {}
        for side in ("mono", "composed", "stages"):
            with tempfile.TemporaryDirectory() as dump:
                code = _MEMORY_CHILD.format(root=str(ROOT), tools=str(ROOT / "tools"),
                                            model=model, side=side, dump=dump)
                subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               check=True)
                result[side] = _xla_bytes(Path(dump))
        mono, composed = max(result["mono"]), max(result["composed"])
        stage_peak = max(result["stages"])
        rows.append((model, mono, composed, stage_peak, sum(result["stages"])))
        log(f"[3] {model}: XLA buffers monolithic {mono / 2**20:.1f} MiB, composed "
            f"{composed / 2**20:.1f} MiB ({composed / mono:.3f}x), largest stage program "
            f"{stage_peak / 2**20:.1f} MiB")
    return rows


# -- figure 4: split() time ------------------------------------------------------------------


def chain(layers, rng):
    """``zoo.dense_chain``: ``layers`` tanh layers of 16 units, ``sum(h ** 2)``, cut at a
    quarter, half and three quarters; ``fn`` is the Python function (traced here)."""
    case = zoo.dense_chain(layers, 16, activation="tanh", loss="sum_square",
                           cut_after=(layers // 4, layers // 2, 3 * layers // 4), scale=0.2,
                           dtype=tf.float32, seed=rng)
    return (f"chain of {layers} layers", case.fn.python_function, case.input_signature,
            case.cuts, case.args(rng))


def profile_phases(profile: dict) -> dict:
    """``Split.profile`` with each stage's phases summed over the stages (``stages: import``
    is every stage's import), in first-seen order."""
    summed: dict = {}
    for phase, seconds in profile.items():
        key = "stages: " + phase.split(": ", 1)[1] if phase.startswith("stage ") else phase
        summed[key] = summed.get(key, 0.0) + seconds
    return summed


# Phases that are TensorFlow building what the training step's own trace builds too (the
# forward, then the gradient formulas); every other phase of a split is the compiler's.
TF_PHASES = ("trace", "stages: gradients")


def figure_split_time(quick):
    """One row per program: TF's trace of the training step and ``split``, timed in rounds,
    ``split.profile`` of the median split (stages summed; its ``trace`` phase is TF's trace
    of ``fn``, the table's TF trace), and for the smallest program the first
    ``value_and_gradients`` call (trace of the composed program and XLA's compile).

    A round times both sides back to back, the step's trace first in even rounds and the
    split first in odd ones; an untimed round comes first (TensorFlow's one-time work in a
    process: op registrations, gradient lookups, Keras imports). The row's ratio is the
    median of the rounds' ratios (each round's two sides ran within seconds of each other,
    whatever the host's speed did between rounds), with their quartiles; the times are each
    side's median. Rounds: the 100,000-node chain one (about 5 minutes on 2 cores), the
    others 9 to 15. Each timed side starts from a collected heap and includes collecting its
    own garbage (``gc.collect()``)."""
    rows = []
    rng = np.random.default_rng(0)
    cases = [(chain(250, rng), 3 if quick else 9, True),
             (chain(1000, rng), 1 if quick else 11, False)]
    if not quick:
        name, loss, sig, cuts, args = resnet50(rng)
        cases.insert(0, ((name, loss.python_function, sig, cuts, args), 15, False))
        cases.append((chain(25000, rng), 1, False))
    for (name, body, sig, cuts, args), repeats, first_call_too in cases:
        steps, splits = [], []
        warm = repeats > 1  # an untimed first round, but not for the 5-minute program

        def time_step(body=body, sig=sig):
            def step(*inputs):
                with tf.GradientTape() as tape:
                    value = body(*inputs)
                return tape.gradient(value, tape.watched_variables())

            # Each side starts from a collected heap and pays for collecting its own
            # garbage (what it keeps stays alive meanwhile): split() pauses the collector,
            # so without this its garbage would be collected inside the next step's trace.
            gc.collect()
            t = time.perf_counter()
            concrete = tf.function(step).get_concrete_function(*sig)
            t1 = time.perf_counter()
            gc.collect()
            t2 = time.perf_counter()
            del concrete
            return t2 - t, t2 - t1

        def time_split(body=body, sig=sig, cuts=cuts):
            gc.collect()
            t = time.perf_counter()
            split = gsc.split(tf.function(body), sig, cuts)
            t1 = time.perf_counter()
            gc.collect()
            t2 = time.perf_counter()
            return t2 - t, t2 - t1, split

        for r in range(repeats + warm):
            if r % 2 == 0:
                step_time = time_step()
                split_time = time_split()
            else:
                split_time = time_split()
                step_time = time_step()
            if r or not warm:
                steps.append(step_time)
                splits.append(split_time)
            del split_time
        ratios = [b[0] / a[0] for a, b in zip(steps, splits)]  # round by round
        splits.sort(key=lambda s: s[0])
        sp, split_collect, split = splits[(len(splits) - 1) // 2]
        del splits
        phases = profile_phases(split.profile)
        st, step_collect = sorted(steps)[(len(steps) - 1) // 2]  # as the split: lower median
        tr = phases["trace"]
        first_call = None
        if first_call_too:
            t = time.perf_counter()
            _block(split.value_and_gradients(*args))
            first_call = time.perf_counter() - t
        nodes = split.graph.number_of_nodes()
        ratio, low, high = median_and_quartiles(ratios)
        rows.append({"name": name, "nodes": nodes, "trace": tr, "step": st, "split": sp,
                     "phases": phases, "first_call": first_call,
                     "split_collect": split_collect, "step_collect": step_collect,
                     "ratios": ratios})
        tf_work = sum(phases.get(p, 0.0) for p in TF_PHASES)
        log(f"[4] {name}: {nodes} nodes, trace {tr:.2f} s, trace of the training step "
            f"{st:.2f} s, split {sp:.2f} s ({sp / tr:.2f}x the trace, {ratio:.3f}x the "
            f"step's trace (median of rounds, quartiles {low:.2f}-{high:.2f}), "
            f"{sp / nodes * 1e3:.2f} ms per node; TensorFlow's trace and "
            f"gradients {tf_work:.2f} s, the compiler's phases {sp - tf_work:.2f} s; round "
            f"by round {', '.join(f'{x:.2f}' for x in ratios)})")
        del split
    return rows


def median_and_quartiles(values) -> tuple[float, float, float]:
    """The median of ``values`` and their first and third quartiles (numpy's linear
    interpolation)."""
    low, median, high = np.percentile(np.asarray(values, dtype=float), [25, 50, 75])
    return float(median), float(low), float(high)


SPLIT_TIME_NOTE = """\
A split traces `fn` (TensorFlow's `trace`, the TF trace column), then traces each stage's
gradient (`stages: gradients`: TensorFlow's gradient functions, called by a
`tf.GradientTape` the stage's imported ops are recorded on): together what the training
step's own trace does, which is the floor. Everything else is the compiler's: `convert`
(the trace to the networkx IR), the passes and their `checks`, and per stage (summed over
the stages) `piece` (the stage's GraphDef), `import` (into the scratch graph its gradient
is traced in), `trace` (the rest of that scratch graph: placeholders, captured variables),
`convert`, `cut` (forward, backward, residuals), `split backward` (B and W for zero-bubble
schedules), `pieces` (their GraphDefs), `functions` (the stage's `tf.function`s, not yet
traced). The split's `profile` holds these (`Split.profile`). The first
`value_and_gradients` call, which traces the composed program and compiles it with XLA,
is not part of `split()`; it is shown for the smallest program only (minutes for the
larger ones). Each round times the step's trace and the split back to back (the step's
first in even rounds, the split's first in odd ones), after an untimed round. The ratio is
the median of the rounds' own ratios, with their quartiles: the host's speed moves by up to a
third between rounds on this shared machine (the same step's trace took 4.1 to 5.9 s in one
process), and within a round both sides see about the same host. The times are each side's
median. Rounds: 15 (ResNet50), 11 (chain of 1,000), 9 (chain of 250) and 1 (the
100,000-node chain of 25,000 layers, about 5 minutes); the section takes about 15 minutes.
Each side starts from a collected heap and
its time includes collecting its own garbage (`gc.collect()` after it, which walks every
object of the process whichever side it follows: the step's is in parentheses): `split()`
pauses Python's collector while it runs, and without this its garbage was collected inside
the next measurement. When `split()` resumes the collector, Python collects the young objects
it made (the scratch graphs each stage's gradient was traced in are cyclic garbage), inside
`split()` but after its profile's last phase."""


def figure_split_floor(quick: bool) -> list[dict]:
    """Section 4's last table: ``tools/split_floor.py`` (plain TensorFlow) in a process of
    its own."""
    import json

    done = subprocess.run([sys.executable, str(ROOT / "tools" / "split_floor.py"), "--json"]
                          + (["--quick"] if quick else []), capture_output=True, text=True,
                          timeout=3600)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("[")]
    if not lines:
        log(f"split_floor.py failed (exit {done.returncode}): {done.stderr[-2000:]}")
        return []
    rows = json.loads(lines[-1])
    for r in rows:
        log(f"[4] floor, {r['name']}: {r['floor'] / r['step']:.3f}x the step's trace")
    return rows


SPLIT_FLOOR_NOTE = """\
`tools/split_floor.py` measures, in plain TensorFlow and in a process of its own, what any
compiler that exports the trace and imports it back pays TensorFlow before doing anything of
its own: the trace of `fn`, `as_graph_def`, `import_graph_def` of the whole program into a
new graph, `tf.gradients` of the loss there, and collecting the garbage of it all. Medians
of 3 interleaved rounds with the training step's trace (which includes collecting its own).
A split builds each stage's gradient on a `tf.GradientTape` the imported ops are recorded on
(`_tf_internal.vjp_on_tape`), not with `tf.gradients`: the table shows why (the same
gradient functions, a quarter more of TensorFlow's own work per op around them)."""


def split_time_markdown(rows, floor=()) -> list[str]:
    """Section 4's tables: the times, the phases of each split, and the floor of exporting
    and importing in plain TensorFlow."""
    lines = ["## 4. `split()` time", "",
             "| program | nodes | TF trace | TF trace of the training step | split | "
             "split / trace | split / step trace (median of the rounds' ratios; quartiles) | "
             "ms per node, step trace | ms per node, split |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tr, st, sp, nodes = r["trace"], r["step"], r["split"], r["nodes"]
        if len(r.get("ratios", ())) > 1:
            ratio, low, high = median_and_quartiles(r["ratios"])
            paired = f"**{ratio:.3f}** ({low:.2f}-{high:.2f})"
        else:
            paired = f"{sp / st:.3f} (1 round)"
        lines.append(f"| {r['name']} | {nodes} | {tr:.2f} s | {st:.2f} s | {sp:.2f} s "
                     f"| {sp / tr:.2f} | {paired} | {st / nodes * 1e3:.3f} | "
                     f"{sp / nodes * 1e3:.3f} |")
    rounds = [f"{r['name']} {', '.join(f'{x:.2f}' for x in r['ratios'])}" for r in rows
              if len(r.get("ratios", ())) > 1]
    if rounds:
        lines += ["", "Split / step trace, round by round: " + "; ".join(rounds) + "."]
    phases: list[str] = []
    for r in rows:
        phases += [p for p in r["phases"] if p not in phases]
    lines += ["", "Where each split's time goes (`Split.profile`, seconds and share of the "
              "split):", "",
              "| phase | " + " | ".join(r["name"] for r in rows) + " |",
              "|---|" + "---|" * len(rows)]

    def cell(r, seconds):
        return f"{seconds:.2f} s ({100 * seconds / r['split']:.0f}%)"

    for p in phases:
        lines.append(f"| {p} | " + " | ".join(cell(r, r["phases"].get(p, 0.0))
                                              for r in rows) + " |")
    lines.append("| Python's collection when `split()` resumes its collector (outside "
                 "`Split.profile`) | "
                 + " | ".join(cell(r, r["split"] - r["split_collect"]
                                   - sum(r["phases"].values())) for r in rows) + " |")
    lines.append("| `gc.collect()` after the split (after the step's trace, in the step's "
                 "time: in parentheses) | "
                 + " | ".join(cell(r, r["split_collect"]) + f" ({r['step_collect']:.2f} s)"
                              for r in rows) + " |")
    ours = [r["split"] - r["split_collect"] - sum(r["phases"].get(p, 0.0) for p in TF_PHASES)
            for r in rows]
    lines.append("| **the compiler's (all but `trace`, `stages: gradients` and "
                 "`gc.collect()`)** | "
                 + " | ".join(cell(r, o) for r, o in zip(rows, ours)) + " |")
    lines.append("| first `value_and_gradients` call (trace and XLA compile; not in "
                 "split) | " + " | ".join("-" if r["first_call"] is None else
                                          f"{r['first_call']:.2f} s" for r in rows) + " |")
    lines += ["", SPLIT_TIME_NOTE, ""]
    if floor:
        lines += ["The floor of exporting and importing back, in plain TensorFlow:", "",
                  "| program | TF trace of the training step | trace | export | import | "
                  "tf.gradients | collect | sum / step trace |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in floor:
            lines.append(f"| {r['name']} | {r['step']:.2f} s | {r['trace']:.2f} s | "
                         f"{r['export']:.2f} s | {r['import']:.2f} s | "
                         f"{r['gradients']:.2f} s | {r['collect']:.2f} s | "
                         f"{r['floor'] / r['step']:.3f} |")
        lines += ["", SPLIT_FLOOR_NOTE, ""]
    return lines


# -- figure 5: the thread's answers ----------------------------------------------------------

# Each timed sample of figure 5 is a block of back-to-back calls lasting about this long.
CUT_BLOCK_SECONDS = 0.02


def interleaved_blocks(fns: dict, repeats: int, block_seconds: float = CUT_BLOCK_SECONDS
                       ) -> dict:
    """Median seconds per call of each function (no arguments).

    Each sample is a block of back-to-back calls lasting about ``block_seconds`` (at least
    one call), after one untimed call of the same function, so that no function is timed
    cold after another one's long call; in every repeat the blocks of all functions take
    turns, so a slow spell of the machine costs them all alike.
    """
    calls = {}
    for k, fn in fns.items():
        for _ in range(2):  # warm-up: compiles
            _block(fn())
        t = time.perf_counter()
        _block(fn())
        once = max(time.perf_counter() - t, 1e-7)
        calls[k] = max(1, min(10_000, round(block_seconds / once)))
    samples: dict = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            _block(fn())
            t = time.perf_counter()
            for _ in range(calls[k]):
                result = fn()
            _block(result)
            samples[k].append((time.perf_counter() - t) / calls[k])
    return {k: float(np.median(v)) for k, v in samples.items()}


def cut_size_answers(cut, per_scalar_limit, jacobian_limit) -> dict:
    """The program of ``gradsplit demo`` (``cli.seed_problem``: ``y = tanh(x W + b)``, ``W``
    256x16, float32, XLA) with a cut of ``cut`` elements (batch ``cut / 16``, as the demo's
    ``--cut-size``), and the answers to time, each a call on flat tensors: the monolithic
    tape, ours, and within their limits the thread's two answers."""
    from gradsplit_compiler.cli import seed_problem as demo
    from gradsplit_compiler.cli.demo import DemoConfig

    config = DemoConfig(cut_size=cut, picture=None)
    problem = demo.seed_problem(config, "float32")
    split = gsc.split(problem.loss, problem.signature, cuts=["y"])
    builders = {"mono": demo.monolithic_gradient, "jacobian": demo.jacobian_gradient,
                "per_scalar": demo.per_scalar_gradient}
    limits = {"mono": cut, "jacobian": jacobian_limit, "per_scalar": per_scalar_limit}
    answers = {"ours": lambda: split.value_and_gradients(*problem.args)}
    for name, build in builders.items():
        if cut <= limits[name]:
            call = _tf_internal.flat_caller(build(problem, True))
            answers[name] = lambda call=call: call(*problem.args)
    return answers


def figure_cut_size(sizes, per_scalar_limit, jacobian_limit, repeats):
    """Per cut size ``(elements, {answer: time / monolithic time}, monolithic seconds)``,
    every answer of every size timed in one interleaved loop (``interleaved_blocks``)."""
    fns = {}
    for cut in sizes:
        for name, fn in cut_size_answers(cut, per_scalar_limit, jacobian_limit).items():
            fns[(cut, name)] = fn
        log(f"[5] built the answers for a cut of {cut} elements")
    times = interleaved_blocks(fns, repeats)
    rows = []
    for cut in sizes:
        mono = times[(cut, "mono")]
        ratios = {name: t / mono for (n, name), t in times.items() if n == cut}
        log(f"[5] cut of {cut} elements: monolithic {mono * 1e6:.0f} us; " + ", ".join(
            f"{k} {v:.2f}x" for k, v in ratios.items() if k != "mono"))
        rows.append((cut, ratios, mono))
    monos = [mono for _, _, mono in rows]
    if any(b < 0.9 * max(monos[:i + 1]) for i, b in enumerate(monos[1:])):
        log("[5] warning: the monolithic time is not monotone in the cut size (within 10%): "
            "the machine was busy, run again")
    return rows


# -- report ------------------------------------------------------------------------------------


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def machine() -> str:
    cpu = cpu_name()
    return (f"{cpu}, {os.cpu_count()} cores; Python {platform.python_version()}, "
            f"TensorFlow {tf.__version__}, numpy {np.__version__}")


STAGES_NOTE = """\
*How `run_stages` is compared, and why it costs more than one program.* The MLP's row also
times section 11's program (`tools/xla_separate_programs.py`, plain TensorFlow, nothing of this
package): the same stages as jit-compiled forward and backward programs, called through their
concrete functions on flat tensors, on this model's weights and data and checked against the
tape, in the same interleaved loop as `run_stages` (ten times the rounds of the other
models), so the sentence under the table gives `run_stages` over the plain stages of one run
as the median of the rounds' own ratios, each round calling both within milliseconds of each
other (each side moves by about 0.15 over one program between quiet runs, both the same way,
and a single call by up to 2x). Every side is blocked on the loss and the variables'
gradients only (`run_stages` also returns the arguments' cotangents, computed but not copied
to the host; an eager XLA call on the CPU returns when its program has run). The profile table
(TensorFlow's profiler, section 11's `trace_steps` in this process) splits a step into XLA's
executables running (`CpuExecutable::ExecuteAsyncOnStream`), TensorFlow's eager call around
each of them (`runtime`) and the host's Python between calls (`host`). XLA's optimized HLO of
the stage programs does the same arithmetic as the monolithic one: the same dots and fusions,
no forward op in any backward, no copy of a large tensor (section 11 counts them). Separate
programs cost two things that no driver removes (section 11): XLA's executables of the stages
take longer than the one program (they lose the overlap of independent work and the fusion
across each cut), and each program called adds a fixed cost (TensorFlow's dispatch and XLA's
launch, of the order of section 11's `empty program`, and the Python between calls). Both grow
with the number of stages and shrink, as a share, as stages grow (ResNet50 about 1.0); no XLA
flag or thread setting removes them. What `run_stages` adds over the plain stages is its own:
the Python of the compose loop (arguments checked, cotangents summed by name, about 15-25 us
per program called on this machine), and on the last stage the cotangent of every argument it
reads (the target's too: `run_stages` returns them) and a few shapes that travel as small
residuals. What the compiler removed is what it added itself: stages are called through
`stage.callers` (a flat call into the concrete function, without `tf.function`'s argument
binding, 0.3-1 ms for a stage with 40 residuals, and without TensorFlow's own per-call
re-flattening of the captured variables and rebuilding of the outputs' structure, about
40 us per program); a residual that is a stage input or output, also through `Identity` ops
(a cut's mark), is passed on by the caller instead of being returned and copied by the program
(XLA:CPU returns a parameter or a second alias of an output only by copying it); and the
backward reads again the variables the program never writes, and reshapes or casts of them and
of counts, instead of receiving them as residuals copied out of the forward (a transformer
block's reshaped attention kernels were). The column before the plain stages is the baseline
a user has without this tool: the same MLP stages by hand (each forward returning its
activations, each backward an explicit VJP, called as concrete functions with TensorFlow's
per-call argument binding), checked against the tape before timing. Single programs vary by
up to 2x from call to call on this shared 2-core machine; the medians of interleaved repeats
are stable to about 0.05."""


CUT_SIZE_NOTE = """\
The program of `gradsplit demo`, `loss = mse(tanh(x W + b), y0)` with `W` 256x16, cut at `y`,
whose size grows with the batch (`cut / 16` rows, as the demo's `--cut-size`). Each answer
returns `dL/dW` and `dL/db`, compiled with XLA and called on flat tensors: the monolithic
`tape.gradient`, ours (`split.value_and_gradients`), and the two answers the original thread
got, `GradientTape.jacobian(y, [W, b])` chained with `dL/dy` and `tf.gradients` once per
scalar of `y` (built up to 256 elements, the Jacobian up to 4,096: beyond, minutes to build
or gigabytes, "-"). Every answer of every size is timed in one loop: in each of the repeats,
each answer runs a block of back-to-back calls lasting about 20 ms after one untimed call, so
that nothing is timed cold after another answer's long call, and the blocks take turns; the
table gives the median time per call over the repeats. The monolithic time is a fixed cost per
call (the call, XLA's launch, the results copied out), flat while it dominates (to about 256
elements), plus arithmetic proportional to the batch, which makes it grow from about a
thousand elements on: medians of a quiet run are monotone in the size within 10%, and
`tools/bench.py` warns when they are not (a busy machine: run it again). The ratios are those
`gradsplit demo` prints for the same `--cut-size`; one demo run times each answer in 7
repeats of about 40 ms and varies more from run to run."""


def speed_markdown(speed) -> list[str]:
    """Section 1-2: the table, this run's ratio of ``run_stages`` over section 11's plain
    stages and where their steps' time goes (TensorFlow's profiler), and the note."""
    lines = ["## 1-2. Time per training step, over the monolithic XLA step", "",
             "| model | stages | monolithic | composed `value_and_gradients` (target "
             "1.02, at most 1.10) | stages one by one, `run_stages` (target 1.10) | "
             "the same stages written by hand | the same stages in plain TensorFlow "
             "(section 11's program) |",
             "|---|---|---|---|---|---|---|"]
    for name, k, t, *_ in speed:
        hand = f"{t['hand'] / t['mono']:.3f}" if "hand" in t else "-"
        plain = f"{t['plain'] / t['mono']:.3f}" if "plain" in t else "-"
        lines.append(f"| {name} | {k} | {t['mono'] * 1e3:.2f} ms | "
                     f"{t['composed'] / t['mono']:.3f} | {t['stages'] / t['mono']:.3f} | "
                     f"{hand} | {plain} |")
    for name, k, t, profile, paired in speed:
        if not paired:
            continue
        ratio, low, high = paired
        lines += ["", f"In this run, on the {name} ({k} stages), `run_stages` took "
                  f"**{ratio:.3f}x** the same stages in plain TensorFlow: the median of the "
                  "ratios of the two sides' calls in each round of the interleaved loop "
                  f"(quartiles {low:.3f}-{high:.3f}; their medians' ratio "
                  f"{t['stages'] / t['plain']:.3f})."]
        if profile:
            sides = [s for s in ("mono", "run_stages", "plain") if s in profile]
            label = {"mono": "monolithic", "run_stages": "`run_stages`",
                     "plain": "plain stages (section 11)"}
            lines += ["", "Where a step's time goes, the same sides in the same process "
                      "(TensorFlow's profiler, as in section 11; medians over the profiled "
                      "steps):", "",
                      *profile_table(profile, sides, [label[s] for s in sides], 3)]
            if "run_stages" in profile and "plain" in profile:
                ours, theirs = profile["run_stages"], profile["plain"]
                per = {key: (ours[key] / max(ours["calls"], 1)
                             - theirs[key] / max(theirs["calls"], 1)) * 1e6
                       for key in ("runtime", "host")}
                lines += ["", f"Per program called, `run_stages` spent {per['runtime']:+.1f} "
                          f"us in TensorFlow's call and {per['host']:+.1f} us of host Python "
                          "beside the plain stages."]
    return lines + ["", STAGES_NOTE, ""]


def write_report(path, command, speed, memory, split_rows, cut_rows, split_floor=()):
    lines = ["# Benchmarks", "", f"Made by `{command}` on {time.strftime('%Y-%m-%d')}.", "",
             f"Machine: {machine()}.", "",
             "Every figure is a ratio measured in the same run: medians of interleaved "
             "repeats after warm-up. Lower is better; 1.00 means no cost over the monolithic "
             "XLA-compiled `tape.gradient` of the original function. Every baseline is "
             "called the way the split's programs are, on flat tensors without "
             "`tf.function`'s per-call argument binding, so the ratios compare programs "
             "and drivers, not Python call paths.", ""]
    if speed:
        lines += speed_markdown(speed)
    if memory:
        lines += ["## 3. Peak memory, composed over monolithic (target 1.10)", "",
                  "XLA's buffer assignment of each compiled program ('Total bytes used': "
                  "parameters, outputs and temporaries), read from XLA's dumps in a fresh "
                  "process per side. With the stages run one by one, a device holds one "
                  "stage program at a time; the last column is all of them together.", "",
                  "| model | monolithic | composed | ratio | largest stage program | all "
                  "stage programs |", "|---|---|---|---|---|---|"]
        for model, mono, composed, stage_peak, stage_sum in memory:
            lines.append(f"| {model} | {mono / 2**20:.1f} MiB | {composed / 2**20:.1f} MiB | "
                         f"{composed / mono:.3f} | {stage_peak / 2**20:.1f} MiB | "
                         f"{stage_sum / 2**20:.1f} MiB |")
        lines.append("")
    if split_rows:
        lines += split_time_markdown(split_rows, split_floor)
    if cut_rows:
        lines += ["## 5. The thread's answers as the cut grows (the demo's program, float32, "
                  "XLA)", "", CUT_SIZE_NOTE, "",
                  "![ratio against cut size](docs/bench_cut_size.png)", "",
                  "| cut elements | monolithic | ours | GradientTape.jacobian | per-scalar "
                  "tf.gradients |", "|---|---|---|---|---|"]
        for n, r, mono in cut_rows:
            cells = [f"{r[k]:.2f}x" if k in r else "-" for k in ("ours", "jacobian",
                                                                  "per_scalar")]
            lines.append(f"| {n} | {mono * 1e6:.0f} us | " + " | ".join(cells) + " |")
        lines.append("")
    Path(path).write_text("\n".join(lines))


def plot_cut_size(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for key, label, style in (("per_scalar", "per-scalar tf.gradients", "o-"),
                              ("jacobian", "GradientTape.jacobian", "s-"),
                              ("ours", "gradsplit (VJP by parts)", "^-")):
        pts = [(n, r[key]) for n, r, _ in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), style, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("elements in the cut tensor y")
    ax.set_ylabel("time / monolithic gradient")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.legend()
    ax.set_title("Gradient through a cut: cost against cut size")
    fig.tight_layout()
    fig.savefig(path)


_CLUSTER_CHILD = r"""
import json, os, sys, time
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np
import tensorflow as tf
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 4)
import gradsplit_compiler as gsc
from gradsplit_compiler import zoo
from gradsplit_compiler.run.cluster import LocalCluster

width, depth, batch, k, m, repeats = (int(a) for a in sys.argv[1:7])
cluster = LocalCluster(k)
cluster.connect()  # before any variable: this process's context changes
rng = np.random.default_rng(0)
case = zoo.dense_chain(depth, width, activation="tanh", loss="mse", stages=k,
                       dtype=tf.float32, batch=batch, seed=rng)
split = gsc.split(case.fn, case.input_signature, case.cuts)
x, y = case.args(rng)
try:
    predicted = sum(row["boundary_bytes"] for row in split.summary(batch_size=batch))
    source = "split.summary()"
except Exception:  # costs.py missing or different
    predicted = sum(int(np.prod([batch if d is None else d for d in spec.shape]))
                    * spec.dtype.size for st in split.stages
                    for name, spec in zip(st.inputs, st.input_specs)
                    if name not in split.arg_names)
    source = "stage input_specs"
rows = []
for label, devices in [("one process, logical CPUs", [f"/CPU:{d}" for d in range(k)]),
                       (f"{k} worker processes", cluster.devices[:k])]:
    pipe = gsc.pipeline(split, m, "1f1b", devices=devices, loss_reduction="mean",
                        timeout=300)
    pipe.step(x, y)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        value, grads = pipe.step(x, y)
        float(value)
        times.append(time.perf_counter() - t0)
    rows.append({"run": label, "step_ms": 1e3 * float(np.median(times)),
                 "bytes": pipe.bytes_moved(), "value": float(value)})
print("RESULT " + json.dumps({"rows": rows, "predicted": predicted, "source": source,
                              "config": [width, depth, batch, k, m, repeats]}), flush=True)
cluster.stop()
os._exit(0)
"""


def figure_cluster(quick, repeats):
    """6. The pipeline on a LocalCluster (one worker process per stage, TF's gRPC runtime)
    beside the same pipeline in one process (logical CPU devices): median time per step,
    bytes moved between devices per step, and the boundary bytes the split predicts
    (``split.summary()``). Runs in a subprocess: connecting changes a process's context."""
    width, depth, batch, k, m = (256, 4, 64, 2, 4) if quick else (512, 8, 128, 4, 8)
    done = subprocess.run(
        [sys.executable, "-c", _CLUSTER_CHILD, *map(str, (width, depth, batch, k, m,
                                                           repeats))],
        capture_output=True, text=True, timeout=900)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        log(f"figure 6 failed (exit {done.returncode}): {done.stderr[-2000:]}")
        return ""
    got = __import__("json").loads(lines[-1][len("RESULT "):])
    table = [
        "\n## 6. The pipeline across processes\n",
        f"MLP {depth}x{width} float32, batch {batch}, {k} stages, {m} micro-batches, 1F1B; "
        f"median of {repeats} steps after a warm-up. Boundary bytes predicted by "
        f"{got['source']}: {got['predicted']:,} per step (forward; the backward sends as "
        f"many cotangent bytes back).\n",
        "| run | ms / step | activations B | cotangents B | inputs B | results B | "
        "replicas B |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in got["rows"]:
        b = row["bytes"]
        table.append(f"| {row['run']} | {row['step_ms']:.1f} | {b['activations']:,} | "
                     f"{b['cotangents']:,} | {b['inputs']:,} | {b['results']:,} | "
                     f"{b['replicas']:,} |")
    text = "\n".join(table) + "\n"
    log(text)
    return text


# -- figure 7: training steps ------------------------------------------------------------------


def logical_cpus(count: int) -> None:
    """Split this process's CPU into ``count`` logical devices (before TensorFlow starts)."""
    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0],
        [tf.config.LogicalDeviceConfiguration()] * count)


def run_child(flag: str, config: dict, figure: int) -> dict | None:
    """Run this script with ``flag`` and ``config`` (JSON) in a process of its own and return
    the dict it prints on its ``RESULT`` line; ``None`` (logged) if it printed none."""
    import json

    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), flag,
                           json.dumps(config)], capture_output=True, text=True, timeout=900)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        log(f"figure {figure} failed (exit {done.returncode}): {done.stderr[-2000:]}")
        return None
    return json.loads(lines[-1][len("RESULT "):])


TRAINING_MODELS = {
    "mlp": lambda rng, **kw: mlp(rng, **kw),
    "transformer": lambda rng, **kw: transformer(rng, **kw),
}


def monolithic_train_step(loss, variables, optimizer):
    """Forward, backward and ``optimizer`` in one ``tf.function(jit_compile=True)``."""
    python_fn = loss.python_function
    optimizer.build(variables)

    @tf.function(jit_compile=True)
    def step(*args):
        with tf.GradientTape() as tape:
            value = python_fn(*args)
        optimizer.apply(tape.gradient(value, variables), variables)
        return value

    return step


def training_child(config: dict) -> dict:
    """Figure 7's measurements, in a process of their own (it sets up 4 logical CPUs and
    connects to a LocalCluster before creating any variable). ``config``: ``models`` (a
    list of ``[name, keyword arguments]`` for ``TRAINING_MODELS``), ``workers``,
    ``microbatches``, ``repeats``, ``learning_rate``."""
    import keras

    from gradsplit_compiler.run.cluster import LocalCluster

    workers = config["workers"]
    logical_cpus(workers)
    cluster = LocalCluster(workers)
    cluster.connect()
    make = lambda: keras.optimizers.Adam(config["learning_rate"])  # noqa: E731
    m, rows = config["microbatches"], []
    try:
        for model, kwargs in config["models"]:
            name, loss, sig, cuts, args = TRAINING_MODELS[model](np.random.default_rng(0),
                                                                 **kwargs)
            split = gsc.split(loss, sig, cuts)
            trainable = split.trainable_variables
            index = {id(v): i for i, v in enumerate(split.variables)}
            position = [index[id(v)] for v in trainable]
            mono = monolithic_train_step(loss, trainable, make())
            caller = make()
            caller.build(trainable)
            # a careful caller compiles its optimizer step too
            apply = tf.function(lambda grads, opt=caller, vs=trainable: opt.apply(grads, vs),
                                jit_compile=True)
            placements = [("one process, logical CPUs",
                           [f"/CPU:{d}" for d in range(workers)]),
                          (f"{workers} worker processes", cluster.devices)]
            for where, devices in placements:
                times, moved = _training_times(split, devices, args, m, make, apply,
                                               position, mono, config["repeats"])
                rows.append({"model": name, "stages": len(split.stages), "where": where,
                             "times": times, "bytes": moved})
                log(f"[7] {name}, {where}: monolithic {times['mono'] * 1e3:.1f} ms, step + "
                    f"apply {times['step_apply'] / times['mono']:.2f}x, train_step "
                    f"{times['train_step'] / times['mono']:.2f}x")
    finally:
        cluster.stop()
    return {"rows": rows, "config": config}


def _training_times(split, devices, args, m, make, apply, position, mono, repeats):
    """Median seconds of the three training steps on ``devices``, interleaved, and the bytes
    each pipeline moved in its last step."""
    stepping = gsc.pipeline(split, m, "1f1b", devices, loss_reduction="mean", timeout=600)
    training = gsc.pipeline(split, m, "1f1b", devices, loss_reduction="mean",
                            optimizer=make(), timeout=600)

    def step_and_apply():
        value, grads = stepping.step(*args)
        apply([grads[i] for i in position])
        return value

    times = interleaved({"mono": flat(mono, *args), "step_apply": step_and_apply,
                         "train_step": lambda: training.train_step(*args)}, repeats)
    return times, {"step_apply": stepping.bytes_moved(), "train_step": training.bytes_moved()}


TRAINING_NOTE = """\
*Reading it.* `step + apply` is the pipeline as it was before it held training state: every
step refreshes each stage's replicas of the variables it does not hold (`replicas`), sends
every gradient back to the caller (`results`), and the caller applies its optimizer there (one
XLA program). `train_step` keeps each stage's variables and optimizer slots on its device:
only activations, cotangents, the gradients of variables tied between devices and a few
scalars travel. When the devices share a few cores (the logical CPUs of one process, or worker
processes on one machine), their stages cannot run at the same time: a pipeline step then
costs more than the one XLA program, which spreads each op over every core and dispatches
nothing per action, and the ratios say what the separate stage programs, the schedule and
the traffic cost. What pipelining buys needs devices with cores (or accelerators) of their
own. Between the 4-worker `train_step` and the one-process one, the bytes differ by little
(the inputs go to another process too): what is left is the cost per call, each forward and
backward of each micro-batch being a remote call that its neighbour waits for, and four
processes with thread pools of their own sharing two cores."""


def figure_training(quick: bool, repeats: int, workers: int = 4,
                    models: list | None = None) -> str:
    """7. ``step`` plus the caller's optimizer against ``train_step``, in one process and on
    ``workers`` worker processes, beside the monolithic XLA training step (a subprocess:
    connecting changes a process's context). The section's markdown."""

    if models is None:
        models = ([["mlp", {"layers": 4, "width": 64, "batch": 32}],
                   ["transformer", {"blocks": 2, "seq": 8, "dim": 16, "heads": 2,
                                    "batch": 8}]] if quick else
                  [["mlp", {}], ["transformer", {}]])
    config = {"models": models, "workers": workers, "microbatches": 4, "repeats": repeats,
              "learning_rate": 1e-4}
    got = run_child("--training-child", config, 7)
    if got is None:
        return ""
    table = [
        "\n## 7. Training steps: the caller's optimizer against stage-resident state\n",
        f"Adam, float32, {config['microbatches']} micro-batches, 1F1B; medians of "
        f"{repeats} interleaved repeats after warm-up. Time over one XLA program doing "
        "forward, backward and Adam (`tf.function(jit_compile=True)`, in the client "
        "process); bytes moved between devices per step.\n",
        "| model | stages | where | monolithic | `step` + caller's Adam | `train_step` | "
        "bytes, step + Adam (replicas / results) | bytes, train_step (gradients / scalars) |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in got["rows"]:
        t, b = row["times"], row["bytes"]
        before, after = b["step_apply"], b["train_step"]
        table.append(
            f"| {row['model']} | {row['stages']} | {row['where']} | "
            f"{t['mono'] * 1e3:.1f} ms | {t['step_apply'] / t['mono']:.2f}x | "
            f"{t['train_step'] / t['mono']:.2f}x | {sum(before.values()):,} "
            f"({before['replicas']:,} / {before['results']:,}) | {sum(after.values()):,} "
            f"({after['gradients']:,} / {after['scalars']:,}) |")
    text = "\n".join(table) + "\n\n" + TRAINING_NOTE + "\n"
    log(text)
    return text


# -- figure 8: Keras fit through the pipeline ------------------------------------------------


class _StepTimes:
    """A Keras callback recording each training batch's wall time."""

    def __init__(self):
        import keras

        class Callback(keras.callbacks.Callback):
            def on_train_batch_begin(cb, batch, logs=None):
                cb.start = time.perf_counter()

            def on_train_batch_end(cb, batch, logs=None):
                self.times.append(time.perf_counter() - cb.start)

        self.times: list[float] = []
        self.callback = Callback()


def keras_child(config: dict) -> dict:
    """Figure 8's measurements in a process of its own (4 logical CPUs): seconds per ``fit``
    step of the plain model (``jit_compile=True``) and of ``PipelineModel``, medians over
    the steps of the epochs after the first (which compiles)."""
    import keras

    from gradsplit_compiler.keras import PipelineModel

    logical_cpus(4)
    layers, width, batch = config["layers"], config["width"], config["batch"]

    def build():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((width,))
        h = inputs
        for i in range(layers):
            h = keras.layers.Dense(width, activation="tanh", name=f"dense{i}")(h)
        return keras.Model(inputs, keras.layers.Dense(10, name="head")(h))

    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch * config["steps"], width)).astype("float32")
    y = rng.normal(size=(batch * config["steps"], 10)).astype("float32")
    stages = config["stages"]
    cuts = [f"dense{(i + 1) * layers // stages - 1}" for i in range(stages - 1)]
    # (row, model): plain fit, then K=1 (the whole model as one stage on one device, one
    # micro-batch: what the pipeline itself costs) both ways, then K stages on K devices
    runs = [({"run": "plain model.fit(jit_compile=True)", "stages": 1, "m": 1}, build())]
    for one_program, check, name in (
            (None, "apply", "PipelineModel, one stage, on_nonfinite='apply' (as plain fit)"),
            (None, "raise", "PipelineModel, one stage (the step as one program)"),
            (False, "raise", "PipelineModel, one stage, one program per action")):
        runs.append(({"run": name, "stages": 1, "m": 1},
                     PipelineModel(build(), num_stages=1, microbatches=1, devices=["/CPU:0"],
                                   one_program=one_program, on_nonfinite=check)))
    for m in config["microbatches"]:
        runs.append(({"run": f"PipelineModel, {stages} stages on 4 logical CPUs",
                      "stages": stages, "m": m},
                     PipelineModel(build(), cuts=cuts, microbatches=m,
                                   devices=[f"/CPU:{d}" for d in range(stages)])))
    times: list[list[float]] = [[] for _ in runs]
    for i, (_, model) in enumerate(runs):
        model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="mse",
                      **({"jit_compile": True} if i == 0 else {}))
        model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0)  # compiles
    # epochs interleaved across the runs, so that a change of load hits every run alike
    for _ in range(config["epochs"]):
        for i, (_, model) in enumerate(runs):
            recorder = _StepTimes()
            model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0,
                      callbacks=[recorder.callback])
            times[i] += recorder.times
    plain = float(np.median(times[0]))
    rows = []
    for (row, _), measured in zip(runs, times):
        seconds = float(np.median(measured))
        rows.append(dict(row, seconds=seconds))
        log(f"[8] {row['run']} (M={row['m']}): {seconds * 1e3:.1f} ms per step, "
            f"{seconds / plain:.2f}x plain fit")
    return {"rows": rows, "config": config}


def figure_keras(quick: bool) -> str:
    """8. ``PipelineModel.fit`` against plain ``model.fit(jit_compile=True)``, per step."""

    config = ({"layers": 4, "width": 64, "batch": 32, "steps": 4, "epochs": 1,
               "stages": 4, "microbatches": [1, 8]} if quick else
              {"layers": 8, "width": 512, "batch": 128, "steps": 8, "epochs": 5,
               "stages": 4, "microbatches": [1, 8]})
    got = run_child("--keras-child", config, 8)
    if got is None:
        return ""
    plain = got["rows"][0]["seconds"]
    table = [
        "\n## 8. Keras `fit` through the pipeline\n",
        f"MLP {config['layers']}x{config['width']} (tanh), float32, batch {config['batch']}, "
        f"Adam, loss mse; median seconds per `fit` step (Keras' own loop, callbacks and "
        f"metrics included) over {config['epochs']} epochs of {config['steps']} steps after "
        "one epoch of warm-up, each run's epochs interleaved with the others', in one "
        "process with 4 logical CPUs.\n",
        "| run | stages | micro-batches | ms per step | over plain fit |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in got["rows"]:
        table.append(f"| {row['run']} | {row['stages']} | {row['m']} | "
                     f"{row['seconds'] * 1e3:.1f} | {row['seconds'] / plain:.2f}x |")
    text = "\n".join(table) + "\n\n" + KERAS_NOTE + "\n"
    log(text)
    return text


KERAS_NOTE = """\
*Reading it.* A `PipelineModel` step is a pipeline `train_step` driven from Keras' loop
eagerly: the stage programs of each micro-batch (a forward and a backward per stage, each
its own XLA program), one thread per device, then each device's optimizer update. Plain
`fit` runs forward, backward and update as one XLA program. The one-stage rows are the
pipeline's own cost: the same model as one stage on one device. There the pipeline runs the
whole step as one XLA program (`one_program`, the default when every stage shares one
device: forward, backward, the finiteness check and the update), and Keras' metric updates
are one traced call. The first of them compares like with like: `on_nonfinite='apply'`
updates whatever the gradients, as plain `fit` does; by default (`'raise'`) a step first
checks that every gradient is finite and updates only then (a condition around the update
in the program, which keeps XLA from fusing the update into the backward). The third runs
each action as its own program on a thread, as on several devices. On one machine's shared
cores the four stages cannot overlap, so the other rows measure what the pipeline costs,
not what it buys."""


SCHEDULES_NOTE = """\
*Reading it.* The first table needs no measurement: every forward, `B` and `W` takes one
unit (a fused backward two), and the idle share is the simulator's against the formula of
each schedule's paper, `(K-1)/(M+K-1)` for GPipe and 1F1B, `(K-1)/(3M+K-1)` for ZB-H1,
`(K-1)/(vM+K-1)` for interleaved 1F1B with `v` stages per device; for ZB-V (two stages
per device in a V, each half the work) the paper claims zero bubble at 1F1B's peak memory,
and `(K-1)/(6M+K-1)` is derived here: the ramp of `K-1` half-stage actions a step cannot
avoid. The second runs each
schedule on 4 logical CPUs that share 2 cores, so the stages cannot really overlap: the
measured idle share is what the timeline shows (a device waiting for another, or for a
core), and the prediction is the simulator's from the same step's own action times and
wake-up latency (`Pipeline.simulate()`). Peak residual bytes are counted, not timed: the
prediction is exact by construction of the order each device runs."""


def chain_dependencies(num_stages: int):
    """The stage dependencies of a chain of ``num_stages`` stages (no skip)."""
    from gradsplit_compiler.schedules import Dependencies

    return Dependencies(
        [frozenset()] + [frozenset({k - 1}) for k in range(1, num_stages)],
        [frozenset({k + 1}) for k in range(num_stages - 1)] + [frozenset()])


def schedules_child(config: dict) -> dict:
    """Figure 9's measured half in a process of its own (4 logical CPUs): per schedule and
    micro-batch count, medians over ``repeats`` steps of the measured step span, idle share
    and peak residual bytes, and what ``Pipeline.simulate()`` predicts from the same step."""
    logical_cpus(4)
    layers, width, batch = 8, config["width"], config["batch"]
    rng = np.random.default_rng(0)
    weights = [tf.Variable(rng.normal(size=(width, width)) / np.sqrt(width), dtype=tf.float32)
               for _ in range(layers)]

    def chain(per_stage: int):
        def fn(x, y):
            h = x
            for i, w in enumerate(weights):
                h = tf.tanh(h @ w)
                if (i + 1) % per_stage == 0 and i + 1 < layers:
                    h = gsc.mark(h, f"c{i}")
            return tf.reduce_mean(tf.square(h - y))
        return fn

    spec = tf.TensorSpec([None, width], tf.float32)
    four = gsc.split(chain(2), [spec, spec], cuts=["c1", "c3", "c5"])
    eight = gsc.split(chain(1), [spec, spec], cuts=[f"c{i}" for i in range(7)])
    devices = [f"/CPU:{d}" for d in range(4)]
    x = tf.constant(rng.normal(size=(batch, width)), tf.float32)
    y = tf.constant(rng.normal(size=(batch, width)), tf.float32)
    rows = []
    for m in config["microbatches"]:
        for name in ("gpipe", "1f1b", "zb-h1", "interleaved-1f1b"):
            split, on = (eight, devices * 2) if name == "interleaved-1f1b" else (four, devices)
            pipe = gsc.pipeline(split, m, name, on, loss_reduction="mean")
            for _ in range(3):
                pipe.step(x, y)
            got = {"span": [], "idle": [], "peak": [], "p_span": [], "p_idle": [], "p_peak": []}
            for _ in range(config["repeats"]):
                pipe.step(x, y)
                events = pipe.timeline()
                got["span"].append(max(e.end for e in events) - min(e.start for e in events))
                got["idle"].append(pipe.idle_fraction().measured)
                got["peak"].append(max(pipe.peak_live_residual_bytes))
                sim = pipe.simulate()
                got["p_span"].append(sim.step_time)
                got["p_idle"].append(float(np.mean(sim.idle)))
                got["p_peak"].append(max(sim.peak_live_bytes))
            row = {"schedule": name, "m": m, "stages": len(split.stages),
                   **{k: float(np.median(v)) for k, v in got.items()}}
            rows.append(row)
            log(f"[9] {name} M={m}: span {row['span'] * 1e3:.1f} ms (predicted "
                f"{row['p_span'] * 1e3:.1f}), idle {row['idle']:.2f} (predicted "
                f"{row['p_idle']:.2f}), peak {row['peak']:.0f} B (predicted {row['p_peak']:.0f})")
    return {"rows": rows}


def schedule_idle_rows(k: int, v: int, microbatches) -> list[tuple[str, str, list]]:
    """Per built-in schedule on ``k`` devices (interleaved: ``v`` stages per device; ZB-V:
    two, in a V): the literature's idle-share formula and, per micro-batch count,
    ``(simulated, formula)`` with equal-time actions."""
    from gradsplit_compiler.schedules import builtin_schedule, ideal_idle_fraction

    formulas = {
        "gpipe": ("(K-1)/(M+K-1)", lambda m: (k - 1) / (m + k - 1)),
        "1f1b": ("(K-1)/(M+K-1)", lambda m: (k - 1) / (m + k - 1)),
        "zb-h1": ("(K-1)/(3M+K-1)", lambda m: (k - 1) / (3 * m + k - 1)),
        "interleaved-1f1b": ("(K-1)/(vM+K-1)", lambda m: (k - 1) / (v * m + k - 1)),
        "zb-v": ("(K-1)/(6M+K-1)", lambda m: (k - 1) / (6 * m + k - 1)),
    }
    devices = [f"/CPU:{d}" for d in range(k)]
    rows = []
    for name, (text, formula) in formulas.items():
        stages = {"interleaved-1f1b": k * v, "zb-v": 2 * k}.get(name, k)
        placed = devices + devices[::-1] if name == "zb-v" else devices * (stages // k)
        cells = [(ideal_idle_fraction(builtin_schedule(name, stages, m, placed),
                                      chain_dependencies(stages)), formula(m))
                 for m in microbatches]
        rows.append((name, text, cells))
    return rows


def figure_schedules(quick: bool) -> str:
    """9. Schedules: simulated idle share against the literature's formulas, then predicted
    against measured on 4 logical CPUs. The section's markdown."""
    k, v = 4, 2
    table = [
        "\n## 9. Schedules: the simulator against the literature and against a run\n",
        f"Idle share of the devices in one step, K = {k} devices, equal-time actions "
        f"(simulated, and the formula; interleaved 1F1B with v = {v} stages per device, "
        f"ZB-V with {2 * k} stages, two per device in a V).\n",
        "| schedule | formula | M = 4 | M = 8 | M = 16 |",
        "|---|---|---:|---:|---:|",
    ]
    for name, text, cells in schedule_idle_rows(k, v, (4, 8, 16)):
        table.append(f"| {name} | `{text}` | " + " | ".join(
            f"{simulated:.3f} ({formula:.3f})" for simulated, formula in cells) + " |")
    config = ({"width": 128, "batch": 32, "microbatches": [4], "repeats": 3} if quick else
              {"width": 512, "batch": 256, "microbatches": [4, 8, 16], "repeats": 7})
    got = run_child("--schedules-child", config, 9)
    if got is not None:
        table += [
            "",
            f"Measured on 4 logical CPUs (2 cores): a chain of 8 dense tanh layers "
            f"{config['width']} wide, float32, batch {config['batch']}, 4 stages of 2 layers "
            "(interleaved: 8 stages of one layer, two per device); medians of "
            f"{config['repeats']} steps after warm-up; the prediction from the same step.\n",
            "| schedule | M | step ms | predicted | idle | predicted | peak residual bytes "
            "| predicted |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in got["rows"]:
            table.append(
                f"| {r['schedule']} | {r['m']} | {r['span'] * 1e3:.1f} | "
                f"{r['p_span'] * 1e3:.1f} ({r['p_span'] / r['span']:.2f}x) | {r['idle']:.2f} | "
                f"{r['p_idle']:.2f} | {r['peak']:,.0f} | {r['p_peak']:,.0f} |")
    text = "\n".join(table) + "\n\n" + SCHEDULES_NOTE + "\n"
    log(text)
    return text


# -- figure 10: grids --------------------------------------------------------------------------

GRID_NOTE = """\
*Reading it.* Bytes are counted, not timed: activations and cotangents as each replica's
pipeline counts them (a tensor consumed on another device), the all-reduce as a ring sends
it (each of a stage's R devices sends 2(R-1)/R of the gradients it gives the collective op),
and the prediction from the split alone: `split.summary()`'s boundary bytes at the batch, and
`2 (R - 1)` times each stage's trainable variable bytes. The times are medians of
`train_step` on 4 logical CPUs that share the machine's cores, so neither the grid's replicas
nor the stages can really run at once: the rows compare what each layout costs here, not
what it buys on separate devices."""


def grid_rows(config: dict) -> list[dict]:
    """Figure 10's measurements in this process (which has 4 logical CPUs): per layout,
    bytes moved per step by kind with their predictions, and the median ``train_step``
    time over ``repeats`` steps after warm-up."""
    import keras

    from gradsplit_compiler.run.grid import allreduce_bytes

    layers, width, batch, m = 8, config["width"], config["batch"], config["microbatches"]
    rng = np.random.default_rng(0)
    weights = [tf.Variable(rng.normal(size=(width, width)) / np.sqrt(width), dtype=tf.float32)
               for _ in range(layers)]

    def fn(x, y):
        h = x
        for i, w in enumerate(weights):
            h = tf.tanh(h @ w)
            if i + 1 < layers:
                h = gsc.mark(h, f"c{i}")
        return tf.reduce_mean(tf.square(h - y))

    spec = tf.TensorSpec([None, width], tf.float32)
    two = gsc.split(fn, [spec, spec], cuts=["c3"])
    four = gsc.split(fn, [spec, spec], cuts=["c1", "c3", "c5"])
    cpus = [f"/CPU:{d}" for d in range(4)]
    layouts = [("1-D, 2 stages", two, cpus[:2], 1), ("1-D, 4 stages", four, cpus, 1),
               ("2 stages x 2 replicas", two, [[cpus[0], cpus[2]], [cpus[1], cpus[3]]], 2)]
    x = tf.constant(rng.normal(size=(batch, width)), tf.float32)
    y = tf.constant(rng.normal(size=(batch, width)), tf.float32)
    rows = []
    for name, split, devices, replicas in layouts:
        pipe = gsc.pipeline(split, m, "1f1b", devices, loss_reduction="mean",
                            optimizer=keras.optimizers.SGD(0.01),
                            jit_compile=config.get("jit_compile", True))
        for _ in range(config.get("warmup", 3)):
            pipe.train_step(x, y)
        times = []
        for _ in range(config["repeats"]):
            t0 = time.perf_counter()
            float(pipe.train_step(x, y))
            times.append(time.perf_counter() - t0)
        moved = pipe.bytes_moved()
        boundary = sum(r["boundary_bytes"] for r in split.summary(batch_size=batch)[1:])
        stage_bytes = [sum(int(np.prod(split.variables[i].shape)) * 4
                           for i in stage.variable_indices) for stage in split.stages]
        row = {"layout": name, "stages": len(split.stages), "replicas": replicas,
               "step": float(np.median(times)),
               "activations": moved["activations"], "p_activations": boundary,
               "cotangents": moved["cotangents"], "p_cotangents": boundary,
               "allreduce": moved.get("allreduce", 0),
               "p_allreduce": sum(allreduce_bytes(b, replicas) for b in stage_bytes)}
        rows.append(row)
        log(f"[10] {name}: step {row['step'] * 1e3:.1f} ms, activations "
            f"{row['activations']:,} B (predicted {row['p_activations']:,}), all-reduce "
            f"{row['allreduce']:,} B (predicted {row['p_allreduce']:,})")
    return rows


def grid_child(config: dict) -> dict:
    """Figure 10 in a process of its own, split into 4 logical CPUs."""
    logical_cpus(4)
    return {"rows": grid_rows(config)}


def figure_grid(quick: bool) -> str:
    """10. Grids against 1-D pipelines on 4 logical CPUs. The section's markdown."""
    config = ({"width": 64, "batch": 32, "microbatches": 4, "repeats": 3} if quick else
              {"width": 512, "batch": 256, "microbatches": 4, "repeats": 9})
    table = ["\n## 10. Grids: data times pipeline parallelism\n"]
    got = run_child("--grid-child", config, 10)
    if got is not None:
        table += [
            f"A chain of 8 dense tanh layers {config['width']} wide, float32, batch "
            f"{config['batch']}, M = {config['microbatches']}, 1F1B, SGD; `train_step` on 4 "
            f"logical CPUs (2 cores); medians of {config['repeats']} steps after warm-up. "
            "Bytes per step, measured (predicted).\n",
            "| layout | step ms | activations | cotangents | all-reduce |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in got["rows"]:
            table.append(
                f"| {r['layout']} | {r['step'] * 1e3:.1f} | {r['activations']:,} "
                f"({r['p_activations']:,}) | {r['cotangents']:,} ({r['p_cotangents']:,}) | "
                f"{r['allreduce']:,} ({r['p_allreduce']:,}) |")
    text = "\n".join(table) + "\n\n" + GRID_NOTE + "\n"
    log(text)
    return text


# -- figure 11: separate XLA programs, outside the compiler ------------------------------------

SEPARATE_NOTE = """\
*Reading it.* The stage programs do the same arithmetic as the one program (XLA's optimized HLO
above: the same dots, the fusions of the same elementwise ops, no copy), so XLA's own account
of them (TensorFlow's profiler: `CpuExecutable::ExecuteAsyncOnStream` per program, summed per
step; the sentence under the tables gives this run's ratio) differs from the one program's only
by what running them apart loses inside XLA: the overlap of independent thunks across the cut
(XLA:CPU's thunk executor runs a small program's thunks one by one on the calling thread) and
fusion across the cut. On a quiet machine that loss is measurable (the sentence under the
tables); under load it drowns in the noise. Calling each stage program alone, warm, in blocks
(`one at a time`) costs what calling them in turn does: switching programs leaves no cold
caches or threads to speak of. What separate programs add is outside XLA: TensorFlow's eager
call around each executable (dispatch, the compiled-program cache lookup, wrapping arguments
and results: the `runtime` row, of the order of the `empty program`'s cost per call) and the
host's Python between calls (`host`). Both are paid per program called, so they grow with the
number of stages and shrink, as a share, as stages grow. Returning a stage's input (`input
copied`) adds a copy of it per stage; running the forward again in the backward (`remat`) adds
the forward's arithmetic. No XLA flag or thread setting removes the cost (each row in its own
process, so its ratio is its own; fast math changes results and is shown only for reference).
On a GPU, a program's launch is asynchronous: the host enqueues the next stage's program while
the device still runs the current one, so neither the per-call runtime nor the host's Python
between programs is on the critical path once a stage runs longer than it takes to launch
(kernel launches cost about 5-10 us each, per kernel, in either layout); a program's kernels
run in stream order, so the thunk executor's one-by-one small programs are no cost there
either. Separate programs still lose XLA's fusion across the cut (a stage's last op cannot fuse
with the next stage's first) and the overlap of independent kernels of neighbouring stages."""


def figure_separate_programs(quick: bool) -> str:
    """11. ``tools/xla_separate_programs.py`` in a process of its own. The section's
    markdown."""
    import json

    done = subprocess.run([sys.executable, str(ROOT / "tools" / "xla_separate_programs.py")]
                          + (["--quick"] if quick else []), capture_output=True, text=True,
                          timeout=3600)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        log(f"figure 11 failed (exit {done.returncode}): {done.stderr[-2000:]}")
        return ""
    text = separate_programs_markdown(json.loads(lines[-1][len("RESULT "):]))
    log(text)
    return text


def separate_programs_markdown(got: dict) -> str:
    """Figure 11's tables from ``xla_separate_programs.py``'s ``RESULT``."""
    c, times = got["config"], got["times"]
    mono = times["mono"]
    table = [
        "\n## 11. Separate XLA programs on XLA:CPU, outside the compiler\n",
        f"`tools/xla_separate_programs.py`: plain TensorFlow, nothing of this package. The MLP "
        f"of section 1-2 ({c['layers']} dense ReLU layers {c['width']} wide, biases, batch "
        f"{c['batch']}, mean squared error, float32), its training step as one "
        "`tf.function(jit_compile=True)` with the tape, and as stages each a jit-compiled "
        "forward (returning the activations its backward reads) and a jit-compiled backward "
        "(the stage's VJP as the tape writes it), called one after the other; every program "
        "through its concrete function on flat tensors; every side checked against the "
        "tape; medians of interleaved repeats in one process.\n",
        "| side | programs per step | time | over one program |", "|---|---:|---:|---:|"]
    for side, t in times.items():
        count = got["programs"].get(side, 1)
        table.append(f"| {_side_label(side)} | {count} | {t * 1e3:.3f} ms | "
                     f"{t / mono:.3f} |")
    if got.get("settings"):
        table += ["", "Process-wide settings, each in a process of its own timing both sides "
                  "again:\n", "| setting | one program | 4 stages over one program |",
                  "|---|---:|---:|"]
        for row in got["settings"]:
            cells = (f"{row['mono'] * 1e3:.2f} ms | {row['ratio']:.3f}" if row["ratio"]
                     else "failed | -")
            table.append(f"| {row['setting']} | {cells} |")
    steps = got.get("profile", {}).get("steps", {})
    if steps:
        sides = list(steps)
        table += ["", "Where a step's time goes (TensorFlow's profiler, medians over the "
                  "profiled steps, in a process of its own):\n",
                  *profile_table(steps, sides, list(map(_side_label, sides)), 2)]
    hlo = got.get("profile", {}).get("hlo", {})
    if hlo:
        table += ["", "XLA's optimized HLO (entry computations, summed over a side's "
                  "programs):\n", "| programs | count | instructions | fusions | dots | "
                  "copies |", "|---|---:|---:|---:|---:|---:|"]
        for kind, label in (("step", "one program"), ("forward", "stage forwards"),
                            ("backward", "stage backwards")):
            rows = hlo.get(kind, [])
            if rows:
                table.append(f"| {label} | {len(rows)} | " + " | ".join(
                    str(sum(r[k] for r in rows)) for k in ("instructions", "fusions", "dots",
                                                            "copies")) + " |")
    if "mono" in steps and len(steps) > 1:
        mono_row = steps["mono"]
        side, row = next((s, r) for s, r in steps.items() if s != "mono")
        around = (row["runtime"] + row["host"]) - (mono_row["runtime"] + mono_row["host"])
        table += ["", f"In this run the executables of the {side} took "
                  f"{row['xla'] / mono_row['xla']:.2f}x the one program's, and TensorFlow's "
                  f"calls and the host's Python around them {around * 1e3:.2f} ms more per "
                  f"step than around the one program ({around * 1e3 / max(row['calls'] - 1, 1):.3f}"
                  " ms per program called beyond the first)."]
    return "\n".join(table) + "\n\n" + SEPARATE_NOTE + "\n"


def _side_label(side: str) -> str:
    """A row or column name of figure 11 from the script's key for the side."""
    if side == "mono":
        return "one program"
    count, _, rest = side.partition(" stages")
    if count == "1":
        return "1 stage (forward program, backward program)" + rest
    return side


ALL_FIGURES = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    parser.add_argument("--only", type=int, nargs="*", default=list(ALL_FIGURES),
                        help="these figures only; an existing report keeps the others")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    parser.add_argument("--training-child", help=argparse.SUPPRESS)
    parser.add_argument("--keras-child", help=argparse.SUPPRESS)
    parser.add_argument("--schedules-child", help=argparse.SUPPRESS)
    parser.add_argument("--grid-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.grid_child:  # figure 10's subprocess
        import json

        print("RESULT " + json.dumps(grid_child(json.loads(args.grid_child))), flush=True)
        return 0
    if args.schedules_child:  # figure 9's subprocess
        import json

        print("RESULT " + json.dumps(schedules_child(json.loads(args.schedules_child))),
              flush=True)
        return 0
    if args.keras_child:  # figure 8's subprocess
        import json

        print("RESULT " + json.dumps(keras_child(json.loads(args.keras_child))), flush=True)
        return 0
    if args.training_child:  # figure 7's subprocess
        import json

        result = training_child(json.loads(args.training_child))
        print("RESULT " + json.dumps(result), flush=True)
        os._exit(0)  # workers are stopped; no atexit work left
    repeats = args.repeats or (5 if args.quick else 21)
    command = "python tools/bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    log(f"machine: {machine()}")
    models = [mlp] if args.quick else [mlp, resnet50, transformer]
    speed = figure_speed(models, repeats) if {1, 2} & set(args.only) else []
    memory = figure_memory(["mlp"] if args.quick else ["mlp", "resnet50", "transformer"]) \
        if 3 in args.only else []
    split_rows = figure_split_time(args.quick) if 4 in args.only else []
    split_floor = figure_split_floor(args.quick) if 4 in args.only else []
    cut_rows = []
    if 5 in args.only:
        sizes = [16, 256, 1024] if args.quick else [16, 64, 256, 1024, 4096, 16384, 65536]
        # Beyond these the answers cost minutes to build (one backward graph per element)
        # or gigabytes (the Jacobian of y with respect to W has cut * 256 * 16 entries):
        # the table says "-".
        cut_rows = figure_cut_size(sizes, per_scalar_limit=256, jacobian_limit=4096,
                                   repeats=repeats)
        plot_cut_size(cut_rows, ROOT / "docs" / "bench_cut_size.png")
    out = Path(args.out)
    previous = out.read_text() if out.exists() else None
    write_report(out, command.strip(), speed, memory, split_rows, cut_rows, split_floor)
    if 6 in args.only:
        with open(out, "a") as f:
            f.write(figure_cluster(args.quick, repeats))
    if 7 in args.only:
        with open(out, "a") as f:
            f.write(figure_training(args.quick, min(repeats, 9)))
    if 8 in args.only:
        with open(out, "a") as f:
            f.write(figure_keras(args.quick))
    if 9 in args.only:
        with open(out, "a") as f:
            f.write(figure_schedules(args.quick))
    if 10 in args.only:
        with open(out, "a") as f:
            f.write(figure_grid(args.quick))
    if 11 in args.only:
        with open(out, "a") as f:
            f.write(figure_separate_programs(args.quick))
    if previous is not None and set(args.only) != set(ALL_FIGURES):
        out.write_text(merge_report(previous, out.read_text(), command.strip()))
    log(f"wrote {out}")
    return 0


def report_sections(text: str) -> tuple[str, dict[str, str]]:
    """The text before the first ``## `` heading, and each section by its number
    (``"1-2"``, ``"5"``, ...), in order."""
    head, *parts = re.split(r"(?m)^(?=## )", text)
    return head, {re.match(r"## ([\d-]+)", part).group(1): part for part in parts}


def merge_report(previous: str, new: str, command: str) -> str:
    """``previous`` with the sections ``new`` holds replaced (a run of ``--only``), and a
    line under the heading saying which were made again, by which command, when."""
    head, old = report_sections(previous)
    _, fresh = report_sections(new)
    note = (f"Section {', '.join(fresh)} made again by `{command}` on "
            f"{time.strftime('%Y-%m-%d')}.")
    lines, notes = [], []
    for ln in head.rstrip("\n").split("\n"):
        said = re.match(r"Section (.+?) made again by (.*)$", ln)
        if not said:
            lines.append(ln)
            continue
        # an earlier run's note keeps the sections this run did not make again
        kept = [k for k in said.group(1).split(", ") if k not in fresh]
        if kept:
            notes.append(f"Section {', '.join(kept)} made again by {said.group(2)}")
    head = "\n".join(lines[:3] + notes + [note] + lines[3:]) + "\n\n"
    merged = {**old, **fresh}
    return head + "\n\n".join(part.strip("\n") for part in merged.values()) + "\n"


if __name__ == "__main__":
    sys.exit(main())
