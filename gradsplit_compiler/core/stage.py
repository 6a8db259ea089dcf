"""``Stage``: one piece of a split program, with its forward and its vector-Jacobian product."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import tensorflow as tf

from gradsplit_compiler._tf_internal import flat_caller
from gradsplit_compiler.core.rebuild import StageVJP, capture_map, emit
from gradsplit_compiler.errors import GradSplitError
from gradsplit_compiler.ir.program import Program, StagePlan
from gradsplit_compiler.util import forwarding

__all__ = ["Stage", "StagePrograms"]


class StagePrograms(NamedTuple):
    """What a pipeline device runs for one stage (``Stage.programs``), on flat tensors:

    - ``forward(*inputs) -> (outputs, residuals)``;
    - ``backward(residuals, cotangents) -> (input_cotangents, variable_grads)``;
    - ``backward_input(residuals, cotangents) -> (input_cotangents, weight_inputs)`` (B);
    - ``backward_weight(weight_inputs) -> variable_grads`` (W); both ``None`` for a stage
      XLA compiles per input shape (a ``tf.cond`` whose gradient reads branch values).

    With ``remat`` the residuals are the stage inputs, and both backwards run the forward
    again first. Each callable's ``function`` attribute is the ``tf.function`` it runs (for
    the non-remat ``backward`` of a stage compiled per shape, the one of ``compiled``).
    """

    forward: Any
    backward: Any
    backward_input: Any
    backward_weight: Any


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
    backward_input : tf.function
        B, the first half of ``backward`` for zero-bubble schedules:
        ``backward_input(residuals, output_cotangents) -> (input_cotangents, carried)``,
        where ``carried`` (``carried_specs``) are the values B computes that W needs.
    backward_weight : tf.function
        W, the other half: ``backward_weight(weight_inputs) -> variable_grads``, where
        ``weight_inputs`` (``weight_input_specs``; build them with ``weight_inputs_of``) are
        the residuals and cotangents W reads and the carried values. B then W gives
        ``backward``'s results exactly; no op that reads a cotangent runs in both.
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

        split = vjp.split_backward
        self.carried_specs = list(split.carried_specs) if split else []
        self.weight_inputs = list(split.weight_inputs) if split else []
        self.backward_input = tf.function(
            self._backward_input_body,
            input_signature=[list(vjp.residual_specs), list(output_specs)], autograph=False)
        self.backward_weight = tf.function(
            self._backward_weight_body, input_signature=[self.weight_input_specs],
            autograph=False)

    @property
    def pieces(self) -> StageVJP:
        """The traced pieces behind the stage's programs (``core.rebuild.StageVJP``): the
        forward and fused backward GraphDefs, and ``split_backward``, B's and W's."""
        return self._vjp

    @property
    def weight_input_specs(self) -> list[tf.TensorSpec]:
        """The spec of each of W's inputs (``weight_inputs``): what a stage keeps from its
        B until its W, per micro-batch."""
        specs = []
        for kind, j in self.weight_inputs:
            specs.append(self.residual_specs[j] if kind == "residual" else
                         self.output_specs[j] if kind == "cotangent" else
                         self.carried_specs[j])
        return specs

    def weight_inputs_of(self, residuals: Sequence, cotangents: Sequence,
                         carried: Sequence) -> list:
        """W's inputs, picked from the residuals and cotangents given to B and what B
        returned (``carried``)."""
        picked = {"residual": residuals, "cotangent": cotangents, "carried": carried}
        return [picked[kind][j] for kind, j in self.weight_inputs]

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

    def _backward_input_body(self, residuals, cotangents, variables=None):
        return self.emit_backward_input(residuals, cotangents,
                                        f"stage{self.index}.backward_input", variables)

    def _backward_weight_body(self, weight_inputs, variables=None):
        return self.emit_backward_weight(weight_inputs, f"stage{self.index}.backward_weight",
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
        residuals, input_map = self._backward_input_map(vjp, residuals, cotangents, variables)
        wanted = [s for s in vjp.input_gradients + vjp.variable_gradients if isinstance(s, str)]
        wanted = list(dict.fromkeys(wanted))
        got = dict(zip(wanted, emit(vjp.backward_graph_def, input_map, wanted, name)))
        resolve = _resolver(got, cotangents, residuals)
        input_cotangents = [resolve(s) for s in vjp.input_gradients]
        variable_grads = []
        for source, var in zip(vjp.variable_gradients, self.variables):
            grad = resolve(source)
            variable_grads.append(tf.zeros(var.shape, var.dtype) if grad is None else grad)
        return input_cotangents, variable_grads

    def _backward_input_map(self, vjp: StageVJP, residuals: Sequence, cotangents: Sequence,
                            variables: Sequence | None) -> tuple[list, dict]:
        """The residuals (list residuals unpacked) and the input map of a backward piece:
        residuals, cotangents and captures by their names in the traced gradient graph."""
        residuals = list(residuals)
        for i, as_list in vjp.list_residuals.items():
            residuals[i] = as_list.from_tensor(residuals[i])
        input_map = dict(zip(vjp.residual_names, residuals))
        for j, key in vjp.cotangent_keys.items():
            input_map[key] = cotangents[j]
        input_map.update(capture_map(vjp, self._program, self._overrides(variables)))
        return residuals, input_map

    def emit_backward_input(self, residuals: Sequence[tf.Tensor], cotangents: Sequence,
                            name: str, variables: Sequence | None = None,
                            vjp: StageVJP | None = None):
        """Emit B: ``(input_cotangents, carried)``."""
        vjp = vjp or self._vjp
        split = vjp.split_backward
        residuals, input_map = self._backward_input_map(vjp, residuals, cotangents, variables)
        wanted = [s for s in vjp.input_gradients if isinstance(s, str)]
        wanted = list(dict.fromkeys(wanted + split.carried_names))
        got = dict(zip(wanted, emit(split.input_graph_def, input_map, wanted, name)))
        resolve = _resolver(got, cotangents, residuals)
        return ([resolve(s) for s in vjp.input_gradients],
                [got[n] for n in split.carried_names])

    def emit_backward_weight(self, weight_inputs: Sequence[tf.Tensor], name: str,
                             variables: Sequence | None = None, vjp: StageVJP | None = None):
        """Emit W: ``variable_grads`` from ``weight_inputs`` (see ``weight_inputs_of``)."""
        vjp = vjp or self._vjp
        split = vjp.split_backward
        given = {}
        for (kind, j), key, value in zip(split.weight_inputs, split.weight_keys,
                                         weight_inputs):
            if kind == "residual" and j in vjp.list_residuals:
                value = vjp.list_residuals[j].from_tensor(value)
            given[key] = value
        input_map = dict(given)
        input_map.update(capture_map(vjp, self._program, self._overrides(variables)))
        wanted = [s for s in vjp.variable_gradients if isinstance(s, str) and s not in given]
        wanted = list(dict.fromkeys(wanted))
        got = dict(zip(wanted, emit(split.weight_graph_def, input_map, wanted, name)))
        by_source = dict(zip(split.weight_inputs, weight_inputs))
        grads = []
        for source, var in zip(vjp.variable_gradients, self.variables):
            if source is None:
                grad = None
            elif isinstance(source, str):
                grad = given[source] if source in given else got[source]
            else:
                grad = by_source[tuple(source)]
            grads.append(tf.zeros(var.shape, var.dtype) if grad is None else grad)
        return grads

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

    def programs(self, jit_compile: bool = True, variables: Sequence | None = None,
                 remat: bool = False, nested: bool = False) -> StagePrograms:
        """The stage's programs for a pipeline device (see ``StagePrograms``), each its own
        XLA program with ``jit_compile``; ``variables`` as in ``compiled``.

        ``remat``: the forward keeps only the stage inputs as residuals, and ``backward``
        and ``backward_input`` run the forward again from them (inside the same program)
        before the backward; ``backward_input`` then also returns the residuals W reads.

        ``nested``: each XLA program is called from a plain ``tf.function`` around it, as a
        task of a cluster needs (TensorFlow cannot run an XLA function as the top-level call
        on another process's device); the forward and fused backward without ``remat`` are
        then the caller's to make (``run.devices`` keeps its own), and ``None`` here.
        """
        key = (bool(jit_compile), None if variables is None else tuple(map(id, variables)),
               bool(remat), bool(nested))
        cache = self.__dict__.setdefault("_programs", {})
        if key in cache:
            return cache[key]
        if jit_compile and self._static_shapes_needed:
            if not remat:  # no B and W: they would need the forward's trace per shape
                forward, flat_backward = self.callers(jit_compile, variables)
                cache[key] = StagePrograms(
                    forward, lambda res, cots: flat_backward(*res, *cots), None, None)
                return cache[key]
            raise GradSplitError(
                f"stage {self.index} holds a tf.cond whose gradient reads branch "
                "intermediates, which XLA compiles per input shape from the forward's trace; "
                "its backward cannot run the forward again (remat). Leave this stage out of "
                "remat=, or use jit_compile=False.")
        self.compiled(jit_compile, variables)  # raises what compiled raises
        name = f"stage{self.index}"
        res_specs, out_specs = list(self.residual_specs), list(self.output_specs)
        in_specs = list(self.input_specs)

        def xla(body, signature):
            """A flat caller of ``body`` as its own program, traced on its first call; its
            ``function`` attribute is the ``tf.function``."""
            function = tf.function(body, input_signature=signature, jit_compile=jit_compile,
                                   autograph=False)
            made = []
            if nested:
                outer = tf.function(forwarding(function), input_signature=signature,
                                    autograph=False)

                def call(*flat):
                    return outer(*tf.nest.pack_sequence_as(signature, list(flat)))
            else:
                def call(*flat):
                    if not made:
                        made.append(flat_caller(function))
                    return made[0](*flat)
            call.function = function
            return call

        def backward_weight_body(weight_inputs):
            return self.emit_backward_weight(weight_inputs, f"{name}.backward_weight",
                                             variables)

        flat_weight = xla(backward_weight_body, [self.weight_input_specs])

        def backward_weight(weight_inputs):
            return flat_weight(*weight_inputs)

        backward_weight.function = flat_weight.function

        if not remat:
            def backward_input_body(residuals, cotangents):
                return self.emit_backward_input(residuals, cotangents,
                                                f"{name}.backward_input", variables)

            flat_input = xla(backward_input_body, [res_specs, out_specs])
            if nested:
                forward = backward = None
            else:
                forward, flat_backward = self.callers(jit_compile, variables)

                def backward(residuals, cotangents):
                    return flat_backward(*residuals, *cotangents)

                backward.function = flat_backward.function

            def backward_input(residuals, cotangents):
                input_cotangents, carried = flat_input(*residuals, *cotangents)
                return input_cotangents, self.weight_inputs_of(residuals, cotangents, carried)

            backward_input.function = flat_input.function
        else:
            vjp = self._vjp

            def forward_body(*inputs):
                input_map = dict(zip(vjp.input_keys, inputs))
                input_map.update(capture_map(vjp, self._program, self._overrides(variables)))
                return emit(vjp.forward_graph_def, input_map, vjp.output_names,
                            f"{name}.forward")

            def again(inputs):
                return self.emit_forward(inputs, f"{name}.forward_again", variables)[1]

            def backward_body(inputs, cotangents):
                return self.emit_backward(again(inputs), cotangents, f"{name}.backward",
                                          variables)

            def backward_input_body(inputs, cotangents):
                residuals = again(inputs)
                input_cotangents, carried = self.emit_backward_input(
                    residuals, cotangents, f"{name}.backward_input", variables)
                # the cotangents W reads are the caller's already: not returned again
                picked = [value for (kind, _), value in zip(
                    self.weight_inputs, self.weight_inputs_of(residuals, cotangents, carried))
                    if kind != "cotangent"]
                return input_cotangents, picked

            flat_forward = xla(forward_body, in_specs)
            flat_backward = xla(backward_body, [in_specs, out_specs])
            flat_input = xla(backward_input_body, [in_specs, out_specs])

            def forward(*inputs):
                return flat_forward(*inputs), list(inputs)

            forward.function = flat_forward.function

            def backward(inputs, cotangents):
                return flat_backward(*inputs, *cotangents)

            backward.function = flat_backward.function

            def backward_input(inputs, cotangents):
                input_cotangents, picked = flat_input(*inputs, *cotangents)
                picked = iter(picked)
                return input_cotangents, [cotangents[j] if kind == "cotangent" else next(picked)
                                          for kind, j in self.weight_inputs]

            backward_input.function = flat_input.function

        cache[key] = StagePrograms(forward, backward, backward_input, backward_weight)
        return cache[key]

    @functools.cached_property
    def _residual_sources(self) -> list[tuple[str, int | None]]:
        """Per residual: ``("input", j)``, ``("output", j)`` or ``("made", None)``.

        A residual is an input or an output also when one is an ``Identity`` of the other
        (a cut's mark is an ``Identity`` of the value the backward reads): the same value,
        which a program would otherwise return twice, one of them copied."""
        vjp = self._vjp
        base = _identity_base(vjp.forward_graph_def)
        inputs = [base(n) for n in vjp.input_keys]
        outputs = [base(n) for n in vjp.output_names]
        sources = []
        for i, name in enumerate(vjp.residual_names):
            if i in vjp.list_residuals or any(
                    as_list.counter == i for as_list in vjp.list_residuals.values()):
                sources.append(("made", None))
            elif base(name) in inputs:
                sources.append(("input", inputs.index(base(name))))
            elif base(name) in outputs:
                sources.append(("output", outputs.index(base(name))))
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

    @property
    def compiles_per_shape(self) -> bool:
        """Whether XLA compiles this stage per input shape, from its forward's trace: it
        holds a ``tf.cond`` whose gradient reads branch intermediates and an input has a
        ``None`` dimension. Under XLA such a stage's backward can neither be split into B
        and W nor run the forward again (remat)."""
        return self._static_shapes_needed

    @functools.cached_property
    def _static_shapes_needed(self) -> bool:
        return self._needs_static_shapes()

    def _needs_static_shapes(self) -> bool:
        if all(s.shape.is_fully_defined() for s in self.input_specs):
            return False
        return any(nd.op == "FakeParam" for f in self._vjp.forward_graph_def.library.function
                   for nd in f.node_def)


def _identity_base(graph_def):
    """``base(tensor_name)``: the tensor that ``tensor_name`` is an ``Identity`` chain of in
    ``graph_def`` (itself if none), as ``"op:index"``."""
    identities = {nd.name: next(i for i in nd.input if not i.startswith("^"))
                  for nd in graph_def.node if nd.op == "Identity"}

    def base(name: str) -> str:
        op, _, index = name.partition(":")
        index = index or "0"
        while op in identities and index == "0":
            op, _, index = identities[op].partition(":")
            index = index or "0"
        return f"{op}:{index}"
    return base


def _resolver(got: dict, cotangents: Sequence, residuals: Sequence):
    """Where a backward output comes from: ``None``, an emitted tensor by name, or a
    cotangent or residual passed through (``("cotangent" | "residual", index)``)."""
    def resolve(source):
        if source is None:
            return None
        if isinstance(source, str):
            return got[source]
        kind, j = source
        return cotangents[j] if kind == "cotangent" else residuals[j]
    return resolve
