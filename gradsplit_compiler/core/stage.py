"""``Stage``: one piece of a split program, with its forward and its vector-Jacobian product."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import tensorflow as tf

from gradsplit_compiler._tf_internal import flat_caller
from gradsplit_compiler.core.rebuild import StageVJP, capture_map, emit
from gradsplit_compiler.errors import GradSplitError
from gradsplit_compiler.ir.program import Program, StagePlan

__all__ = ["Stage"]


class Stage:
    """One stage of a ``Split``.

    Attributes
    ----------
    inputs, outputs : list of str
        Graph tensor names that enter and leave the stage.
    input_labels, output_labels : list of str
        The same tensors by the caller's names where it gave one (the name a cut was given
        by, an argument's name), by graph name otherwise; ``run_forward`` and
        ``run_backward`` take and give dicts keyed by them.
    variables : list of tf.Variable
        The variables this stage reads (a subset of ``split.variables``).
    forward : tf.function
        ``forward(*stage_inputs) -> (outputs, residuals)``.
    backward : tf.function
        ``backward(residuals, output_cotangents) -> (input_cotangents, variable_grads)``;
        ``output_cotangents`` align with ``outputs`` (entries for integer outputs are
        ignored), ``input_cotangents`` with ``inputs`` (``None`` for integer inputs) and
        ``variable_grads`` with ``variables``. It never runs the forward again.
    """

    def __init__(self, program: Program, plan: StagePlan, vjp: StageVJP,
                 input_specs: list[tf.TensorSpec], output_specs: list[tf.TensorSpec],
                 rebuild=None):
        self.index = plan.index
        self.inputs = list(plan.inputs)
        self.outputs = list(plan.outputs)
        self.input_labels = list(self.inputs)
        self.output_labels = list(self.outputs)
        self.variable_indices = list(plan.variable_indices)
        self.variables = [program.variables[i] for i in plan.variable_indices]
        self.input_specs = input_specs
        self.output_specs = output_specs
        self.residual_specs = list(vjp.residual_specs)
        # names of the residuals in the stage's VJP graph (forward tensors the backward reads)
        self.residuals = list(vjp.residual_names)
        self.num_ops = len(plan.nodes)
        self._program = program
        self._vjp = vjp
        # rebuild(input_specs) -> StageVJP: the stage traced again with other input specs
        # (static shapes, for the XLA limit described in ``compiled``)
        self._rebuild = rebuild
        self._static_vjps: dict = {}
        # False when a tf.while_loop without maximum_iterations keeps values for the backward
        self.xla_compatible = vjp.xla_compatible
        self.forward = tf.function(
            self._forward_body, input_signature=input_specs, autograph=False,
        )
        self.backward = tf.function(
            self._backward_body,
            input_signature=[list(vjp.residual_specs), list(output_specs)],
            autograph=False,
        )

    def __repr__(self) -> str:
        return (
            f"Stage({self.index}: {self.num_ops} ops, {len(self.inputs)} inputs, "
            f"{len(self.outputs)} outputs, {len(self.variables)} variables, "
            f"{len(self.residual_specs)} residuals)"
        )

    def set_labels(self, labels: dict[str, str]) -> None:
        """Name inputs and outputs by ``labels`` (graph tensor -> the caller's name)."""
        self.input_labels = [labels.get(n, n) for n in self.inputs]
        self.output_labels = [labels.get(n, n) for n in self.outputs]

    def _by_label(self, given, names: list[str], labels: list[str], what: str) -> list:
        if not isinstance(given, dict):
            raise GradSplitError(f"stage {self.index}'s {what} are a dict keyed by "
                                 f"{labels}; got {type(given).__name__}.")
        index = {**{n: i for i, n in enumerate(names)}, **{n: i for i, n in enumerate(labels)}}
        found: list = [None] * len(names)
        for key, value in given.items():
            if key not in index:
                raise GradSplitError(f"stage {self.index} has no {what[:-1]} named {key!r}; "
                                     f"its {what} are {labels}.")
            found[index[key]] = value
        return found

    def run_forward(self, inputs: dict, jit_compile: bool = False):
        """Run the forward on ``inputs`` keyed by ``input_labels`` (or graph names):
        ``(outputs keyed by output_labels, residuals)``."""
        given = self._by_label(inputs, self.inputs, self.input_labels, "inputs")
        missing = [label for label, v in zip(self.input_labels, given) if v is None]
        if missing:
            raise GradSplitError(f"stage {self.index} needs the inputs {missing} too; it "
                                 f"reads {self.input_labels}.")
        tensors = [tf.convert_to_tensor(v, s.dtype) for v, s in zip(given, self.input_specs)]
        outputs, residuals = self.callers(jit_compile)[0](*tensors)
        return dict(zip(self.output_labels, outputs)), list(residuals)

    def run_backward(self, residuals: Sequence, cotangents: dict, jit_compile: bool = False):
        """Run the VJP on the forward's ``residuals`` and output cotangents keyed by
        ``output_labels`` (an output left out gets zeros): ``(input cotangents keyed by
        input_labels, variable gradients aligned with variables)``."""
        given = self._by_label(cotangents, self.outputs, self.output_labels, "outputs")
        cots = []
        for value, spec in zip(given, self.output_specs):
            if value is None:
                shape = [0 if d is None else d for d in spec.shape] if spec.shape.rank else []
                if not spec.shape.is_fully_defined():
                    raise GradSplitError(f"stage {self.index}: give a cotangent for every "
                                         "output of unknown shape.")
                value = tf.zeros(shape, spec.dtype)
            cots.append(tf.convert_to_tensor(value, spec.dtype))
        input_cots, grads = self.callers(jit_compile)[1](*residuals, *cots)
        return dict(zip(self.input_labels, input_cots)), list(grads)

    def _forward_body(self, *inputs, variables=None):
        return self.emit_forward(inputs, f"stage{self.index}.forward", variables)

    def _backward_body(self, residuals, cotangents, variables=None):
        return self.emit_backward(residuals, cotangents, f"stage{self.index}.backward",
                                  variables)

    def emit_forward(self, inputs: Sequence[tf.Tensor], name: str,
                     variables: Sequence | None = None, vjp: StageVJP | None = None):
        """Emit the forward into the function being traced: ``(outputs, residuals)``.

        ``variables`` (aligned with ``self.variables``) are read instead of the program's,
        e.g. replicas placed on the stage's own device."""
        vjp = vjp or self._vjp
        input_map = dict(zip(vjp.input_keys, inputs))
        input_map.update(capture_map(vjp, self._program, self._overrides(variables)))
        fetched = [r for r in vjp.residual_names if r not in input_map]
        got = emit(vjp.forward_graph_def, input_map, vjp.output_names + fetched, name)
        outputs = got[: len(vjp.output_names)]
        rest = dict(zip(fetched, got[len(vjp.output_names):]))
        residuals = [input_map[r] if r in input_map else rest[r] for r in vjp.residual_names]
        for i, as_list in vjp.list_residuals.items():
            residuals[i] = as_list.to_tensor(residuals[i], residuals[as_list.counter])
        return outputs, residuals

    def emit_backward(self, residuals: Sequence[tf.Tensor], cotangents: Sequence, name: str,
                      variables: Sequence | None = None, vjp: StageVJP | None = None):
        """Emit the VJP: ``(input_cotangents, variable_grads)``."""
        vjp = vjp or self._vjp
        residuals = list(residuals)
        for i, as_list in vjp.list_residuals.items():
            residuals[i] = as_list.from_tensor(residuals[i])
        input_map = dict(zip(vjp.residual_names, residuals))
        for j, key in vjp.cotangent_keys.items():
            input_map[key] = cotangents[j]
        input_map.update(capture_map(vjp, self._program, self._overrides(variables)))
        wanted = [s for s in vjp.input_gradients + vjp.variable_gradients if isinstance(s, str)]
        wanted = list(dict.fromkeys(wanted))
        got = dict(zip(wanted, emit(vjp.backward_graph_def, input_map, wanted, name)))

        def resolve(source):
            if source is None:
                return None
            if isinstance(source, str):
                return got[source]
            kind, j = source
            return cotangents[j] if kind == "cotangent" else residuals[j]

        input_cotangents = [resolve(s) for s in vjp.input_gradients]
        variable_grads = []
        for source, var in zip(vjp.variable_gradients, self.variables):
            grad = resolve(source)
            variable_grads.append(tf.zeros(var.shape, var.dtype) if grad is None else grad)
        return input_cotangents, variable_grads

    def _overrides(self, variables: Sequence | None) -> dict | None:
        if variables is None:
            return None
        if len(variables) != len(self.variables):
            raise GradSplitError(
                f"stage {self.index} reads {len(self.variables)} variables; got "
                f"{len(variables)} to read instead."
            )
        return dict(zip(self.variable_indices, variables))

    def compiled(self, jit_compile: bool = True, variables: Sequence | None = None):
        """``(forward, backward)`` as their own XLA programs (what a pipeline runs).

        ``variables``, aligned with ``self.variables``, are read instead of the program's
        own: replicas on the device the stage runs on (an XLA program cannot read a variable
        held on another device), or variables of another process's copy of the model.

        A stage holding a ``tf.cond`` whose backward needs intermediates of a branch
        compiles on its own under XLA only with static input shapes: XLA compiles both
        branches, and TensorFlow stands in for the other branch's intermediates with zeros
        of their static shape, a 0 where the batch dimension is ``None``. Such a stage is
        traced again, with its gradient, for each input shape it is called with (its
        ``forward`` retraces per shape; its ``backward`` uses the trace of the forward that
        made the residuals it is given).
        """
        key = (bool(jit_compile), None if variables is None else tuple(map(id, variables)))
        cache = self.__dict__.setdefault("_compiled", {})
        if jit_compile and not self.xla_compatible:
            raise GradSplitError(
                f"stage {self.index} holds a tf.while_loop without maximum_iterations; XLA "
                "needs a bound to keep the loop's values for the backward. Pass "
                "maximum_iterations= to tf.while_loop, or use compiled(jit_compile=False)."
            )
        per_shape = jit_compile and self._static_shapes_needed
        if per_shape and self._rebuild is None:
            raise GradSplitError(
                f"stage {self.index} holds a tf.cond whose gradient reads branch "
                "intermediates; XLA can compile it on its own only with static shapes, and "
                f"its inputs have shapes {[str(s.shape) for s in self.input_specs]}. Give "
                "split() an input_signature with a fixed batch size, or use "
                "compiled(jit_compile=False) for this stage."
            )
        if per_shape and key not in cache:
            def static_forward(*inputs):
                vjp = self._static_vjp([tuple(t.shape) for t in inputs])
                return self.emit_forward(inputs, f"stage{self.index}.forward", variables, vjp)

            def static_backward(residuals, cotangents):
                vjp = self._static_vjp_of(residuals)
                return self.emit_backward(residuals, cotangents, f"stage{self.index}.backward",
                                          variables, vjp)

            cache[key] = (
                tf.function(static_forward, jit_compile=True, autograph=False),
                tf.function(static_backward, jit_compile=True, autograph=False),
            )
        if key not in cache:
            def forward(*inputs):
                return self._forward_body(*inputs, variables=variables)

            def backward(residuals, cotangents):
                return self._backward_body(residuals, cotangents, variables=variables)

            cache[key] = (
                tf.function(forward, input_signature=self.input_specs,
                            jit_compile=jit_compile, autograph=False),
                tf.function(backward,
                            input_signature=[list(self.residual_specs), list(self.output_specs)],
                            jit_compile=jit_compile, autograph=False),
            )
        return cache[key]

    def callers(self, jit_compile: bool = True, variables: Sequence | None = None):
        """``compiled(...)`` as plain callables on flat tensors, for drivers on the hot path.

        ``forward(*stage_inputs) -> (outputs, residuals)`` and
        ``backward(*residuals, *output_cotangents) -> (input_cotangents, variable_grads)``:
        the same programs as ``compiled``, without ``tf.function``'s per-call argument
        binding (which costs more than a small stage's XLA program). Tensors must match
        ``input_specs`` / ``residual_specs`` + ``output_specs`` in order and dtype. Each
        callable's ``function`` attribute is the ``tf.function`` it calls (the forward's
        returns only the residuals that are neither stage inputs nor outputs; the callable
        adds those back without a copy).
        """
        key = (bool(jit_compile), None if variables is None else tuple(map(id, variables)))
        cache = self.__dict__.setdefault("_callers", {})
        if key not in cache and jit_compile and self._static_shapes_needed:
            forward, backward = self.compiled(jit_compile, variables)  # traced per shape
            n = len(self.residual_specs)

            def per_shape_backward(*flat):
                return backward(list(flat[:n]), list(flat[n:]))

            def per_shape_forward(*inputs):
                return forward(*inputs)

            per_shape_forward.function, per_shape_backward.function = forward, backward
            cache[key] = (per_shape_forward, per_shape_backward)
        if key not in cache:
            _, backward = self.compiled(jit_compile, variables)  # raises what compiled raises

            def lean(*inputs):
                outputs, residuals = self._forward_body(*inputs, variables=variables)
                return outputs, [residuals[i] for i, (kind, _) in
                                 enumerate(self._residual_sources) if kind == "made"]

            lean_function = tf.function(lean, input_signature=self.input_specs,
                                        jit_compile=jit_compile, autograph=False)
            made = flat_caller(lean_function)
            sources = self._residual_sources

            def forward(*inputs):
                # A residual that is a stage input or output is the very tensor the caller
                # holds: a program cannot return its own parameter without copying it.
                outputs, produced = made(*inputs)
                produced = iter(produced)
                residuals = [inputs[j] if kind == "input" else outputs[j] if kind == "output"
                             else next(produced) for kind, j in sources]
                return outputs, residuals

            flat_backward = flat_caller(backward)
            forward.function, flat_backward.function = lean_function, backward
            cache[key] = (forward, flat_backward)
        return cache[key]

    @functools.cached_property
    def _residual_sources(self) -> list[tuple[str, int | None]]:
        """Per residual: ``("input", j)``, ``("output", j)`` or ``("made", None)``."""
        vjp = self._vjp
        sources = []
        for i, name in enumerate(vjp.residual_names):
            if i in vjp.list_residuals or any(
                    as_list.counter == i for as_list in vjp.list_residuals.values()):
                sources.append(("made", None))
            elif name in vjp.input_keys:
                sources.append(("input", vjp.input_keys.index(name)))
            elif name in vjp.output_names:
                sources.append(("output", vjp.output_names.index(name)))
            else:
                sources.append(("made", None))
        return sources

    def _static_vjp(self, shapes: list[tuple]) -> StageVJP:
        """The stage traced with its gradient for inputs of these static ``shapes``."""
        key = tuple(shapes)
        if not all(d is not None for shape in shapes for d in shape):
            raise GradSplitError(
                f"stage {self.index} holds a tf.cond whose gradient reads branch "
                "intermediates; XLA can compile it on its own only with static shapes, and "
                f"it is traced with input shapes {[list(s) for s in shapes]}. Call it with "
                "tensors (not inside a function with a None batch), give split() an "
                "input_signature with a fixed batch size, or use compiled(jit_compile=False)."
            )
        if key not in self._static_vjps:
            specs = [tf.TensorSpec(shape, spec.dtype) for shape, spec in
                     zip(shapes, self.input_specs)]
            vjp = self._rebuild(specs)
            same = [(r, s.dtype) for r, s in zip(vjp.residual_names, vjp.residual_specs)] == [
                (r, s.dtype) for r, s in zip(self._vjp.residual_names, self._vjp.residual_specs)]
            if not same:
                raise GradSplitError(  # pragma: no cover - a trace that keeps other values
                    f"stage {self.index}: traced with input shapes {list(shapes)}, its "
                    "backward reads other values than with the input_signature's shapes. "
                    "Give split() an input_signature with a fixed batch size."
                )
            self._static_vjps[key] = vjp
        return self._static_vjps[key]

    def _static_vjp_of(self, residuals: Sequence[tf.Tensor]) -> StageVJP:
        """The per-shape trace whose forward made residuals of these shapes."""
        for vjp in self._static_vjps.values():
            if all(spec.shape.is_compatible_with(r.shape)
                   for spec, r in zip(vjp.residual_specs, residuals)):
                return vjp
        raise GradSplitError(
            f"stage {self.index} compiles its backward per input shape, from the trace of "
            "its forward; no forward has run with inputs that make residuals of shapes "
            f"{[tuple(r.shape) for r in residuals]}. Run its forward first."
        )

    @functools.cached_property
    def _static_shapes_needed(self) -> bool:
        return self._needs_static_shapes()

    def _needs_static_shapes(self) -> bool:
        if all(s.shape.is_fully_defined() for s in self.input_specs):
            return False
        return any(nd.op == "FakeParam" for f in self._vjp.forward_graph_def.library.function
                   for nd in f.node_def)
