"""``gsc.split``: cut a program into stages; ``Split``: run them forward and back."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import networkx as nx
import tensorflow as tf

import passes as pass_pipeline
from gradsplit_compiler import ir
from gradsplit_compiler._tf_internal import flat_caller
from gradsplit_compiler.core.compose import compose
from gradsplit_compiler.core.rebuild import build_stage_vjp, is_differentiable
from gradsplit_compiler.core.stage import Stage
from gradsplit_compiler.core.xla import run_reporting_xla_errors
from gradsplit_compiler.errors import GradSplitError, unknown_name_message
from gradsplit_compiler.frontend.capture import capture
from gradsplit_compiler.ir.program import Program
from gradsplit_compiler.util import collector_paused, phase, recording_phases
from passes.manager import run_passes

__all__ = ["Cotangents", "Split", "program_of", "split"]


def split(fn: Any, input_signature: Sequence | None = None, cuts: Sequence | None = None, *,
          training: bool | None = None, passes: Sequence | Mapping | None = None) -> Split:
    """Cut ``fn`` at ``cuts`` into ``len(cuts) + 1`` stages whose VJPs compose exactly.

    Parameters
    ----------
    fn : tf.function, callable, keras.Model or Program
        Traced once with ``input_signature``; the variables it reads are found by tracing.
        A ``gsc.Program`` (from ``gsc.capture``, edited or not) is cut as it is, without
        ``input_signature``; it is not changed (the passes run on a copy).
    input_signature : list of tf.TensorSpec
        A ``None`` batch dimension works. Omitted when ``fn`` is a ``Program``.
    cuts : list
        One entry per cut, in data-flow order: a graph tensor (``"op:index"`` or ``"op"``),
        a ``gsc.mark`` name, a Keras layer name, or a list of those for a cut of several
        tensors.
    training : bool, optional
        When ``fn`` is a ``keras.Model``, the ``training`` flag it is called with.
    passes : list or dict, optional
        The graph passes to run; default ``passes.pipeline()``, the phases ``analysis``
        (``inline_calls, refresh_shapes``) and ``cutting`` (``resolve_cuts, partition``).
        A dict adds passes of one's own at named points: ``{"analysis": [my_pass]}`` runs
        ``my_pass`` once the program is analysed, before the cuts are resolved;
        ``{"resolve_cuts": [...]}`` once they are, before ``partition``; ``{"cutting":
        [...]}`` after partition (the same as ``passes.pipeline(after=...)``). Each pass
        must keep what the passes before it guarantee, and the graph is checked after each
        (``docs/passes.md``); a broken one raises ``GradSplitError`` naming the pass and
        the node, before anything runs.

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
    if isinstance(fn, Program) and cuts is None and isinstance(input_signature, (list, tuple)):
        input_signature, cuts = None, input_signature  # split(program, ["y"])
    if isinstance(cuts, (str, bytes)) or not isinstance(cuts, (list, tuple)):
        raise GradSplitError(
            f"cuts must be a list with one entry per cut, e.g. ['y'] or [['a', 'b']]; got "
            f"{cuts!r}."
        )
    if passes is None:
        chosen = pass_pipeline.pipeline()
    elif isinstance(passes, Mapping):
        chosen = pass_pipeline.pipeline(after=passes)
    else:
        chosen = list(passes)
    pass_pipeline.check_order(chosen)
    with collector_paused(), recording_phases() as profile:
        program = program_of(fn, input_signature, training)
        program.cut_specs = list(cuts)
        program = run_passes(program, chosen)
        result = Split(program)
    result.profile = profile
    return result



def program_of(fn: Any, input_signature: Sequence | None, training: bool | None) -> Program:
    """A copy of ``fn`` when it is a ``Program`` (``input_signature`` must then be omitted),
    else ``fn`` captured with ``input_signature``."""
    if isinstance(fn, Program):
        if input_signature is not None:
            raise GradSplitError(
                "fn is a gsc.Program, which carries its own input_signature; omit "
                "input_signature (split(program, cuts=[...]))."
            )
        with phase("copy"):
            return fn.copy()
    if input_signature is None:
        raise GradSplitError(
            "input_signature is missing: give one tf.TensorSpec per argument of fn, e.g. "
            "[tf.TensorSpec([None, 10], tf.float32)] (only a gsc.Program carries its own)."
        )
    return capture(fn, input_signature, training=training)


