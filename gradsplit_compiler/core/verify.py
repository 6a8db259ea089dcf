"""``gsc.verify``: the composed stages against ``tf.GradientTape`` on the original ``fn``."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf

from gradsplit_compiler.core.split import Split
from gradsplit_compiler.core.xla import run_reporting_xla_errors
from gradsplit_compiler.errors import GradSplitError

__all__ = [
    "DEFAULT_RTOL",
    "RANDOM_OPS",
    "ROUNDING_ULPS",
    "Report",
    "reference_value_and_grads",
    "stateful_random_ops",
    "verify",
]

# How many units in the last place of the largest gradient entry count as rounding.
ROUNDING_ULPS = 64
DEFAULT_RTOL = {tf.float16: 1e-2, tf.bfloat16: 1e-2, tf.float32: 1e-5, tf.float64: 1e-12}


@dataclass
class Report:
    """What ``verify`` found. ``ok`` is the verdict; ``rows`` has one entry per variable."""

    ok: bool
    max_abs_error: float
    max_rel_error: float
    value_error: float
    rtol: float
    atol: float
    dtype: str
    jit_compile: bool
    rows: list[dict] = field(default_factory=list)
    side_effect_error: float = 0.0
    # absolute error below which a mismatch is rounding: ROUNDING_ULPS ulps of the
    # largest reference gradient entry
    rounding_floor: float = 0.0

    def __str__(self) -> str:
        lines = [
            f"{self._verdict()}: max relative error {self.max_rel_error:.2e} "
            f"(tolerance {self.rtol:.0e}), max absolute error {self.max_abs_error:.2e}, "
            f"value error {self.value_error:.2e}, {self.dtype}, "
            f"{'XLA' if self.jit_compile else 'graph mode'} on both sides",
        ]
        if self.side_effect_error:
            lines.append(f"variable updates differ by {self.side_effect_error:.2e}")
        width = max([len(r["name"]) for r in self.rows] + [8])
        lines.append(f"{'variable':<{width}}  {'shape':<16} {'max abs err':>12} {'rel err':>10}")
        for r in self.rows:
            lines.append(
                f"{r['name']:<{width}}  {str(r['shape']):<16} {r['max_abs_error']:>12.2e} "
                f"{r['rel_error']:>10.2e}{'' if r['ok'] else '  <-'}"
                f"{'  ' + r['note'] if r.get('note') else ''}"
            )
        return "\n".join(lines)

    def _verdict(self) -> str:
        """``OK`` or ``MISMATCH``; an ``OK`` whose relative error exceeds ``rtol`` says what
        excused it, so that the line never reads as a contradiction."""
        if not self.ok:
            return "MISMATCH"
        if self.max_rel_error <= self.rtol:
            return "OK"
        if self.max_abs_error <= self.rounding_floor:
            return (f"OK within the rounding floor {self.rounding_floor:.1e} "
                    f"({ROUNDING_ULPS} ulps of the largest gradient)")
        return f"OK within the absolute tolerance {self.atol:.1e}"


def verify(split: Split, *args, jit_compile: bool = True, rtol: float | None = None,
           atol: float | None = None, seed: int = 0) -> Report:
    """Run ``fn`` under ``tf.GradientTape`` and the composed stages; compare everything.

    Both sides run under XLA when ``jit_compile=True``. Values, every variable gradient
    (and, for a non-scalar ``fn``, every output and input cotangent under the same random
    output cotangents) and the variable updates ``fn`` makes are compared. Variables are
    restored afterwards: verifying does not train the model.
    """
    program = split.program
    for label, value in (("rtol", rtol), ("atol", atol)):
        if value is not None and (isinstance(value, bool) or not isinstance(
                value, (int, float, np.floating)) or not value >= 0):
            raise GradSplitError(
                f"{label} must be a non-negative number (or None for the dtype's default); "
                f"got {value!r}."
            )
    random_ops = stateful_random_ops(program)
    if jit_compile and random_ops:
        raise GradSplitError(
            f"this program draws random numbers with stateful ops ({', '.join(random_ops[:3])}"
            "); under XLA each compiled program draws its own numbers, so the reference and "
            "the composed stages cannot see the same draw. Verify with jit_compile=False "
            "(op-level seeds make both sides draw alike), or use stateless random ops "
            "(tf.random.stateless_*) with seeds passed in as arguments."
        )
    unseeded = [n for n in random_ops if _unseeded(program.graph.nodes[n]["node_def"])]
    if unseeded:
        raise GradSplitError(
            f"random op(s) {', '.join(unseeded[:3])} draw without a seed (no op seed, no "
            "tf.random.set_seed when fn was traced): every function instance draws different "
            "numbers, so no reference can see the composed stages' draw. Give the op a "
            "seed= or call tf.random.set_seed before split(), then verify."
        )
    tensors = split.check_arguments(args)
    structured = tf.nest.pack_sequence_as(program.input_signature, tensors) \
        if program.input_signature is not None else tensors
    dtype = _dominant_dtype(split, tensors)
    rtol = DEFAULT_RTOL.get(dtype, 1e-5) if rtol is None else rtol
    atol = 0.0 if atol is None else atol
    scalar = len(split.output_names) == 1 and split.output_specs[0].shape.rank in (0, None)
    written = [split.variables[i] for i in program.written_variables()]
    before = [tf.identity(v) for v in written]

    reference = _reference_fn(program.tf_function, split.variables, scalar, jit_compile, seed)
    if scalar:
        ref_out, ref_grads = run_reporting_xla_errors(reference, *structured)
        ref_out, ref_extra = [ref_out], []
    else:
        ref_out, ref_extra, ref_grads, cots = run_reporting_xla_errors(reference, *structured)
    ref_after = [tf.identity(v) for v in written]
    _restore(written, before)
    # Stateful random kernels keep their state per function: a fresh composed function draws
    # what a fresh reference draws, however many steps the split has already run.
    fresh = split.fresh_functions() if random_ops else contextlib.nullcontext()
    try:
        with fresh:
            if scalar:
                value, grads = split.value_and_gradients(*structured, jit_compile=jit_compile)
                out, extra = [value], []
            else:
                out, extra, grads = split.vjp(structured, cots, jit_compile=jit_compile)
                out = tf.nest.flatten(out)
            after = [tf.identity(v) for v in written]
    finally:
        _restore(written, before)

    rows = []
    scale = max([_max_abs(r) for r in ref_grads] + [0.0])
    floor = 1e-6 * scale
    # An entry that is zero in exact arithmetic (a bias before batch norm) carries rounding
    # noise of a few ulps of the largest gradient; an error that small is not a mismatch.
    rounding = ROUNDING_ULPS * float(np.finfo(dtype.as_numpy_dtype).eps) * scale
    max_abs = max_rel = 0.0
    # A composed gradient list of another length than split.variables is a broken split,
    # not a caller's error: it is reported (a row per missing or extra gradient, never ok),
    # as any other wrong gradient is, rather than zipped away.
    grads, extra = list(grads), list(extra)
    for k, var in enumerate(split.variables):
        if k >= len(grads):
            rows.append(_missing_row(var.name, tuple(var.shape),
                                     "no gradient from the composed stages"))
            continue
        abs_err, rel_err = _errors(grads[k], ref_grads[k], floor)
        ok = rel_err <= rtol or abs_err <= max(atol, rounding)
        rows.append({"name": var.name, "shape": tuple(var.shape), "max_abs_error": abs_err,
                     "rel_error": rel_err, "ok": ok})
        max_abs, max_rel = max(max_abs, abs_err), max(max_rel, rel_err)
    for k in range(len(split.variables), len(grads)):
        rows.append(_missing_row(f"(gradient #{k})", tuple(np.shape(grads[k])),
                                 f"extra: split has {len(split.variables)} variables"))
    if len(extra) != len(ref_extra):
        rows.append(_missing_row("(input cotangents)", (len(extra),),
                                 f"{len(extra)} input cotangents for {len(ref_extra)} arguments"))
    for got, ref in zip(extra, list(ref_extra)):
        if got is None or ref is None:
            continue
        abs_err, rel_err = _errors(got, ref, floor)
        max_abs, max_rel = max(max_abs, abs_err), max(max_rel, rel_err)
    if any(not r["ok"] and "note" in r for r in rows):
        max_abs = max_rel = float("inf")
    ref_out = tf.nest.flatten(ref_out)
    value_error = max(
        (_errors(g, r, 1e-300)[1] for g, r in zip(out, ref_out)), default=0.0
    ) if len(out) == len(ref_out) else float("inf")
    side = max((_errors(a, r, 1e-300)[1] for a, r in zip(after, ref_after)), default=0.0)
    ok = value_error <= max(rtol, 1e-15) and side <= max(rtol, 1e-15) and all(
        r["ok"] for r in rows
    ) and (max_rel <= rtol or max_abs <= max(atol, rounding))
    return Report(ok=bool(ok), max_abs_error=max_abs, max_rel_error=max_rel,
                  value_error=value_error, rtol=rtol, atol=atol, dtype=dtype.name,
                  jit_compile=jit_compile, rows=rows, side_effect_error=side,
                  rounding_floor=rounding)


def reference_value_and_grads(fn, variables, jit_compile: bool):
    """A compiled ``args -> (value, grads)`` computing ``tape.gradient(fn(*args), variables)``.

    Unconnected gradients are zeros, as ``Split.value_and_gradients`` promises.
    """
    variables = list(variables)

    def body(*args):
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(variables)
            value = fn(*args)
        grads = tape.gradient(value, variables,
                              unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return value, [tf.convert_to_tensor(g) for g in grads]

    return tf.function(body, jit_compile=jit_compile, autograph=False)


def _reference_fn(tf_fn, variables, scalar: bool, jit_compile: bool, seed: int):
    # Trace fn's Python body afresh inside the reference, so under XLA its tf.cond and
    # tf.while_loop are built for XLA, as a user's own jit-compiled training step would be.
    tf_fn = getattr(tf_fn, "python_function", tf_fn)
    if scalar:
        return reference_value_and_grads(tf_fn, variables, jit_compile)

    def body(*args):
        with tf.GradientTape(watch_accessed_variables=False, persistent=True) as tape:
            tape.watch(variables)
            tape.watch([a for a in tf.nest.flatten(args) if a.dtype.is_floating])
            out = tf_fn(*args)
        flat = tf.nest.flatten(out)
        # Random output cotangents drawn from the outputs' runtime shapes, returned so
        # the composed side gets the very same values.
        cotangents = [
            tf.random.stateless_normal(tf.shape(t), seed=[seed, i], dtype=t.dtype)
            if t.dtype.is_floating else tf.zeros_like(t)
            for i, t in enumerate(flat)
        ]
        sources = list(variables)
        grads = tape.gradient(flat, sources, output_gradients=cotangents,
                              unconnected_gradients=tf.UnconnectedGradients.ZERO)
        arg_grads = [
            tape.gradient(flat, a, output_gradients=cotangents,
                          unconnected_gradients=tf.UnconnectedGradients.ZERO)
            if a.dtype.is_floating else None
            for a in tf.nest.flatten(args)
        ]
        return flat, arg_grads, [tf.convert_to_tensor(g) for g in grads], cotangents
    return tf.function(body, jit_compile=jit_compile, autograph=False)


RANDOM_OPS = ("RandomStandardNormal", "RandomUniform", "RandomUniformInt", "TruncatedNormal",
              "RandomShuffle", "Multinomial", "RandomGamma", "RandomPoisson", "RandomPoissonV2")


def stateful_random_ops(program) -> list[str]:
    """The ops of ``program``'s stages that draw random numbers from a kernel's state."""
    g = program.graph
    return [n for n in g.nodes if g.nodes[n]["op"] in RANDOM_OPS
            and g.nodes[n].get("stage") is not None]


def _unseeded(node_def) -> bool:
    seeds = [node_def.attr[k].i for k in ("seed", "seed2") if k in node_def.attr]
    return bool(seeds) and not any(seeds)


def _dominant_dtype(split: Split, tensors) -> tf.DType:
    for v in split.variables:
        if v.dtype.is_floating:
            return v.dtype
    for t in tensors:
        if t.dtype.is_floating:
            return t.dtype
    return tf.float32


def _missing_row(name: str, shape: tuple, note: str) -> dict:
    return {"name": name, "shape": shape, "max_abs_error": float("inf"),
            "rel_error": float("inf"), "ok": False, "note": note}


def _max_abs(t) -> float:
    a = np.asarray(t)
    return float(np.max(np.abs(a))) if a.size else 0.0


def _errors(got, ref, floor: float) -> tuple[float, float]:
    g, r = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if g.size == 0:
        return 0.0, 0.0
    abs_err = float(np.max(np.abs(g - r)))
    return abs_err, abs_err / max(_max_abs(r), floor, 1e-300)


def _restore(variables, values) -> None:
    for v, value in zip(variables, values):
        v.assign(value)
