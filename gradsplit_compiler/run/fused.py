"""A training step as one program, when every stage runs on one device of this process.

A pipeline overlaps stages on different devices; with all of them on one device there is
nothing to overlap, and running each forward, each backward and the update as programs of
their own only costs: a call and a thread hand-off per action, every residual written out
between programs, and no fusion across them. So ``Pipeline.train_step`` then traces the whole
step into one function (one XLA program under ``jit_compile``): for each micro-batch, in
order, the stages' forwards and their backwards in reverse, emitted by the one compose loop
(``core.compose``), reading the stage-resident copies; the gradients summed over the
micro-batches; then the training state's check, clipping and optimizer update
(``TrainingState.update_in_program``), which runs only if every gradient is finite. The
caller gets each micro-batch's loss and outputs and one finiteness flag per trainable
variable, and does what the per-action update does afterwards (the loss scale, a skipped or
refused step) with ``TrainingState.after_one_program``.

The same procedure with the same seeds as the per-action engine: equal results up to
rounding (float64 within 1e-12 of ``split.value_and_gradients``, tested), the same skipped
steps and errors. What it does not give is a per-action timeline: the step's record holds
one event of kind ``ONE_PROGRAM`` spanning the whole step.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from gradsplit_compiler._tf_internal import flat_caller
from gradsplit_compiler.core.compose import GradientTotals, compose, sum_in_order
from gradsplit_compiler.core.split import Split
from gradsplit_compiler.core.xla import run_reporting_xla_errors
from gradsplit_compiler.run.devices import same_device
from gradsplit_compiler.run.engine import StepRecord, TimelineEvent, gather_outputs
from gradsplit_compiler.run.training import TrainingState

__all__ = ["ONE_PROGRAM", "OneProgramRun", "OneProgramStep"]

ONE_PROGRAM = "S"  # a timeline event's kind: the whole step, one program


class OneProgramStep:
    """The traced step of ``split`` over ``microbatches`` micro-batches on the one device of
    ``state`` (see the module docstring); ``run(per_microbatch, seed_scale)`` runs it."""

    def __init__(self, split: Split, state: TrainingState, microbatches: int,
                 loss_reduction: str, jit_compile: bool, home: str):
        (self.device_state,) = state.states
        self.device = self.device_state.device
        self.split, self.state, self.home = split, state, home
        self.microbatches, self.loss_reduction = microbatches, loss_reduction
        self.jit_compile = bool(jit_compile)
        self._call = None

    def call(self, flat: Sequence[tf.Tensor]):
        """The program on every micro-batch's arguments in order, then the scalars:
        ``(values, aux, finite_each)``; traced on the first call."""
        if self._call is None:
            self._build()
        return self._call(*flat)

    def _build(self):
        split, state, m = self.split, self.state, self.microbatches
        copies = [state.stage_variables(k) for k in range(len(split.stages))]
        zeros = [lambda v=v: tf.zeros(v.shape, v.dtype) for v in split.variables]
        trainable = self.device_state.trainable
        loss_dtype = split.output_specs[0].dtype
        n_outputs = len(split.output_names)
        update = state.update_in_program()
        mean = self.loss_reduction == "mean"

        def body(per_microbatch, scalars):
            # scalars (float64): the dynamic loss scale, the seed's whole scale
            seed = tf.cast(scalars[1] / m if mean else scalars[1], loss_dtype)
            totals = GradientTotals(zeros)
            values, aux = [], []
            for args in per_microbatch:
                outputs, _, grads = compose(
                    split.stages, split.arg_names, list(args), split.output_names,
                    [seed] + [None] * (n_outputs - 1),
                    forward=lambda st, inputs: st.emit_forward(
                        inputs, f"stage{st.index}.forward", copies[st.index]),
                    backward=lambda st, res, cots: st.emit_backward(
                        res, cots, f"stage{st.index}.backward", copies[st.index]),
                    variable_zeros=zeros)
                values.append(outputs[0])
                aux.append(list(outputs[1:]))
                totals.add(range(len(zeros)), grads)
            grads = totals.result()
            finite_each = update([grads[i] for i in trainable], scalars)
            return values, aux, finite_each

        signature = [[list(split.arg_specs)] * m, tf.TensorSpec([2], tf.float64)]
        function = tf.function(body, input_signature=signature, jit_compile=self.jit_compile,
                               autograph=False)
        with tf.device(self.device):
            self._call = flat_caller(function)
        self.function = function

    def run(self, per_microbatch: Sequence[Sequence[tf.Tensor]], seed_scale: float,
            dynamic_scale: float) -> OneProgramRun:
        return OneProgramRun(self, per_microbatch, seed_scale, dynamic_scale)


class OneProgramRun:
    """One step of an ``OneProgramStep``, shaped as the engine's ``StepRun`` for the
    pipeline: ``execute()``, then ``value()``, ``micro_values()``, ``aux_outputs()``,
    ``record()``, and ``finite_each`` (one flag per trainable variable of the device)."""

    def __init__(self, step: OneProgramStep, per_microbatch, seed_scale: float,
                 dynamic_scale: float):
        self.step = step
        self.args = per_microbatch
        self.scalars = tf.constant([dynamic_scale, seed_scale], tf.float64)
        self.moved = {"inputs": 0, "activations": 0, "cotangents": 0, "results": 0,
                      "replicas": 0, "gradients": 0, "scalars": 0}

    def execute(self) -> None:
        step = self.step
        for args in self.args:
            for tensor in args:
                self._count("inputs", tensor, step.device)
        flat = [t for args in self.args for t in args]
        start = time.perf_counter()
        with tf.device(step.device):
            values, aux, finite_each = run_reporting_xla_errors(step.call,
                                                                [*flat, self.scalars])
        self.finite_each = np.asarray(finite_each)
        self.seconds = time.perf_counter() - start
        self.values, self.aux = list(values), [list(a) for a in aux]
        self._count("scalars", self.scalars, None)
        self._count("scalars", finite_each, None)

    def _count(self, kind: str, tensor: Any, device: str | None) -> None:
        if device is not None and same_device(tensor.device, device):
            return
        self.moved[kind] += (tensor.shape.num_elements() or 0) * tensor.dtype.size

    def micro_values(self) -> list[tf.Tensor]:
        return list(self.values)

    def value(self) -> tf.Tensor:
        """As ``StepRun.value``: the micro-batch values summed in order (their mean for
        ``loss_reduction="mean"``)."""
        for v in self.values:
            self._count("results", v, self.step.home)
        total = sum_in_order(self.values)
        if self.step.loss_reduction == "mean":
            total = total / tf.cast(len(self.values), total.dtype)
        return total

    def aux_outputs(self) -> list[tf.Tensor]:
        """As ``StepRun.aux_outputs``: each output after the loss, concatenated over the
        micro-batches."""
        return gather_outputs([[a[j] for a in self.aux] for j in range(len(self.aux[0]))],
                              self.step.home, self._count)

    def record(self) -> StepRecord:
        """One event for the whole step; each stage held one micro-batch's residuals at a
        time in the program's own order (its memory is XLA's buffer assignment)."""
        event = TimelineEvent(0, self.step.device, ONE_PROGRAM, 0, 0, 0.0, self.seconds)
        stages = len(self.step.split.stages)
        return StepRecord((event,), (1,) * stages, dict(self.moved))
