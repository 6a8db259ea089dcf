"""The seed problem, solved end to end and measured: what ``gradsplit demo`` runs.

``h = x W + b; y = tanh(h); loss = mse(y, y0)``, cut at ``y``. The gradient of ``loss`` by
parts (the stages' vector-Jacobian products, composed under XLA) against the monolithic
``tf.GradientTape`` gradient, and beside them the two answers the original question got:
(a) ``tf.gradients`` once per scalar of ``y`` (an explicit Jacobian ``dy/dW``, chained with
``dL/dy``) and (b) ``GradientTape.jacobian``. Each with its error and its cost per step.
``cli.demo`` holds the command's flags and ``DemoConfig``; this module imports TensorFlow.

Example
-------
>>> from gradsplit_compiler.cli.demo import DemoConfig
>>> from gradsplit_compiler.cli.seed_problem import run_seed_problem
>>> run_seed_problem(DemoConfig(cut_size=64, repeats=3, picture=None))  # doctest: +SKIP
0
"""

from __future__ import annotations

import math
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np
import tensorflow as tf

from gradsplit_compiler.cli.progress import Progress
from gradsplit_compiler.cli.tables import format_table
from gradsplit_compiler.core.split import Split, split
from gradsplit_compiler.core.verify import Report, verify
from gradsplit_compiler.errors import GradSplitError
from gradsplit_compiler.frontend.mark import mark
from gradsplit_compiler.ir import parse_tensor_name
from gradsplit_compiler.show.render import MATPLOTLIB_HINT, render_split, tensor_label

if TYPE_CHECKING:  # cli.demo imports this module when the command runs, not the reverse
    from gradsplit_compiler.cli.demo import DemoConfig

__all__ = ["DemoError", "SeedProblem", "composed_gradient", "format_answers",
           "format_boundaries", "format_conclusion", "format_graph", "format_stages",
           "format_verdict", "jacobian_gradient", "monolithic_gradient", "per_scalar_gradient",
           "relative_error", "run_seed_problem", "seed_problem", "time_per_step"]

# One timed repeat runs a function this long (many calls), so a median of repeats is stable.
REPEAT_SECONDS = 0.04

PROBLEM = """\
Problem: tf.gradients(loss, y) and tf.gradients(y, W) don't chain: tf.gradients sums its
  targets, so "dy/dW" comes back shaped like W (the gradient of sum(y)), not a Jacobian.
Answer:  dL/dW = tf.gradients(y, W, grad_ys=dL/dy), a vector-Jacobian product: one backward
  pass, whatever the size of y. gradsplit cuts the program at y and composes these VJPs."""


class DemoError(GradSplitError):
    """The demo found something wrong (not a usage error); the CLI prints it on one line."""


# -- the seed problem ----------------------------------------------------------------------


