"""The one compose loop: stage forwards in order, their VJPs in reverse, cotangents summed.

Every way this package runs a split is this procedure with a different way to call a stage:

- the traced composed VJP (``Split.value_and_gradients`` / ``Split.vjp``) emits each stage's
  forward and backward into one traced function;
- ``Split.run_stages`` calls each stage's own compiled programs;
- ``export.run_exported`` calls stages loaded from SavedModels;
- a pipeline runs the same forward and backward per micro-batch on several devices, out of
  order; it keeps its tensors in its own tables but sums with ``Cotangents`` and
  ``GradientTotals`` below, so its sums are taken in the same order.

The procedure: put the arguments in a dictionary under their graph names; run each stage's
forward on its ``inputs`` and store its ``outputs``; from a cotangent per program output, run
each stage's backward in reverse with the cotangents of its outputs (zeros for an output
nobody sent one to), add each input cotangent into the entry of that name (a tensor several
stages read gets the sum) and each variable gradient into that variable's total. Sums are
taken in one fixed order, the caller's cotangent first, then later stages before earlier
ones, so that every runner gives bitwise the same result.

Uses only public TensorFlow (``tf.zeros_like``, ``+``): an exported split is driven with it
in a process that has nothing else of this package.

Example
-------
>>> import tensorflow as tf
>>> class Stage:  # y = 2x, then z = y + x; the loop needs only these three names
...     def __init__(self, inputs, outputs):
...         self.inputs, self.outputs, self.variable_indices = inputs, outputs, []
>>> stages = [Stage(["x"], ["y"]), Stage(["y", "x"], ["z"])]
>>> def forward(stage, inputs):
...     return ([2.0 * inputs[0]] if stage.index == 0 else [inputs[0] + inputs[1]]), []
>>> def backward(stage, residuals, cotangents):
...     c = cotangents[0]
...     return ([2.0 * c] if stage.index == 0 else [c, c]), []
>>> for k, s in enumerate(stages):
...     s.index = k
>>> outputs, input_cotangents, grads = compose(
...     stages, ["x"], [tf.constant(3.0)], ["z"], [tf.constant(1.0)],
...     forward=forward, backward=backward, variable_zeros=[])
>>> float(outputs[0]), float(input_cotangents[0])   # z = 3x, dz/dx = 3
(9.0, 3.0)
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any, Protocol

__all__ = ["Cotangents", "GradientTotals", "StageLike", "compose", "sum_in_order"]


class StageLike(Protocol):
    """What the loop reads of a stage: graph tensor names in, out, and its variables'
    positions in the split's variable list."""

    inputs: Sequence[str]
    outputs: Sequence[str]
    variable_indices: Sequence[int]


def sum_in_order(values: Sequence[Any]) -> Any:
    """``values[0] + values[1] + ...``, left to right: the one order every runner uses."""
    total = values[0]
    for value in values[1:]:
        total = total + value
    return total


class Cotangents:
    """Cotangents of graph tensors, by name, summed in the order they were added.

    Add the caller's output cotangents first, then each stage's input cotangents from the
    last stage back: that is the order of the sum for a tensor several stages read.
    """

    def __init__(self) -> None:
        self._parts: dict[Hashable, list[Any]] = {}

    def add(self, name: Hashable, cotangent: Any) -> None:
        if cotangent is not None:
            self._parts.setdefault(name, []).append(cotangent)

    def __contains__(self, name: Hashable) -> bool:
        return name in self._parts

    def pop(self, name: Hashable) -> Any:
        """The summed cotangent of ``name``, forgotten afterwards; ``None`` if none came."""
        parts = self._parts.pop(name, None)
        return None if parts is None else sum_in_order(parts)

    def get(self, name: Hashable) -> Any:
        parts = self._parts.get(name)
        if parts is None:
            return None
        return parts[0] if len(parts) == 1 else sum_in_order(parts)