@dataclass
class Cotangents:
    """What ``Split.cotangents`` returns: the program's value, the cotangent of the value at
    every cut tensor and the variables' gradients, by the names the caller gave.

    ``cotangents`` maps each name a cut was given by (a ``gsc.mark`` name, a Keras layer, a
    graph tensor) to dL/d(that tensor), summed over every stage that reads it;
    ``tensors`` maps the same names to the graph tensors they resolved to; ``gradients``
    align with ``split.variables``.
    """

    value: tf.Tensor
    cotangents: dict[str, tf.Tensor]
    gradients: list[tf.Tensor]
    tensors: dict[str, str]


class Split:
    """A program cut into stages. See ``docs/api.md`` for the promise it keeps.

    ``plan`` is what ``gsc.auto_split`` chose (a ``plan.autosplit.Plan``: the intended
    stages, estimated costs and bytes, and any op placed elsewhere); ``None`` for a split
    whose cuts the caller gave.

    ``profile`` is where ``gsc.split`` spent its time: ``{phase: seconds}`` in the order
    the phases ran (``trace`` and ``convert`` of the capture, ``pass <name>`` and
    ``checks`` of the passes, ``stage <k>: ...`` of each stage's rebuild: ``piece``,
    ``trace`` (the scratch function, apart from ``import`` of the stage's ops and
    TensorFlow's ``gradients``), ``convert``, ``cut``, ``split backward``, ``pieces``,
    ``functions``), ``other`` the rest; the values add up to ``profile.total``, the wall
    time of the call. Empty for a ``Split`` made otherwise.
    """

    def __init__(self, program: Program, plan: Any = None):
        self._program = program
        self._written: tuple[int, ...] | None = None
        self.plan = plan
        self.profile: dict[str, float] = {}
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

            with phase(f"stage {plan.index}: functions"):
                stages.append(Stage(program, plan, vjp, input_specs, output_specs, rebuild))
        self.stages: list[Stage] = stages[::-1]
        self.output_specs = [self._spec(n) for n in self.output_names]
        self._functions: dict = {}
        # the caller's names: each cut entry's names -> the graph tensors they resolved to
        self.cut_tensors: dict[str, str] = {}
        for spec, tensors in zip(program.cut_specs, program.cuts):
            names = list(spec) if isinstance(spec, (list, tuple)) else [spec]
            for name, tensor in zip(names, tensors):
                self.cut_tensors.setdefault(str(name), tensor)
        labels = {n: ir.parse_tensor_name(n)[0] for n in self.arg_names}
        labels.update({t: name for name, t in self.cut_tensors.items()})
        for stage in self.stages:
            stage.set_labels(labels)

    def __repr__(self) -> str:
        return f"Split({len(self.stages)} stages, {len(self.variables)} variables)"

    def summary(self, batch_size: int | None = None) -> list[dict]:
        """One dict per stage: ``ops``, ``cost`` (estimated), ``variable_bytes``,
        ``boundary_tensors``, ``boundary_bytes`` (what enters the stage from earlier ones)
        and ``residual_bytes``; per-example sizes are multiplied by ``batch_size``."""
        from gradsplit_compiler.plan.costs import summarize

        return summarize(self, batch_size=batch_size)

    def spec(self, name: str) -> tf.TensorSpec:
        """The ``tf.TensorSpec`` (static shape, dtype) of graph tensor ``name`` (or of the
        tensor a cut name or an argument name stands for)."""
        return self._spec(self.tensor(name))

    def tensor(self, name: str) -> str:
        """The graph tensor (``"op:index"``) that ``name`` stands for: a name a cut was
        given by (``gsc.mark`` name, Keras layer, graph tensor), an argument's name, or a
        graph tensor itself."""
        if name in self.cut_tensors:
            return self.cut_tensors[name]
        for arg in self.arg_names:
            if name in (arg, ir.parse_tensor_name(arg)[0]):
                return arg
        op, index = ir.parse_tensor_name(name)
        if op in self.graph and index < len(self.graph.nodes[op].get("outputs") or [None]):
            return ir.tensor_name(op, index)
        raise GradSplitError(unknown_name_message(
            "name", name, list(self.cut_tensors) + [ir.parse_tensor_name(a)[0]
                                                    for a in self.arg_names]))

    def cotangents(self, *args, jit_compile: bool = True) -> Cotangents:
        """The value, the cotangent at every cut and the variable gradients, in one call.

        Like ``value_and_gradients`` (``fn`` returns one scalar; one forward and one
        backward through the stages), and also dL/dy for every tensor ``y`` a cut names,
        keyed by the name the cut gave it: ``split.cotangents(x).cotangents["y"]`` for
        ``cuts=["y"]``. A cut tensor no later op differentiates gets zeros.

        Examples
        --------
        >>> import numpy as np, tensorflow as tf
        >>> import gradsplit_compiler as gsc
        >>> f = lambda x: tf.reduce_sum(gsc.mark(tf.tanh(x), "y") ** 2)
        >>> s = gsc.split(f, [tf.TensorSpec([3], tf.float64)], cuts=["y"])
        >>> x = tf.constant([0.5, -1.0, 2.0], tf.float64)
        >>> got = s.cotangents(x)
        >>> bool(np.allclose(got.cotangents["y"], 2 * np.tanh(x))), got.tensors["y"]
        (True, 'gsc.mark.y.:0')
        """
        self._check_scalar("cotangents")
        tensors = self._check_args(args)
        fn = self._flat_composed("cotangents", jit_compile)
        with self._explaining_failures(tensors):
            value, cots, grads = run_reporting_xla_errors(fn, *tensors)
        return Cotangents(value=value, cotangents=dict(zip(self.cut_tensors, cots)),
                          gradients=list(grads), tensors=dict(self.cut_tensors))

    def _check_scalar(self, method: str) -> None:
        if len(self.output_names) != 1 or self.output_specs[0].shape.rank not in (0, None):
            shapes = ", ".join(str(s.shape) for s in self.output_specs)
            raise GradSplitError(
                f"{method} needs fn to return a single scalar; it returns "
                f"{len(self.output_names)} tensor(s) of shape {shapes}. Reduce the output "
                "(e.g. tf.reduce_mean) or use split.vjp(args, output_cotangents)."
            )

    @property
    def trainable_variables(self) -> list[tf.Variable]:
        """The variables an optimizer may update (``trainable=True``, as Keras marks them), in
        ``variables`` order; batch-norm moving statistics and other non-trainable
        variables are left out: their gradients (in ``value_and_gradients``) are not for
        training."""
        return [v for v in self.variables if v.trainable]

    def variable_of(self, placeholder: str) -> tf.Variable | None:
        """The variable a captured-variable placeholder op of ``graph`` stands for."""
        index = self._program.variable_placeholders.get(placeholder)
        return None if index is None else self.variables[index]

    # -- the package's internal interface: what verify, plan and run read of a Split ------
    # (documented, stable within the package; not part of the user promise)

    @property
    def program(self) -> Program:
        """The ``Program`` the stages were built from, after the passes ran."""
        return self._program

    def written_variables(self) -> list[tf.Variable]:
        """The variables ``fn`` assigns (batch-norm statistics, counters), in
        ``self.variables`` order."""
        if self._written is None:  # the program is fixed once split
            self._written = tuple(self._program.written_variables())
        return [self.variables[i] for i in self._written]

    def check_arguments(self, args: Sequence) -> list[tf.Tensor]:
        """``args`` as flat tensors checked against the input signature; a
        ``GradSplitError`` in the caller's terms otherwise."""
        return self._check_args(args)

    def fresh_functions(self):
        """A context in which composed programs are traced anew (stateful random kernels
        start from their seeds, as a fresh reference does)."""
        return self._fresh_functions()

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
            try:  # a tensor already is one (converting it again costs a few us per call)
                t = arg if isinstance(arg, tf.Tensor) else tf.convert_to_tensor(arg)
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
        if "_labels" not in self.__dict__:  # the arguments are fixed once split
            self._labels = [repr(ir.parse_tensor_name(n)[0]) for n in self.arg_names]
        return self._labels

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
        key = ("snapshot", tuple(id(v) for v in variables))
        if key not in self._functions:
            self._functions[key] = tf.function(
                lambda: [tf.identity(v) for v in variables], autograph=False)
        return self._functions[key]()

    @contextlib.contextmanager
    def _restoring_on_failure(self, variables: list, errors: Any = Exception):
        """Inside the block, a failure of type ``errors`` puts ``variables`` back to their
        values on entry, then propagates."""
        before = self._snapshot(variables)
        try:
            yield
        except errors:
            for v, value in zip(variables, before):
                v.assign(value)
            raise

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
            elif kind == "cotangents":
                def body(*args):
                    found = []

                    def read(cotangents, values):
                        for t in self.cut_tensors.values():
                            c = cotangents.get(t)
                            found.append(tf.zeros_like(values[t]) if c is None else c)
                    outputs, _, grads = self._emit_vjp(args, None, on_cotangents=read)
                    return outputs[0], found, grads
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

    def _emit_vjp(self, args, output_cotangents, on_cotangents=None):
        """The composed VJP emitted into the function being traced: each stage's forward
        and backward inlined, named ``stage<k>.forward`` / ``stage<k>.backward``."""
        return compose(
            self.stages, self.arg_names, args, self.output_names, output_cotangents,
            forward=lambda st, inputs: st.emit_forward(inputs, f"stage{st.index}.forward"),
            backward=lambda st, res, cots: st.emit_backward(
                res, cots, f"stage{st.index}.backward"),
            variable_zeros=self._variable_zeros(), on_cotangents=on_cotangents)

    def _unit_cotangent(self, outputs: list) -> list:
        """``[ones_like(outputs[0])]``, the cotangent of a scalar program's gradient, made
        once per shape, dtype and device (on the value's device) instead of by an eager op
        per call (in a trace, as an op)."""
        if not tf.executing_eagerly():
            return [tf.ones_like(outputs[0])]
        made = self.__dict__.setdefault("_unit_cotangents", {})
        value = outputs[0]
        key = (value.dtype, tuple(value.shape), value.device)
        if key not in made:
            with tf.device(value.device):
                made[key] = tf.ones_like(value)
        return [made[key]]

    def _variable_zeros(self) -> list:
        if "_zeros" not in self.__dict__:  # made when called: a variable's zero gradient
            self._zeros = [lambda v=v: tf.zeros(v.shape, v.dtype) for v in self.variables]
        return self._zeros

    def value_and_gradients(self, *args, jit_compile: bool = True):
        """Run the stages forward and their VJPs back: ``(value, grads)``.

        ``fn`` must return one scalar; ``grads`` aligns with ``self.variables`` (zeros for a
        variable the value does not depend on). Side effects of ``fn`` happen exactly once.
        """
        self._check_scalar("value_and_gradients")
        tensors = self._check_args(args)
        fn = self._flat_composed("value_and_gradients", jit_compile)
        with self._explaining_failures(tensors):
            value, grads = run_reporting_xla_errors(fn, *tensors)
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
        given = [c for c in cots if c is not None]
        with self._explaining_failures(tensors, cots):
            outputs, input_cotangents, grads = run_reporting_xla_errors(fn, *tensors, *given)
        structured = tf.nest.pack_sequence_as(self._program.output_structure, list(outputs))
        return structured, list(input_cotangents), list(grads)


    @contextlib.contextmanager
    def _explaining_failures(self, tensors: Sequence[tf.Tensor], cotangents: Sequence = ()):
        """TensorFlow's refusal of arguments (or output cotangents) that pass the signature's
        checks but do not fit together, as a ``GradSplitError`` in the caller's terms: batched
        arguments of different batch sizes, or a cotangent whose shape is not its output's
        for these arguments. Any other failure is raised as it is."""
        # Arguments of different batch sizes may be what fn wants (a batch and a set of
        # prototypes), so they are not refused up front; but if fn fails on them, what it
        # assigned before failing (a counter, batch statistics) is put back.
        written = self.written_variables() if self._batch_sizes(tensors) else []
        try:
            with self._restoring_on_failure(written, tf.errors.InvalidArgumentError):
                yield
        except tf.errors.InvalidArgumentError as exc:
            error = self._mismatched_batches(tensors, exc) or self._mismatched_cotangents(
                tensors, cotangents)
            if error is None:
                raise
            raise error from exc

    def _batch_sizes(self, tensors) -> list:
        """``(label, tensor)`` of the batched arguments when their batch sizes differ."""
        batched = [(label, t) for label, spec, t in zip(self._arg_labels(), self.arg_specs,
                                                        tensors)
                   if spec.shape.rank and spec.shape[0] is None and t.shape.rank]
        return batched if len({int(t.shape[0]) for _, t in batched}) > 1 else []

    def _mismatched_batches(self, tensors, exc) -> GradSplitError | None:
        batched = self._batch_sizes(tensors)
        if not batched:
            return None
        listed = ", ".join(f"{label} (batch {int(t.shape[0])})" for label, t in batched)
        said = next((line.strip() for line in exc.message.splitlines() if line.strip()
                     and not line.startswith(("Graph execution", "Detected at", "<stack"))),
                    type(exc).__name__)
        return GradSplitError(
            f"the batched arguments {listed} have different batch sizes (a None leading "
            f"dimension in input_signature), and fn cannot combine them: TensorFlow says "
            f"{said!r}. Give every batched argument the same batch size."
        )

    def _mismatched_cotangents(self, tensors, cotangents) -> GradSplitError | None:
        loose = [i for i, (spec, c) in enumerate(zip(self.output_specs, cotangents))
                 if c is not None and not spec.shape.is_fully_defined()]
        if not loose or self._program.tf_function is None:
            return None
        # the outputs' static shapes for arguments of these shapes: a trace, nothing runs
        specs = [tf.TensorSpec(t.shape, t.dtype) for t in tensors]
        signature = self._program.input_signature
        structured = tf.nest.pack_sequence_as(signature, specs) if signature is not None \
            else specs
        body = getattr(self._program.tf_function, "python_function",
                       self._program.tf_function)
        try:
            concrete = tf.function(body, autograph=False).get_concrete_function(*structured)
        except Exception:
            return None
        shapes = [t.shape for t in tf.nest.flatten(concrete.structured_outputs)]
        if len(shapes) != len(self.output_names):
            return None
        for i in loose:
            if not shapes[i].is_compatible_with(cotangents[i].shape):
                return GradSplitError(
                    f"the output cotangent for {self.output_names[i]} must have the shape of "
                    f"that output for these arguments, {shapes[i]}; got "
                    f"{cotangents[i].shape}. Give each output's cotangent its output's shape "
                    "(the same batch size as the arguments)."
                )
        return None

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

        def forward(stage, inputs):
            # the stage's backward travels with its residuals: one lookup per stage
            program, backward_program = stage.callers(jit_compile)
            outputs, residuals = run_reporting_xla_errors(program, *inputs)
            return outputs, (backward_program, residuals)

        def backward(stage, saved, cotangents):
            program, residuals = saved
            return run_reporting_xla_errors(program, *residuals, *cotangents)
        # A stage that fails after earlier ones ran must not leave their updates.
        with self._restoring_on_failure(self.written_variables()), \
                self._explaining_failures(tensors, checked or ()):
            outputs, input_cotangents, var_grads = compose(
                self.stages, self.arg_names, tensors, self.output_names,
                self._unit_cotangent if checked is None else checked,
                forward=forward, backward=backward, variable_zeros=self._variable_zeros())
        structured = tf.nest.pack_sequence_as(self._program.output_structure, outputs)
        return structured, input_cotangents, var_grads
