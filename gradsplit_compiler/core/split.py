"""``gsc.split``: cut a program into stages; ``Split``: run them forward and back."""

from __future__ import annotations

import contextlib
import gc
import re
from collections.abc import Sequence
from typing import Any

import networkx as nx
import tensorflow as tf

from gradsplit_compiler import ir
from gradsplit_compiler._tf_internal import flat_caller
from gradsplit_compiler.core.pass_manager import run_passes
from gradsplit_compiler.core.rebuild import build_stage_vjp, is_differentiable
from gradsplit_compiler.core.stage import Stage
from gradsplit_compiler.errors import GradSplitError
from gradsplit_compiler.frontend.capture import capture
from gradsplit_compiler.ir.program import Program


def default_passes() -> list:
    from passes.inline_calls import inline_calls
    from passes.partition import partition
    from passes.refresh_shapes import refresh_shapes
    from passes.resolve_cuts import resolve_cuts

    return [inline_calls, refresh_shapes, resolve_cuts, partition]


def split(fn: Any, input_signature: Sequence, cuts: Sequence, *, training: bool | None = None,
          passes: Sequence | None = None) -> Split:
    """Cut ``fn`` at ``cuts`` into ``len(cuts) + 1`` stages whose VJPs compose exactly.

    Parameters
    ----------
    fn : tf.function, callable or keras.Model
        Traced once with ``input_signature``; the variables it reads are found by tracing.
    input_signature : list of tf.TensorSpec
        A ``None`` batch dimension works.
    cuts : list
        One entry per cut, in data-flow order: a graph tensor (``"op:index"`` or ``"op"``),
        a ``gsc.mark`` name, a Keras layer name, or a list of those for a cut of several
        tensors.
    training : bool, optional
        When ``fn`` is a ``keras.Model``, the ``training`` flag it is called with.
    passes : list, optional
        The graph passes to run; default ``inline_calls, refresh_shapes, resolve_cuts,
        partition``.

    Returns
    -------
    Split

    Raises
    ------
    GradSplitError
        When a cut cannot be honoured or ``fn`` cannot be traced; nothing is left changed.

    Examples
    --------
    >>> import numpy as np, tensorflow as tf
    >>> import gradsplit_compiler as gsc
    >>> W = tf.Variable(np.ones((3, 2)))
    >>> @tf.function
    ... def loss(x):
    ...     y = gsc.mark(tf.tanh(x @ W), "y")
    ...     return tf.reduce_sum(y * y)
    >>> s = gsc.split(loss, [tf.TensorSpec([None, 3], tf.float64)], cuts=["y"])
    >>> len(s.stages)
    2
    """
    if isinstance(cuts, (str, bytes)) or not isinstance(cuts, (list, tuple)):
        raise GradSplitError(
            f"cuts must be a list with one entry per cut, e.g. ['y'] or [['a', 'b']]; got "
            f"{cuts!r}."
        )
    with _collector_paused():
        program = capture(fn, input_signature, training=training)
        program.cut_specs = list(cuts)
        program = run_passes(program, list(passes) if passes is not None else default_passes())
        return Split(program)