class GradientTotals:
    """Per-variable gradient totals over stages (and micro-batches): the sum, in the order
    added, and zeros for a variable no stage sent a gradient for."""

    def __init__(self, variable_zeros: Sequence[Callable[[], Any]]) -> None:
        self._zeros = list(variable_zeros)
        self._totals: dict[int, Any] = {}

    def add(self, indices: Sequence[int], grads: Sequence[Any]) -> None:
        for index, grad in zip(indices, grads):
            if grad is None:
                continue
            self._totals[index] = (self._totals[index] + grad if index in self._totals
                                   else grad)

    def result(self) -> list[Any]:
        return [self._totals[i] if i in self._totals else zeros()
                for i, zeros in enumerate(self._zeros)]


def compose(stages: Sequence[StageLike], arg_names: Sequence[str], args: Sequence[Any],
            output_names: Sequence[str],
            output_cotangents: Sequence[Any] | Callable[[list], Sequence[Any]] | None, *,
            forward: Callable[[Any, list], tuple[Sequence[Any], Any]],
            backward: Callable[[Any, Any, list], tuple[Sequence[Any], Sequence[Any]]],
            variable_zeros: Sequence[Callable[[], Any]],
            differentiable: Callable[[Any], bool] | None = None,
            on_cotangents: Callable[[Cotangents, dict], None] | None = None):
    """Run ``stages`` forward, then their VJPs in reverse: ``(outputs, input_cotangents,
    grads)``.

    Parameters
    ----------
    stages : sequence of StageLike
        In execution order.
    arg_names, args
        The program's arguments, by graph name.
    output_names : sequence of str
        The program's outputs, by graph name.
    output_cotangents : sequence, callable or None
        One per output (``None``: that output's cotangent is zero), or a function of the
        outputs giving them. ``None`` altogether means ``[ones_like(outputs[0])]``: the
        gradient of a scalar program.
    forward : callable
        ``forward(stage, inputs) -> (outputs, residuals)``.
    backward : callable
        ``backward(stage, residuals, output_cotangents) -> (input_cotangents,
        variable_grads)``; an input cotangent may be ``None`` (not differentiable).
    variable_zeros : sequence of callables
        Per variable of the program, a function giving its zero gradient.
    differentiable : callable, optional
        ``differentiable(arg) -> bool``: which arguments get a zero cotangent when nothing
        flows back to them (the others get ``None``). Default: floating-point dtypes.

    Returns
    -------
    outputs : list
        The program's outputs, aligned with ``output_names``.
    input_cotangents : list
        Aligned with ``arg_names``.
    grads : list
        Aligned with ``variable_zeros``.
    """
    import tensorflow as tf

    if differentiable is None:
        def differentiable(t):
            return t.dtype.is_floating or t.dtype.is_complex
    env = dict(zip(arg_names, args))
    residuals = []
    for stage in stages:
        outs, res = forward(stage, [env[n] for n in stage.inputs])
        env.update(zip(stage.outputs, outs))
        residuals.append(res)
    outputs = [env[n] for n in output_names]
    if output_cotangents is None:
        output_cotangents = [tf.ones_like(outputs[0])]
    elif callable(output_cotangents):
        output_cotangents = output_cotangents(outputs)
    cotangents = Cotangents()
    for name, cotangent in zip(output_names, output_cotangents):
        cotangents.add(name, cotangent)
    totals = GradientTotals(variable_zeros)
    for stage, res in reversed(list(zip(stages, residuals))):
        received = [cotangents.get(n) for n in stage.outputs]
        outs = [c if c is not None else tf.zeros_like(env[n])
                for n, c in zip(stage.outputs, received)]
        input_cotangents, variable_grads = backward(stage, res, outs)
        for name, cotangent in zip(stage.inputs, input_cotangents):
            cotangents.add(name, cotangent)
        totals.add(stage.variable_indices, variable_grads)
    if on_cotangents is not None:
        on_cotangents(cotangents, env)
    input_cotangents = []
    for name, arg in zip(arg_names, args):
        total = cotangents.get(name)
        if total is None and differentiable(arg):
            total = tf.zeros_like(arg)
        input_cotangents.append(total)
    return outputs, input_cotangents, totals.result()