@dataclass
class SeedProblem:
    """The seed program in one dtype: its variables, the traced ``loss``, and its inputs."""

    W: tf.Variable
    b: tf.Variable
    loss: Any  # tf.function(x, y0) -> scalar, with gsc.mark(y, "y")
    signature: list[tf.TensorSpec]
    args: tuple[tf.Tensor, tf.Tensor]

    def forward(self, x: tf.Tensor, y0: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """``(y, loss)``, the same arithmetic as ``loss`` (for the thread's answers)."""
        y = tf.tanh(tf.matmul(x, self.W) + self.b)
        return y, tf.reduce_mean(tf.square(y - y0))


def seed_problem(config: DemoConfig, dtype: str) -> SeedProblem:
    rng = np.random.default_rng(config.seed)
    # Scaled so tanh is neither saturated nor linear: every term of the gradient matters.
    W = tf.Variable(rng.normal(size=(config.features, config.width)) / math.sqrt(config.features),
                    dtype=dtype, name="W")
    b = tf.Variable(rng.normal(size=(config.width,)) * 0.1, dtype=dtype, name="b")

    @tf.function
    def loss(x, y0):
        y = mark(tf.tanh(tf.matmul(x, W) + b), "y")
        return tf.reduce_mean(tf.square(y - y0))

    signature = [tf.TensorSpec([config.batch, config.features], dtype),
                 tf.TensorSpec([config.batch, config.width], dtype)]
    x = tf.constant(rng.normal(size=(config.batch, config.features)), dtype=dtype)
    y0 = tf.constant(rng.uniform(-1, 1, size=(config.batch, config.width)), dtype=dtype)
    return SeedProblem(W, b, loss, signature, (x, y0))


# -- the four ways to get dL/dW and dL/db --------------------------------------------------


def monolithic_gradient(problem: SeedProblem, jit_compile: bool) -> Callable:
    """The reference: one ``tf.GradientTape`` gradient of the whole program."""

    @tf.function(input_signature=problem.signature, jit_compile=jit_compile)
    def gradient(x, y0):
        with tf.GradientTape() as tape:
            loss = problem.loss(x, y0)
        return tape.gradient(loss, [problem.W, problem.b])

    return gradient


def _flat(fn: Callable) -> Callable:
    """A ``tf.function`` with an input signature, called on flat tensors (``_call_flat``)."""
    if getattr(fn, "input_signature", None) is None:
        return fn
    from gradsplit_compiler._tf_internal import flat_caller

    return flat_caller(fn)


def composed_gradient(split_program: Split, jit_compile: bool) -> Callable:
    """gradsplit: forward through the stages, then each stage's VJP in reverse."""

    def gradient(x, y0):
        return split_program.value_and_gradients(x, y0, jit_compile=jit_compile)[1]

    return gradient


def per_scalar_gradient(problem: SeedProblem, jit_compile: bool) -> Callable:
    """The thread's accepted answer: ``tf.gradients`` once per scalar of ``y`` builds the
    explicit Jacobian ``dy/dW``, which is then chained with ``dL/dy``."""
    size = int(np.prod(problem.signature[1].shape))

    @tf.function(input_signature=problem.signature, jit_compile=jit_compile)
    def gradient(x, y0):
        y, loss = problem.forward(x, y0)
        dloss_dy = tf.reshape(tf.gradients(loss, y)[0], [-1])
        scalars = tf.reshape(y, [-1])
        rows_W, rows_b = [], []
        for i in range(size):  # one backward pass per scalar of y
            dW, db = tf.gradients(scalars[i], [problem.W, problem.b])
            rows_W.append(dW)
            rows_b.append(db)
        jacobian_W, jacobian_b = tf.stack(rows_W), tf.stack(rows_b)
        return [tf.tensordot(dloss_dy, jacobian_W, 1), tf.tensordot(dloss_dy, jacobian_b, 1)]

    return gradient


def jacobian_gradient(problem: SeedProblem, jit_compile: bool) -> Callable:
    """The thread's later answer: ``GradientTape.jacobian(y, W)`` chained with ``dL/dy``."""

    @tf.function(input_signature=problem.signature, jit_compile=jit_compile)
    def gradient(x, y0):
        with tf.GradientTape(persistent=True) as tape:
            y, loss = problem.forward(x, y0)
        dloss_dy = tape.gradient(loss, y)
        jacobian_W, jacobian_b = tape.jacobian(y, [problem.W, problem.b])
        return [tf.tensordot(dloss_dy, jacobian_W, 2), tf.tensordot(dloss_dy, jacobian_b, 2)]

    return gradient


def relative_error(grads: Sequence, reference: Sequence) -> float:
    """Largest over the gradients of ``max|g - r| / max|r|`` (``gsc.verify``'s
    ``max_rel_error``)."""
    refs = [np.asarray(r, dtype=np.float64) for r in reference]
    floor = 1e-6 * max(float(np.max(np.abs(r))) for r in refs)
    worst = 0.0
    for g, r in zip(grads, refs):
        err = float(np.max(np.abs(np.asarray(g, dtype=np.float64) - r)))
        worst = max(worst, err / max(float(np.max(np.abs(r))), floor, 1e-300))
    return worst


def time_per_step(functions: dict[str, Callable], args: Sequence, repeats: int,
                  warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each function, after ``warmup`` calls.

    The functions take turns within each repeat, so a slow spell of the machine costs them
    all alike; each repeat of a function runs enough calls to last about ``REPEAT_SECONDS``.
    """
    calls = {}
    for name, fn in functions.items():
        for _ in range(warmup):
            _finish(fn(*args))
        start = time.perf_counter()
        _finish(fn(*args))
        once = max(time.perf_counter() - start, 1e-6)
        calls[name] = max(1, min(10_000, round(REPEAT_SECONDS / once)))
    samples: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            start = time.perf_counter()
            for _ in range(calls[name]):
                result = fn(*args)
            _finish(result)
            samples[name].append((time.perf_counter() - start) / calls[name])
    return {name: float(np.median(times)) for name, times in samples.items()}


def _finish(result: Any) -> None:
    for t in tf.nest.flatten(result):
        np.asarray(t)


# -- the run -------------------------------------------------------------------------------


@dataclass
class Answer:
    """One row of the result table."""

    label: str
    passes: str
    seconds: float | None = None
    errors: dict[str, float | None] | None = None
    note: str = ""


def run_seed_problem(config: DemoConfig, out: TextIO | None = None) -> int:
    """Run the demo, print it to ``out``; 0 when the composed gradient checks out.

    Raises ``DemoError`` when the composed gradient does not match ``tf.GradientTape``.
    """
    out = out or sys.stdout
    config.check()
    mode = "XLA" if config.jit_compile else "graph mode"
    n = config.cut_size
    with_per_scalar = n <= config.per_scalar_limit
    print(f"gradsplit demo: the gradient of a loss through an intermediate tensor y, by parts\n"
          f"{PROBLEM}\n", file=out, flush=True)

    picture_note = ""
    if config.picture and not _has_matplotlib():
        picture_note = f" (no picture: {MATPLOTLIB_HINT})"
        print(f"Note: no picture: {MATPLOTLIB_HINT}.\n", file=out, flush=True)
    picture = config.picture if not picture_note else None
    progress = Progress(6 if picture else 5, out)
    dtypes = ("float32", "float64")
    with progress.step(f"trace loss = mse(tanh(x W + b), y0), W {config.features}x{config.width}, "
                       f"batch {config.batch}; cut at y ({n} elements)"):
        problems = {d: seed_problem(config, d) for d in dtypes}
        splits = {d: split(problems[d].loss, problems[d].signature, cuts=["y"]) for d in dtypes}
    if picture:
        with progress.step(f"draw the graph -> {picture}"):
            render_split(splits["float32"], picture,
                         title=f"gradsplit demo: loss = mse(tanh(x W + b), y0), cut at y; "
                               f"W {config.features}x{config.width}, batch {config.batch}")
            picture_note = f" (picture: {picture})"
    with progress.step(f"compose the stages' VJPs under {mode}, gsc.verify against "
                       "GradientTape (float32, float64)"):
        reports = {d: verify(splits[d], *problems[d].args, jit_compile=config.jit_compile)
                   for d in dtypes}
    answers = [
        Answer("tf.GradientTape.gradient (monolithic)", "1"),
        Answer(f"gradsplit: {len(splits['float32'].stages)} stages, VJPs composed",
               f"1, in {len(splits['float32'].stages)} stages",
               errors={d: reports[d].max_rel_error for d in dtypes}),
        Answer("(a) tf.gradients per scalar of y", f"{n + 1}"),
        Answer("(b) GradientTape.jacobian", f"{n + 1}, vectorized"),
    ]
    builders = {2: per_scalar_gradient, 3: jacobian_gradient}
    functions: dict[int, dict[str, Callable]] = {
        0: {d: monolithic_gradient(problems[d], config.jit_compile) for d in dtypes},
        1: {d: composed_gradient(splits[d], config.jit_compile) for d in dtypes},
    }
    steps = {2: f"build answer (a): {n} calls of tf.gradients, one per scalar of y",
             3: "build answer (b): GradientTape.jacobian(y, [W, b])"}
    for row, text in steps.items():
        if row == 2 and not with_per_scalar:
            answers[row].note = (f"skipped: {n} backward passes to build; "
                                 f"raise --per-scalar-limit to run it")
            progress.total -= 1
            continue
        with progress.step(f"{text} (float32, float64, {mode})"):
            functions[row] = {d: builders[row](problems[d], config.jit_compile) for d in dtypes}
            answers[row].errors = {
                d: relative_error(functions[row][d](*problems[d].args),
                                  functions[0][d](*problems[d].args))
                for d in dtypes
            }
    with progress.step(f"time each answer (float32): median of {config.repeats} repeats "
                       "after warm-up"):
        # every answer is timed the way the split's programs run: on flat tensors, without
        # tf.function's per-call argument binding, so the ratios compare programs
        times = time_per_step({str(r): _flat(fns["float32"]) for r, fns in functions.items()},
                              problems["float32"].args, config.repeats)
    for r, seconds in times.items():
        answers[int(r)].seconds = seconds

    print(file=out)
    print(format_graph(splits["float32"], picture_note), file=out)
    print(format_boundaries(splits["float32"]), file=out)
    print(file=out)
    print(format_stages(splits["float32"]), file=out)
    print(file=out)
    device = "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
    print(f"Gradient of loss w.r.t. W and b, cut of {n} elements (y is {config.batch}x"
          f"{config.width}), {mode} on {device}:", file=out)
    print(format_answers(answers), file=out)
    print(format_verdict(reports), file=out)
    print(format_conclusion(answers, n), file=out, flush=True)
    if not all(r.ok for r in reports.values()):
        worst = max(reports.values(), key=lambda r: r.max_rel_error / r.rtol)
        raise DemoError(
            f"the composed gradient differs from GradientTape in {worst.dtype}: max relative "
            f"error {worst.max_rel_error:.1e} > tolerance {worst.rtol:.0e}"
        )
    return 0


# -- printing ------------------------------------------------------------------------------


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def format_graph(split_program: Split, note: str = "", width: int = 96) -> str:
    """The ops of the graph grouped by stage, in graph order: ``name=OpType`` (``name``
    alone when it is the op type); ``gsc.mark`` ops by their mark name."""
    g = split_program.graph
    args = [tensor_label(split_program, n) for n in split_program.arg_names]
    variables = [v.name.split(":")[0] for v in split_program.variables]
    by_stage: dict[int | None, list[str]] = {}
    placeholders = 0
    for name, attrs in g.nodes(data=True):
        stage = attrs.get("stage")
        if stage is None and attrs["op"] == "Placeholder":
            placeholders += 1
            continue
        label = tensor_label(split_program, f"{name}:0")
        text = label if label == attrs["op"] else f"{label}={attrs['op']}"
        by_stage.setdefault(stage, []).append(text)
    lines = [f"Graph: {g.number_of_nodes()} ops ({placeholders} placeholders: arguments "
             f"{', '.join(args)}; variables {', '.join(variables)}){note}"]
    for stage in sorted(by_stage, key=lambda s: (s is None, s or 0)):
        head = "  not run " if stage is None else f"  stage {stage}  "
        lines.extend(textwrap.wrap(", ".join(by_stage[stage]), width=width,
                                   initial_indent=head, subsequent_indent=" " * len(head)))
    return "\n".join(lines)


def format_boundaries(split_program: Split) -> str:
    lines = []
    args = set(split_program.arg_names)
    for k, boundary in enumerate(split_program.boundaries):
        parts = []
        for name in boundary:
            shape = _shape(split_program, name)
            kind = " (an argument a later stage reads)" if name in args else ""
            parts.append(f"{tensor_label(split_program, name)} {shape}{kind}")
        lines.append(f"Boundary of cut {k}: " + ", ".join(parts))
    return "\n".join(lines)


def format_stages(split_program: Split) -> str:
    """The stage table: ops, inputs, outputs, variables, residuals (kept for the backward)."""
    header = ("stage", "ops", "inputs", "outputs", "variables", "residuals (forward -> backward)")
    rows = []
    for stage in split_program.stages:
        variables = ", ".join(f"{v.name.split(':')[0]} {tuple(v.shape)}" for v in stage.variables)
        residuals = _residual_summary(stage.residual_specs)
        rows.append((str(stage.index), str(stage.num_ops),
                     ", ".join(tensor_label(split_program, n) for n in stage.inputs) or "-",
                     ", ".join(tensor_label(split_program, n) for n in stage.outputs) or "-",
                     variables or "-", residuals))
    return format_table(header, rows)


def _residual_summary(specs: Sequence[tf.TensorSpec]) -> str:
    if not specs:
        return "none"
    counts: dict[str, int] = {}
    for spec in specs:
        key = _dims(spec.shape)
        counts[key] = counts.get(key, 0) + 1
    return f"{len(specs)}: " + " ".join(k if c == 1 else f"{c}x{k}" for k, c in counts.items())


def format_answers(answers: Sequence[Answer]) -> str:
    base = answers[0].seconds
    header = ("answer", "backward passes", "time/step", "vs tape", "rel err f32", "rel err f64")
    rows = []
    for i, a in enumerate(answers):
        if a.note:
            rows.append((a.label, a.passes, "skipped", "", "", ""))
            continue
        seconds = "-" if a.seconds is None else _duration(a.seconds)
        ratio = "-" if a.seconds is None or not base else f"{a.seconds / base:.1f}x"
        if i == 0:
            errs = ("reference", "reference")
        else:
            errs = tuple("-" if not a.errors or a.errors.get(d) is None
                         else f"{a.errors[d]:.1e}" for d in ("float32", "float64"))
        rows.append((a.label, a.passes, seconds, ratio) + errs)
    notes = [f"{a.label.split(' ')[0]} {a.note}" for a in answers if a.note]
    return "\n".join([format_table(header, rows, right=(2, 3, 4, 5)), *notes])


def format_verdict(reports: dict[str, Report]) -> str:
    parts = [f"{'OK' if r.ok else 'MISMATCH'} in {d} (tolerance {r.rtol:.0e})"
             for d, r in reports.items()]
    return "gsc.verify: " + ", ".join(parts) + "."


def format_conclusion(answers: Sequence[Answer], cut_size: int) -> str:
    timed = [a for a in answers[2:] if a.seconds is not None]
    base, composed = answers[0].seconds, answers[1].seconds
    if not timed or not base or not composed:
        return ""
    slow = ", ".join(f"{a.label.split(' ')[0]} {a.seconds / base:.1f}x" for a in timed)
    return (f"By parts, the gradient costs {composed / base:.1f}x the monolithic one; the "
            f"thread's answers cost {slow}:\n"
            f"one backward pass per element of y ({cut_size}), growing with the cut "
            f"(try --cut-size {4 * cut_size}).")


def _duration(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    return f"{seconds * 1e3:.3g} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.3g} us"


def _shape(split_program: Split, name: str) -> str:
    op, index = parse_tensor_name(name)
    outputs = split_program.graph.nodes[op].get("outputs") or []
    return _dims(outputs[index][1] if index < len(outputs) else tf.TensorShape(None))


def _dims(shape: tf.TensorShape) -> str:
    """``[32,?]``: a static shape, ``?`` for an unknown dimension or rank."""
    if shape.rank is None:
        return "[?]"
    return "[" + ",".join("?" if d is None else str(d) for d in shape.as_list()) + "]"