@contextlib.contextmanager
def _collector_paused():
    """Python's cyclic garbage collector off while a split is built.

    Building creates graph objects by the hundred thousand; each full collection walks
    every object of the process, so with a big model already in memory the collector alone
    made split time per node grow with the size of the heap (~20% at 4,000 nodes beside
    ResNet50). What the split leaves as garbage is collected when the collector resumes.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class Split:
    """A program cut into stages. See ``docs/api.md`` for the promise it keeps."""

    def __init__(self, program: Program):
        self._program = program
        self.arg_names = list(program.arg_names)
        self.output_names = list(program.output_names)
        self.variables = list(program.variables)
        self.boundaries = [list(b) for b in program.boundaries]
        self.graph: nx.MultiDiGraph = program.graph
        self.arg_specs = list(program.arg_specs)
        # Built last to first: a stage output gets a cotangent only when a later stage (or
        # the caller) sends one back, so no backward multiplies zeros.
        receives = {n for n in self.output_names if is_differentiable(self._spec(n).dtype)}
        stages: list[Stage] = []
        for plan in reversed(program.stages):
            input_specs = [self._spec(n) for n in plan.inputs]
            output_specs = [self._spec(n) for n in plan.outputs]
            cotangent_outputs = [j for j, n in enumerate(plan.outputs) if n in receives]
            vjp = build_stage_vjp(program, plan, input_specs, output_specs, cotangent_outputs)
            receives |= {n for n, g in zip(plan.inputs, vjp.input_gradients) if g is not None}

            def rebuild(specs, plan=plan, output_specs=output_specs, cots=cotangent_outputs):
                return build_stage_vjp(program, plan, specs, output_specs, cots, static=True)

            stages.append(Stage(program, plan, vjp, input_specs, output_specs, rebuild))
        self.stages: list[Stage] = stages[::-1]
        self.output_specs = [self._spec(n) for n in self.output_names]
        self._functions: dict = {}

    def __repr__(self) -> str:
        return f"Split({len(self.stages)} stages, {len(self.variables)} variables)"

    def summary(self, batch_size: int | None = None) -> list[dict]:
        """One dict per stage: ``ops``, ``cost`` (estimated), ``variable_bytes``,
        ``boundary_tensors``, ``boundary_bytes`` (what enters the stage from earlier ones)
        and ``residual_bytes``; per-example sizes are multiplied by ``batch_size``."""
        from gradsplit_compiler.plan.costs import summarize

        return summarize(self, batch_size=batch_size)

    def spec(self, name: str) -> tf.TensorSpec:
        """The ``tf.TensorSpec`` (static shape, dtype) of graph tensor ``name``."""
        return self._spec(name)

    def variable_of(self, placeholder: str) -> tf.Variable | None:
        """The variable a captured-variable placeholder op of ``graph`` stands for."""
        index = self._program.variable_placeholders.get(placeholder)
        return None if index is None else self.variables[index]

    def _spec(self, name: str) -> tf.TensorSpec:
        if name in self.arg_names:
            return self.arg_specs[self.arg_names.index(name)]
        dtype = self._program.tensor_dtype(name)
        return tf.TensorSpec(self._program.tensor_shape(name), dtype)

    # -- running ---------------------------------------------------------------------------

    def _check_args(self, args: Sequence) -> list[tf.Tensor]:
        signature = self._program.input_signature
        if signature is not None and len(args) == len(signature) and (
            len(self.arg_specs) != len(signature)
        ):
            try:  # structured arguments (dicts, tuples) as in input_signature
                tf.nest.assert_same_structure(list(signature), list(args))
                args = tf.nest.flatten(list(args))
            except (TypeError, ValueError) as exc:
                raise GradSplitError(
                    f"arguments do not have the structure of input_signature: {exc}"
                ) from None
        if len(args) != len(self.arg_specs):
            raise GradSplitError(
                f"fn takes {len(self.arg_specs)} arguments ({', '.join(self._arg_labels())}) "
                f"as in its input_signature; got {len(args)}."
            )
        tensors = []
        for label, spec, arg in zip(self._arg_labels(), self.arg_specs, args):
            try:
                t = tf.convert_to_tensor(arg)
            except (TypeError, ValueError) as exc:
                raise GradSplitError(f"argument {label} cannot be a tensor: {exc}") from None
            if t.dtype != spec.dtype:
                raise GradSplitError(
                    f"argument {label} has dtype {t.dtype.name}, but input_signature says "
                    f"{spec.dtype.name}; cast it with tf.cast(..., tf.{spec.dtype.name})."
                )
            if not spec.shape.is_compatible_with(t.shape):
                raise GradSplitError(
                    f"argument {label} has shape {t.shape}, but input_signature says "
                    f"{spec.shape}."
                )
            tensors.append(t)
        return tensors

    def _arg_labels(self) -> list[str]:
        return [repr(ir.parse_tensor_name(n)[0]) for n in self.arg_names]

    def _check_xla(self, jit_compile: bool) -> None:
        for stage in self.stages:
            if jit_compile and not stage.xla_compatible:
                raise GradSplitError(
                    f"stage {stage.index} holds a tf.while_loop without maximum_iterations; "
                    "XLA needs a bound to keep the loop's values for the backward. Pass "
                    "maximum_iterations= to tf.while_loop, or run with jit_compile=False."
                )

    def _snapshot(self, variables: list) -> list:
        """The values of ``variables`` now, read in one call (not one eager op each)."""
        if not variables:
            return []
        if "snapshot" not in self._functions:
            self._functions["snapshot"] = tf.function(
                lambda: [tf.identity(v) for v in variables], autograph=False)
        return self._functions["snapshot"]()

    @contextlib.contextmanager
    def _fresh_functions(self):
        """Inside the block, composed functions are traced anew (stateful random kernels
        start from their seeds, as a fresh reference does); the cached ones come back
        afterwards."""
        cached = dict(self._functions)
        self._functions.clear()
        try:
            yield
        finally:
            self._functions.clear()
            self._functions.update(cached)

    def _flat_composed(self, kind: str, jit_compile: bool, zeros: tuple = ()):
        """``_composed(...)`` called on flat, already checked tensors, without
        ``tf.function``'s per-call argument binding."""
        key = ("flat", kind, bool(jit_compile), zeros)
        if key not in self._functions:
            self._functions[key] = flat_caller(self._composed(kind, jit_compile, zeros))
        else:
            self._check_xla(jit_compile)
        return self._functions[key]

    def _composed(self, kind: str, jit_compile: bool, zeros: tuple = ()):
        """The traced program of ``kind``; ``zeros`` lists outputs whose cotangent is zero
        (filled at run time, so their shapes may be dynamic)."""
        self._check_xla(jit_compile)
        key = (kind, bool(jit_compile), zeros)
        if key not in self._functions:
            if kind == "value_and_gradients":
                def body(*args):
                    outputs, _, grads = self._emit_vjp(args, None)
                    return outputs[0], grads
                signature = self.arg_specs
            else:
                given = [i for i in range(len(self.output_specs)) if i not in zeros]

                def body(args, cotangents):
                    full = [None] * len(self.output_specs)
                    for i, c in zip(given, cotangents):
                        full[i] = c
                    return self._emit_vjp(args, full)
                signature = [self.arg_specs, [self.output_specs[i] for i in given]]
            self._functions[key] = tf.function(
                body, input_signature=signature, jit_compile=jit_compile, autograph=False
            )
        return self._functions[key]

    def _emit_vjp(self, args, output_cotangents):
        env = dict(zip(self.arg_names, args))
        residuals = []
        for stage in self.stages:
            outs, res = stage.emit_forward([env[n] for n in stage.inputs],
                                           f"stage{stage.index}.forward")
            env.update(zip(stage.outputs, outs))
            residuals.append(res)
        outputs = [env[n] for n in self.output_names]
        if output_cotangents is None:
            output_cotangents = [tf.ones_like(outputs[0])]
        cotangents: dict[str, tf.Tensor] = {}
        for name, cot in zip(self.output_names, output_cotangents):
            if cot is not None:
                _accumulate(cotangents, name, cot)
        grads: dict[int, tf.Tensor] = {}
        for stage in reversed(self.stages):
            outs = [
                cotangents[n] if n in cotangents else tf.zeros_like(env[n])
                for n in stage.outputs
            ]
            in_cots, var_grads = stage.emit_backward(
                residuals[stage.index], outs, f"stage{stage.index}.backward"
            )
            for name, cot in zip(stage.inputs, in_cots):
                if cot is not None:
                    _accumulate(cotangents, name, cot)
            for idx, grad in zip(stage.variable_indices, var_grads):
                _accumulate(grads, idx, grad)
        input_cotangents = []
        for name, arg in zip(self.arg_names, args):
            if name in cotangents:
                input_cotangents.append(cotangents[name])
            elif is_differentiable(arg.dtype):
                input_cotangents.append(tf.zeros_like(arg))
            else:
                input_cotangents.append(None)
        var_grads = [
            grads[i] if i in grads else tf.zeros(v.shape, v.dtype)
            for i, v in enumerate(self.variables)
        ]
        return outputs, input_cotangents, var_grads

    def value_and_gradients(self, *args, jit_compile: bool = True):
        """Run the stages forward and their VJPs back: ``(value, grads)``.

        ``fn`` must return one scalar; ``grads`` aligns with ``self.variables`` (zeros for a
        variable the value does not depend on). Side effects of ``fn`` happen exactly once.
        """
        if len(self.output_names) != 1 or self.output_specs[0].shape.rank not in (0, None):
            shapes = ", ".join(str(s.shape) for s in self.output_specs)
            raise GradSplitError(
                "value_and_gradients needs fn to return a single scalar; it returns "
                f"{len(self.output_names)} tensor(s) of shape {shapes}. Reduce the output "
                "(e.g. tf.reduce_mean) or use split.vjp(args, output_cotangents)."
            )
        tensors = self._check_args(args)
        fn = self._flat_composed("value_and_gradients", jit_compile)
        value, grads = _run(fn, *tensors)
        return value, list(grads)

    def vjp(self, args: Sequence, output_cotangents: Any, jit_compile: bool = True):
        """``(outputs, input_cotangents, grads)`` for any output structure.

        ``output_cotangents`` has the structure of ``fn``'s output (or is the flat list in
        ``output_names`` order); ``input_cotangents`` align with ``args``.
        """
        tensors = self._check_args(list(args))
        cots = self._check_cotangents(output_cotangents)
        zeros = tuple(i for i, c in enumerate(cots) if c is None)
        fn = self._flat_composed("vjp", jit_compile, zeros)
        outputs, input_cotangents, grads = _run(fn, *tensors, *[c for c in cots if c is not None])
        structured = tf.nest.pack_sequence_as(self._program.output_structure, list(outputs))
        return structured, list(input_cotangents), list(grads)


    def _check_cotangents(self, output_cotangents: Any) -> list:
        """One tensor (or ``None``: zero) per output, of the output's dtype and shape."""
        try:
            flat = tf.nest.flatten(output_cotangents)
        except (TypeError, ValueError) as exc:
            raise GradSplitError(f"output_cotangents cannot be flattened: {exc}") from None
        if len(flat) != len(self.output_names):
            raise GradSplitError(
                f"output_cotangents has {len(flat)} tensors; fn has {len(self.output_names)} "
                f"outputs ({', '.join(self.output_names)}). Give one cotangent per output "
                "(None for an output nobody differentiates)."
            )
        cots = []
        for name, spec, c in zip(self.output_names, self.output_specs, flat):
            if c is None:
                cots.append(None)
                continue
            try:
                c = tf.convert_to_tensor(c, dtype=spec.dtype)
            except (TypeError, ValueError):
                raise GradSplitError(
                    f"the output cotangent for {name} must be a {spec.dtype.name} tensor of "
                    f"shape {spec.shape}; got {c!r:.80}."
                ) from None
            if not spec.shape.is_compatible_with(c.shape):
                raise GradSplitError(
                    f"the output cotangent for {name} must have shape {spec.shape}; got "
                    f"{c.shape}."
                )
            cots.append(c)
        return cots

    def run_stages(self, args: Sequence, output_cotangents: Any = None,
                   jit_compile: bool = True):
        """Drive the stages one by one, each forward and backward its own program.

        What a pipeline does, and what docs/api.md describes for callers in other processes:
        a dictionary from tensor names to values, each stage's ``forward`` on its inputs,
        then each ``backward`` in reverse, summing cotangents of tensors several stages
        read. ``output_cotangents`` defaults to 1 for a scalar ``fn``. Returns
        ``(outputs, input_cotangents, grads)`` as ``vjp`` does.
        """
        tensors = self._check_args(list(args))
        self._check_xla(jit_compile)
        checked = None if output_cotangents is None else self._check_cotangents(
            output_cotangents)
        env = dict(zip(self.arg_names, tensors))
        residuals = []
        written = [self.variables[i] for i in self._program.written_variables()]
        before = self._snapshot(written)
        try:
            for stage in self.stages:
                forward, _ = stage.callers(jit_compile)
                outs, res = _run(forward, *[env[n] for n in stage.inputs])
                env.update(zip(stage.outputs, outs))
                residuals.append(res)
        except Exception:
            # A stage that failed after earlier ones ran must not leave their updates.
            for v, value in zip(written, before):
                v.assign(value)
            raise
        outputs = [env[n] for n in self.output_names]
        if checked is None:
            checked = [tf.ones_like(outputs[0])]
        cotangents: dict[str, tf.Tensor] = {}
        for name, cot in zip(self.output_names, checked):
            if cot is not None:
                _accumulate(cotangents, name, cot)
        grads: dict[int, tf.Tensor] = {}
        for stage in reversed(self.stages):
            _, backward = stage.callers(jit_compile)
            outs = [cotangents[n] if n in cotangents else tf.zeros_like(env[n])
                    for n in stage.outputs]
            in_cots, var_grads = _run(backward, *residuals[stage.index], *outs)
            for name, cot in zip(stage.inputs, in_cots):
                if cot is not None:
                    _accumulate(cotangents, name, cot)
            for idx, grad in zip(stage.variable_indices, var_grads):
                _accumulate(grads, idx, grad)
        input_cotangents = [
            cotangents[n] if n in cotangents
            else tf.zeros_like(t) if is_differentiable(t.dtype) else None
            for n, t in zip(self.arg_names, tensors)
        ]
        var_grads = [grads[i] if i in grads else tf.zeros(v.shape, v.dtype)
                     for i, v in enumerate(self.variables)]
        structured = tf.nest.pack_sequence_as(self._program.output_structure, outputs)
        return structured, input_cotangents, var_grads


def _accumulate(store: dict, key, value) -> None:
    store[key] = store[key] + value if key in store else value


_UNSUPPORTED_NODE = re.compile(r"compatible with node \{\{node ([^}]+)\}\}")
_STAGE_OF_NODE = re.compile(r"^stage(\d+)\.(forward|backward)/(.+)$")
_UNSUPPORTED = re.compile(r"Detected unsupported operations.*?: (\w+) \(No registered '(\w+)'")


def _run(fn, *args):
    try:
        return fn(*args)
    except tf.errors.InvalidArgumentError as exc:
        match = _UNSUPPORTED.search(str(exc))
        if match:
            where = _UNSUPPORTED_NODE.search(str(exc))
            node = where.group(1) if where else match.group(1)
            stage = _STAGE_OF_NODE.match(node)
            place = (
                f"op {stage.group(3)!r} in the {stage.group(2)} of stage {stage.group(1)}"
                if stage else f"op {node!r}"
            )
            raise GradSplitError(
                f"XLA cannot compile {place}: no XLA kernel for op type {match.group(2)!r}. "
                "Run with jit_compile=False, or rewrite that op with XLA-supported ops."
            ) from None
        raise
