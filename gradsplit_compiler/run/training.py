"""Training state that lives on the stages: what ``gsc.pipeline(..., optimizer=...)`` builds.

Every device that runs a stage holds its own copy of the variables its stages read, and an
optimizer over the trainable ones, built from the configuration of the Keras optimizer the
user gave (``type(optimizer).from_config(optimizer.get_config())``, so learning-rate schedules
and every hyper-parameter come along). Both are created there once, from the user's variables,
and the user's variables are not touched again until ``write_back``.

After the schedule of a ``train_step`` ran, every device computes, for the variables it holds:

- the gradient of each one, summed over the micro-batches and the stages that read it. A
  variable read by stages on several devices (tied embeddings) has a copy on each of them;
  each of those devices adds up the gradients of all its readers, in the same order (later
  stages first, as every compose loop here sums), so every copy takes the same update and
  the copies stay bitwise equal. These gradients are the only ones that travel;
- one scalar pair for the caller: the squared norm of the trainable gradients it owns (each
  variable is owned by the first device that holds it, so a tied one counts once) and whether
  all of them are finite.

The caller adds the squared norms up (the global norm of ``clip_global_norm``), and unless a
gradient is not finite, every device then applies its optimizer, scaled for clipping, on its
own copies (in parallel, one thread per device). Both phases are bounded by the pipeline's
``timeout``, as its schedule is: a task of a cluster that dies or stops answering during the
update makes ``train_step`` raise ``GradSplitError`` naming the task and its stages (the
copies and optimizer state it held are lost; restore the last checkpoint into a new
pipeline). A step with a non-finite gradient changes no variable: what the program assigned
during the step (batch-norm statistics) is put back, and the step raises ``GradSplitError``
naming the variable and its stages, or is skipped and counted (``on_nonfinite="skip"``).
Only trainable variables are given to the optimizer; the others (moving statistics) change
only through the program's own assignments.

Checkpoints hold the training state by the variables' own names (without ``:0``): the value of
each variable once (a tied one from its first device), each optimizer slot under the name of
its variable, and the iteration count. So a checkpoint restores into a pipeline of the same
program cut elsewhere or placed on other devices, and ``load_variables`` reads it into the
plain model. This process reads and writes every file of a checkpoint, also for copies held
on tasks of a cluster (their values travel here first), so a cluster needs no filesystem
shared with its workers.
"""

from __future__ import annotations

import math
import os
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tensorflow as tf

from gradsplit_compiler.core.compose import sum_in_order
from gradsplit_compiler.core.split import Split
from gradsplit_compiler.errors import GradSplitError
from gradsplit_compiler.run.devices import default_device, device_label, is_remote, keep_alive
from gradsplit_compiler.run.faults import (
    GRACE_AFTER_FAILURE,
    RESTART_AND_RESTORE,
    blame,
    task_failure,
    update_timeout_error,
    wait_for,
)
from gradsplit_compiler.util import forwarding

__all__ = ["NONFINITE_ACTIONS", "DeviceState", "LossScale", "TrainingState", "checkpoint_names",
           "load_variables", "plain_variable"]

NONFINITE_ACTIONS = ("raise", "skip", "apply")
_VARIABLES, _SLOTS, _ITERATIONS = "variables", "slots", "iterations"
_LOSS_SCALE = "loss_scale"


def checkpoint_names(variables: Sequence[Any]) -> list[str]:
    """The name each variable has in a checkpoint: a Keras variable's ``path``, a
    ``tf.Variable``'s name without ``:0``; a name met again gets ``_1``, ``_2``, ... in order.

    >>> import tensorflow as tf
    >>> checkpoint_names([tf.Variable(1.0, name="dense/kernel"), tf.Variable(2.0, name="b"),
    ...                   tf.Variable(3.0, name="b")])
    ['dense/kernel', 'b', 'b_1']
    """
    names, seen = [], {}
    for v in variables:
        name = getattr(v, "path", None) if not isinstance(v, tf.Variable) else None
        if name is None:
            name = v.name[:-2] if v.name.endswith(":0") else v.name
        count = seen.get(name, 0)
        seen[name] = count + 1
        names.append(name if not count else f"{name}_{count}")
    return names


def load_variables(path: str | os.PathLike, variables: Sequence[Any]) -> None:
    """Read the values of ``variables`` from a checkpoint written by ``Pipeline.save``.

    ``variables`` are the plain model's own: ``split.variables``, or a Keras model's
    ``model.variables`` (matched by ``path``). Every one of them must be in the checkpoint
    (``GradSplitError`` naming those that are not, and nothing changes); the checkpoint may
    hold more (optimizer slots, other variables).
    """
    names = checkpoint_names(variables)
    saved = _saved_names(path)
    missing = [n for n in names if n not in saved[_VARIABLES]]
    if missing:
        raise GradSplitError(
            f"the checkpoint {os.fspath(path)!r} has no value for {_listed(missing)}; it "
            f"holds {_listed(sorted(saved[_VARIABLES]))}. Load it into the variables of the "
            "program it was saved from."
        )
    plain = [plain_variable(v) for v in variables]
    tf.train.Checkpoint(**{_VARIABLES: dict(zip(names, plain))}).read(
        os.fspath(path)).expect_partial()


@dataclass
class DeviceState:
    """What one device holds: ``copies`` of the variables its stages read (by index in
    ``split.variables``), the ``optimizer`` over the trainable ones (``None`` if it holds
    none), and that optimizer's ``slots`` as ``(variable index, slot name, variable)``."""

    device: str
    stages: tuple[int, ...]
    copies: dict[int, tf.Variable]
    trainable: tuple[int, ...]
    owned: tuple[int, ...]
    optimizer: Any = None
    slots: list[tuple[int, str, Any]] = field(default_factory=list)
    functions: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return device_label(self.device)


class TrainingState:
    """The stage-resident copies and optimizers of one pipeline.

    Built by ``Pipeline`` when given an optimizer; see the module docstring. ``devices`` has
    one resolved device name per stage.
    """

    def __init__(self, split: Split, devices: Sequence[str], optimizer: Any, *,
                 clip_global_norm: float | None, on_nonfinite: str, jit_compile: bool,
                 timeout: float | None = None):
        self.split = split
        self.jit_compile = bool(jit_compile)
        self.timeout = timeout
        self.on_nonfinite = _check_on_nonfinite(on_nonfinite)
        self.loss_scale = LossScale.of(optimizer)
        if self.loss_scale is not None:
            optimizer = optimizer.inner_optimizer
        config = _optimizer_config(optimizer)
        # A static scale of the optimizer's own (loss_scale_factor): the backward is seeded
        # with it, and each device's optimizer divides its gradients by it, as in Keras.
        self.loss_scale_factor = config.get("loss_scale_factor")
        self.clip_global_norm = _check_clip(clip_global_norm, config)
        config["global_clipnorm"] = None  # clipped here, over every device's gradients
        self.optimizer_class = type(optimizer)
        self.names = checkpoint_names(split.variables)
        self.readers: dict[int, list[int]] = {}
        for stage in split.stages:
            for idx in stage.variable_indices:
                self.readers.setdefault(idx, []).append(stage.index)
        _check_written(split, devices, self.readers)
        order = list(dict.fromkeys(devices))
        owner: dict[int, str] = {}
        for stage in split.stages:
            for idx in stage.variable_indices:
                owner.setdefault(idx, devices[stage.index])
        self.states: list[DeviceState] = []
        for device in order:
            stages = tuple(k for k, d in enumerate(devices) if d == device)
            indices = sorted({i for k in stages for i in split.stages[k].variable_indices})
            trainable = tuple(i for i in indices if split.variables[i].trainable)
            self.states.append(DeviceState(
                device=device, stages=stages, copies={}, trainable=trainable,
                owned=tuple(i for i in trainable if owner[i] == device)))
        self.device_of_stage = list(devices)
        self.owner = owner
        for state in self.states:
            self._create(state, config)
        self.skipped_steps = 0
        self._learning_rate: float | None = None
        self._written: list[tuple[tf.Variable, str]] | None = None
        # Checkpoint files are read and written by this process (see the module docstring).
        self._io = tf.train.CheckpointOptions(experimental_io_device=default_device())

    # -- building --------------------------------------------------------------------------

    def _create(self, state: DeviceState, config: dict) -> None:
        with tf.init_scope(), tf.device(state.device):
            for idx in sorted({i for k in state.stages
                               for i in self.split.stages[k].variable_indices}):
                v = self.split.variables[idx]
                state.copies[idx] = tf.Variable(v.read_value(), trainable=v.trainable,
                                                name=self.names[idx])
            if state.trainable:
                state.optimizer = self.optimizer_class.from_config(dict(config))
                index_of = {id(state.copies[i]): i for i in state.trainable}
                make_slot = state.optimizer.add_variable_from_reference

                def recording(reference, name=None, initializer="zeros", state=state,
                              make_slot=make_slot, index_of=index_of):
                    slot = make_slot(reference, name=name, initializer=initializer)
                    state.slots.append((index_of[id(reference)], name or "var", slot))
                    return slot

                # Keras makes every per-variable slot through this public method: wrapping
                # it records which variable each slot belongs to, for checkpoints by name.
                state.optimizer.add_variable_from_reference = recording
                state.optimizer.build([state.copies[i] for i in state.trainable])
        if is_remote(state.device):
            keep_alive(list(state.copies.values()), state.optimizer)

    def stage_variables(self, stage_index: int) -> list[tf.Variable]:
        """The copies stage ``stage_index`` reads, aligned with its ``variables``."""
        state = self._state_of(stage_index)
        return [state.copies[i] for i in self.split.stages[stage_index].variable_indices]

    def copy_on(self, device: str, variable: Any, stage_index: int) -> tf.Variable:
        """The copy of ``variable`` (one of ``split.variables``, found by identity) held on
        ``device``, for stage ``stage_index`` of another program of the same model."""
        index = next((i for i, v in enumerate(self.split.variables)
                      if plain_variable(v) is plain_variable(variable)), None)
        state = next((s for s in self.states if s.device == device), None)
        if index is None or state is None or index not in state.copies:
            held = sorted(s.label for s in self.states if index in s.copies)
            where = ("no stage of the training pipeline reads it" if index is None else
                     f"the training pipeline holds it on {', '.join(held)}")
            raise GradSplitError(
                f"stage {stage_index} (on {device_label(device)}) reads variable "
                f"{getattr(variable, 'name', variable)!r}, but {where}. Cut this program "
                "where the training program is cut and place its stages on the same "
                "devices, so that each stage finds its variables there.")
        return state.copies[index]

    def _state_of(self, stage_index: int) -> DeviceState:
        device = self.device_of_stage[stage_index]
        return next(s for s in self.states if s.device == device)

    def written_copies(self) -> list[tuple[tf.Variable, str]]:
        """The copies the program assigns, with their devices (found once: the program
        does not change)."""
        if self._written is None:
            written = set(self.split.program.written_variables())
            self._written = [(copy, s.device) for s in self.states
                             for i, copy in s.copies.items() if i in written]
        return list(self._written)

    # -- one update ------------------------------------------------------------------------

    def update(self, stage_grads: Sequence[Sequence[tf.Tensor]], count,
               runners: Sequence[Any] = ()) -> str | None:
        """Apply the optimizers to the gradients of a step (per stage, aligned with each
        stage's ``variable_indices``); ``count(kind, tensor, device)`` records traffic.
        ``runners`` (the pipeline's stage runners) name the stages of a task that fails.
        Returns ``"skipped"`` for a step skipped for a non-finite gradient."""
        position = {k: {idx: j for j, idx in enumerate(self.split.stages[k].variable_indices)}
                    for k in range(len(self.split.stages))}

        def gather(state: DeviceState) -> dict[int, tf.Tensor]:
            totals = {}
            with tf.device(state.device):
                for idx in state.trainable:
                    parts = []
                    for k in reversed(self.readers[idx]):  # later stages first
                        grad = stage_grads[k][position[k][idx]]
                        count("gradients", grad, state.device)
                        parts.append(grad)
                    totals[idx] = sum_in_order(parts)
            return totals

        def report(state: DeviceState, totals) -> tuple[float, bool]:
            if not state.owned:
                return 0.0, True
            fn = state.functions.get("report")
            if fn is None:
                fn = state.functions["report"] = self._function(state, _norm_and_finite)
            with tf.device(state.device):
                norm_sq, finite = fn([totals[i] for i in state.owned])
            count("scalars", norm_sq, None)
            count("scalars", finite, None)
            return float(norm_sq), bool(finite)

        def gather_and_report(state):
            totals = gather(state)
            return totals, report(state, totals)

        dynamic = self.loss_scale.value if self.loss_scale is not None else 1.0
        if len(self.states) == 1 and self.states[0].optimizer is not None:
            # One device holds every variable: the check, the clipping and the update in one
            # program, with no round trip to this process in between.
            def gather_and_apply(state):
                totals = gather(state)
                fn = state.functions.get("fused")
                if fn is None:
                    fn = state.functions["fused"] = self._function(
                        state, self._fused_body(state))
                scalars = tf.constant([dynamic, self.seed_scale], tf.float64)
                count("scalars", scalars, None)
                with tf.device(state.device):
                    finite, _ = fn([totals[i] for i in state.trainable], scalars)
                count("scalars", finite, None)
                return totals, (0.0, bool(finite))

            results = self._on_devices(gather_and_apply, self.states,
                                       "applying the optimizer", runners)
            if results[0][1][1] or not self.checks_finite:
                if self.loss_scale is not None:
                    self.loss_scale.after_step(finite=True)
                return None
        else:
            results = self._on_devices(gather_and_report, self.states,
                                       "summing the gradients", runners)
        norms = [norm for _, (norm, _) in results]
        if not self.checks_finite:
            pass  # on_nonfinite="apply": the update runs whatever the gradients
        elif not all(finite for _, (_, finite) in results):
            if self.loss_scale is not None:  # as Keras: skip the step, halve the scale
                self.loss_scale.after_step(finite=False)
                self.skipped_steps += 1
                return "skipped"
            totals = {}
            for state, (grads, _) in zip(self.states, results):
                totals.update({i: grads[i] for i in state.owned})
            return self._nonfinite(totals)
        scale = 1.0
        if self.clip_global_norm is not None:  # over the unscaled gradients, as Keras
            global_norm = math.sqrt(math.fsum(norms)) / self.seed_scale
            scale = self.clip_global_norm / max(global_norm, self.clip_global_norm)

        def apply(state):
            totals, _ = results[self.states.index(state)]
            if state.optimizer is None:
                return
            fn = state.functions.get("apply")
            if fn is None:
                fn = state.functions["apply"] = self._function(state, self._apply_body(state))
            scalars = tf.constant([dynamic, scale], tf.float64)
            count("scalars", scalars, None)
            with tf.device(state.device):
                fn([totals[i] for i in state.trainable], scalars)
            if is_remote(state.device):
                wait_for([state.optimizer.iterations.value])

        self._on_devices(apply, self.states, "applying the optimizer", runners)
        if self.loss_scale is not None:
            self.loss_scale.after_step(finite=True)
        return None

    def _on_devices(self, work, states: Sequence[DeviceState], doing: str,
                    runners: Sequence[Any]) -> list:
        """``work(state)`` for each of ``states``, in a daemon thread each; their results in
        order. Waits at most ``timeout`` seconds (keeping a little of it to find a task that
        does not answer). A TensorFlow error on a task, or a device that has not finished
        in time, raises ``GradSplitError`` naming the task and its stages; a thread stuck in
        a call to a dead task stays behind and cannot hold up the interpreter's exit."""
        results: list = [None] * len(states)
        errors: dict[int, BaseException] = {}
        finished: queue.SimpleQueue[int] = queue.SimpleQueue()

        def run(i: int, state: DeviceState) -> None:
            try:
                results[i] = work(state)
            except BaseException as exc:  # reported below, in the caller's thread
                errors[i] = exc
            finally:
                finished.put(i)

        threads = [threading.Thread(target=run, args=(i, s), daemon=True,
                                    name=f"gradsplit-optimizer-{s.label}")
                   for i, s in enumerate(states)]
        for t in threads:
            t.start()
        probe_time = 0.0 if self.timeout is None else min(2.0, self.timeout / 4)
        deadline = None if self.timeout is None else (
            time.monotonic() + self.timeout - probe_time)
        # Wait for every device, but once one has failed only a little longer: when a task
        # dies, calls to the other tasks can hang rather than fail.
        done: set[int] = set()
        cut_short = False
        while len(done) < len(threads):
            if errors and not cut_short:
                grace = time.monotonic() + GRACE_AFTER_FAILURE
                deadline = grace if deadline is None else min(deadline, grace)
                cut_short = True
            try:
                done.add(finished.get(timeout=None if deadline is None
                                      else max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        pending = [s for i, s in enumerate(states) if i not in done]
        if pending and not errors:
            raise update_timeout_error(self.timeout, [(s.device, s.stages) for s in pending],
                                       probe_time)
        if errors:
            failures = []
            for i in sorted(errors):
                exc = errors[i]
                if isinstance(exc, tf.errors.OpError) and is_remote(states[i].device):
                    exc = task_failure(exc, states[i].device, doing, states[i].stages)
                failures.append(exc)
            raise blame(failures, runners, self.timeout, RESTART_AND_RESTORE)
        return results

    def _apply_body(self, state: DeviceState):
        variables = [state.copies[i] for i in state.trainable]
        optimizer, clip = state.optimizer, self.clip_global_norm is not None
        unscale = self.loss_scale is not None

        def body(grads, scalars):
            # scalars: the dynamic loss scale and the clipping factor. Unscaled first, then
            # clipped, as LossScaleOptimizer and the optimizer's own clipping do in Keras.
            if unscale:
                grads = [g / tf.cast(scalars[0], g.dtype) for g in grads]
            if clip:
                grads = [g * tf.cast(scalars[1], g.dtype) for g in grads]
            optimizer.apply(grads, variables)
        return body

    def _fused_body(self, state: DeviceState):
        """``report`` and ``_apply_body`` in one program, for a single device: the update
        runs only if every gradient is finite; the clipping factor is computed as the
        caller computes it from the reported norms (float64)."""
        apply = self._apply_body(state)
        clip = self.clip_global_norm

        check = self.checks_finite

        def body(grads, scalars):  # scalars: the dynamic loss scale, the seed's whole scale
            if not check:  # on_nonfinite="apply": no check, no condition around the update
                finite_each = tf.ones([len(grads)], tf.bool)
            else:
                finite_each = _finite_each(grads)
            finite = tf.reduce_all(finite_each)
            factor = tf.constant(1.0, tf.float64)
            if clip is not None:
                norm_sq = tf.add_n([tf.reduce_sum(tf.square(tf.cast(g, tf.float64)))
                                    for g in grads])
                global_norm = tf.sqrt(norm_sq) / scalars[1]
                factor = clip / tf.maximum(global_norm, clip)

            def update():
                apply(grads, tf.stack([scalars[0], factor]))
                return tf.constant(True)

            if check:
                tf.cond(finite, update, lambda: tf.constant(False))
            else:
                update()
            return finite, finite_each
        return body

    def update_in_program(self):
        """The check, the clipping and the update of the one device's optimizer as a function
        to call inside a program being traced (``fused.OneProgramStep``):
        ``update(grads, scalars) -> finite_each``, ``grads`` aligned with the device's
        trainable variables, ``scalars`` (float64) the dynamic loss scale and the seed's
        whole scale; it updates only if every gradient is finite."""
        body = self._fused_body(self.states[0])

        def update(grads, scalars):
            return body(grads, scalars)[1]
        return update

    def after_one_program(self, finite_each: Sequence[bool]) -> str | None:
        """What ``update`` does after its program, for a step that ran as one program with
        ``update_in_program``: move the loss scale, count a skipped step (``"skipped"``),
        or refuse a non-finite gradient naming its variable."""
        if all(finite_each):
            if self.loss_scale is not None:
                self.loss_scale.after_step(finite=True)
            return None
        if self.loss_scale is not None:
            self.loss_scale.after_step(finite=False)
            self.skipped_steps += 1
            return "skipped"
        return self._refuse_nonfinite([i for i, ok in zip(self.states[0].trainable,
                                                            finite_each) if not ok])

    def _function(self, state: DeviceState, body):
        function = tf.function(body, jit_compile=self.jit_compile)
        if is_remote(state.device):
            if self.jit_compile:
                # As for stages: a remote task runs an XLA function only from a plain one.
                inner = function
                function = tf.function(forwarding(inner))
                keep_alive(inner)
            keep_alive(function)  # see devices.keep_alive: never collected after a reconnect
        return function

    def _nonfinite(self, totals: dict[int, tf.Tensor]):
        return self._refuse_nonfinite([i for i in sorted(totals) if not bool(
            tf.reduce_all(tf.math.is_finite(totals[i])))])

    def _refuse_nonfinite(self, bad: list[int]):
        """``"skipped"`` (counted) or a ``GradSplitError`` naming the first of the variables
        ``bad`` whose gradient is not finite."""
        if self.on_nonfinite == "skip":
            self.skipped_steps += 1
            return "skipped"
        idx = bad[0]
        stages = ", ".join(str(k) for k in self.readers[idx])
        others = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise GradSplitError(
            f"the gradient of variable {self.names[idx]!r} (read by stage {stages}) is not "
            f"finite{others}; no variable was changed. Lower the learning rate, clip "
            "(clip_global_norm=), check the data, or pass on_nonfinite='skip' to skip such "
            "steps and count them."
        )

    @property
    def checks_finite(self) -> bool:
        """Whether a step checks its gradients before the update: always, except with
        ``on_nonfinite="apply"`` and no loss scaling (whose skipped steps need the check)."""
        return self.on_nonfinite != "apply" or self.loss_scale is not None

    # -- state in and out ------------------------------------------------------------------

    @property
    def iterations(self) -> int:
        """Optimizer steps taken (every device's optimizer has the same count)."""
        for state in self.states:
            if state.optimizer is not None:
                return int(state.optimizer.iterations.numpy())
        return 0

    def primary_copy(self, idx: int) -> tf.Variable:
        """The copy of variable ``idx`` on the first device holding it."""
        return next(s.copies[idx] for s in self.states if s.device == self.owner[idx])

    @property
    def seed_scale(self) -> float:
        """What the backward of the loss is seeded with: the dynamic loss scale of a
        ``LossScaleOptimizer`` or the optimizer's ``loss_scale_factor`` (1 without either),
        as Keras' ``train_step`` multiplies the loss by ``optimizer.scale_loss``."""
        scale = 1.0 if self.loss_scale is None else self.loss_scale.value
        if self.loss_scale_factor is not None:
            scale *= float(self.loss_scale_factor)
        return scale

    @property
    def learning_rate(self) -> float | None:
        """The learning rate last set with ``set_learning_rate`` (``None``: the
        optimizer's own, possibly a schedule)."""
        return self._learning_rate

    def set_learning_rate(self, value: float) -> None:
        """Give every device's optimizer the (constant) learning rate ``value``."""
        for state in self.states:
            if state.optimizer is not None:
                with tf.device(state.device):
                    state.optimizer.learning_rate = value
        self._learning_rate = value

    def slot_values(self) -> dict[tuple[int, str], Any]:
        """``{(variable index, slot name): slot}`` from each variable's first device."""
        return {(idx, name): slot for s in self.states for idx, name, slot in s.slots
                if self.owner[idx] == s.device}

    def assign_slots(self, values: dict[tuple[int, str], Any], iterations: int) -> None:
        """Set every device's slots from ``{(variable index, slot name): value}`` and every
        optimizer's iteration count."""
        for state in self.states:
            for idx, name, slot in state.slots:
                if (idx, name) in values:
                    slot.assign(values[(idx, name)])
            if state.optimizer is not None:
                state.optimizer.iterations.assign(iterations)

    def read_variables(self) -> None:
        """Copy ``split.variables`` (the user's) into every device's copies: the reverse
        of ``write_back``."""
        for state in self.states:
            for idx, copy in state.copies.items():
                copy.assign(self.split.variables[idx])

    def write_back(self) -> None:
        for idx, v in enumerate(self.split.variables):
            if idx in self.owner:
                v.assign(self.primary_copy(idx))

    def _checkpoint(self) -> tf.train.Checkpoint:
        variables = {self.names[i]: self.primary_copy(i) for i in sorted(self.owner)}
        slots: dict[str, dict[str, Any]] = {}
        for state in self.states:
            for idx, slot_name, slot in state.slots:
                if self.owner[idx] == state.device:
                    slots.setdefault(self.names[idx], {})[slot_name] = plain_variable(slot)
        iterations = next((plain_variable(s.optimizer.iterations) for s in self.states
                           if s.optimizer is not None), None)
        parts: dict[str, Any] = {_VARIABLES: variables, _SLOTS: slots}
        if iterations is not None:
            parts[_ITERATIONS] = iterations
        if self.loss_scale is not None:
            parts[_LOSS_SCALE] = self.loss_scale.variables()
        return tf.train.Checkpoint(**parts)

    def save(self, path: str | os.PathLike) -> str:
        return self._checkpoint().write(os.fspath(path), options=self._io)

    def restore(self, path: str | os.PathLike) -> None:
        saved = _saved_names(path)
        expected_vars = {self.names[i] for i in self.owner}
        expected_slots = {(self.names[idx], name) for s in self.states
                          for idx, name, _ in s.slots}
        missing = sorted(expected_vars - saved[_VARIABLES]) + sorted(
            f"{v} ({slot})" for v, slot in expected_slots - saved[_SLOTS])
        unexpected = sorted(saved[_VARIABLES] - expected_vars)
        if missing or unexpected:
            said = []
            if missing:
                said.append(f"it has no value for {_listed(missing)}")
            if unexpected:
                said.append(f"it holds variables this program does not read: "
                            f"{_listed(unexpected)}")
            raise GradSplitError(
                f"the checkpoint {os.fspath(path)!r} is not of this program's training "
                f"state: {'; '.join(said)}. Restore a checkpoint saved by a pipeline of the "
                "same program (any cuts and devices) and optimizer; nothing was changed."
            )
        self._checkpoint().read(os.fspath(path), options=self._io).expect_partial()
        # copies on other devices (tied variables) and other optimizers follow the first
        for state in self.states:
            for idx, copy in state.copies.items():
                if self.owner[idx] != state.device:
                    copy.assign(self.primary_copy(idx))
            by_name = {(i, n): slot for i, n, slot in state.slots}
            for other in self.states:
                if other is state:
                    continue
                for idx, name, slot in other.slots:
                    if self.owner[idx] == state.device and (idx, name) in by_name:
                        slot.assign(by_name[(idx, name)])
        first = next((s.optimizer for s in self.states if s.optimizer is not None), None)
        for state in self.states:
            if state.optimizer is not None and state.optimizer is not first:
                state.optimizer.iterations.assign(first.iterations)

    def memory(self) -> dict[str, dict[str, int]]:
        """Per device: bytes of the variables and of the optimizer's slots it holds."""
        report = {}
        for state in self.states:
            slot_bytes = sum(_nbytes(slot) for _, _, slot in state.slots)
            report[state.device] = {
                "variables": sum(_nbytes(c) for c in state.copies.values()),
                "slots": slot_bytes,
            }
        return report


class LossScale:
    """Keras' dynamic loss scaling (``keras.optimizers.LossScaleOptimizer``), kept by the
    caller for every stage: the backward is seeded with the scale; a step whose gradients
    are not all finite is skipped on every device and halves the scale; after
    ``growth_steps`` finite steps in a row the scale doubles. The scale and the step counter
    are variables of this process, saved in the pipeline's checkpoints."""

    def __init__(self, initial_scale: float, growth_steps: int):
        self.growth_steps = int(growth_steps)
        with tf.init_scope(), tf.device(default_device()):
            self.scale = tf.Variable(float(initial_scale), dtype=tf.float32,
                                     trainable=False, name="dynamic_scale")
            self.counter = tf.Variable(0, dtype=tf.int64, trainable=False,
                                       name="step_counter")

    @classmethod
    def of(cls, optimizer: Any) -> LossScale | None:
        """The loss scaling of ``optimizer`` (``None`` unless it is a
        ``LossScaleOptimizer``)."""
        import keras

        if not isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            return None
        return cls(optimizer.initial_scale, optimizer.dynamic_growth_steps)

    @property
    def value(self) -> float:
        return float(self.scale.numpy())

    def after_step(self, finite: bool) -> None:
        if not finite:
            self.counter.assign(0)
            self.scale.assign(self.scale * 0.5)
        elif int(self.counter.numpy()) == self.growth_steps - 1:
            self.counter.assign(0)
            self.scale.assign(self.scale * 2.0)
        else:
            self.counter.assign_add(1)

    def variables(self) -> dict[str, tf.Variable]:
        return {"dynamic_scale": self.scale, "step_counter": self.counter}


# -- checks ------------------------------------------------------------------------------------


def _optimizer_config(optimizer: Any) -> dict:
    import keras

    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise GradSplitError(
            f"optimizer must be a Keras optimizer (e.g. keras.optimizers.Adam(1e-3)); got "
            f"{type(optimizer).__name__}. Each device builds its own from its configuration."
        )
    if optimizer.built:
        raise GradSplitError(
            f"this {type(optimizer).__name__} is already bound to "
            f"{len(optimizer.variables)} variables (it has been built or has applied "
            "gradients); give the pipeline a fresh optimizer: each device builds one like it "
            "over its own copies. To continue a training run, restore the pipeline's "
            "checkpoint (pipeline.restore)."
        )
    config = dict(optimizer.get_config())
    try:
        type(optimizer).from_config(dict(config))
    except Exception as exc:  # a custom class or schedule Keras cannot rebuild
        raise GradSplitError(
            f"each device builds its own {type(optimizer).__name__} from the optimizer's "
            f"configuration, and Keras cannot rebuild it: {exc}. Register custom classes "
            "(learning-rate schedules included) with "
            "@keras.saving.register_keras_serializable()."
        ) from None
    return config


def _check_clip(clip: Any, config: dict) -> float | None:
    keras_clip = config.get("global_clipnorm")
    if clip is None:
        clip = keras_clip
    elif keras_clip is not None and float(keras_clip) != float(clip):
        raise GradSplitError(
            f"clip_global_norm={clip!r} but the optimizer has global_clipnorm={keras_clip!r}; "
            "give one of them."
        )
    if clip is None:
        return None
    if isinstance(clip, bool) or not isinstance(clip, (int, float, np.floating)) or not (
            math.isfinite(clip) and clip > 0):
        raise GradSplitError(
            f"clip_global_norm must be a positive finite number (the largest global norm "
            f"of the gradients over all stages) or None; got {clip!r}."
        )
    return float(clip)


def _check_on_nonfinite(action: Any) -> str:
    if action not in NONFINITE_ACTIONS:
        raise GradSplitError(
            f"on_nonfinite must be 'raise' (a step with a NaN or infinite gradient changes "
            f"nothing and raises), 'skip' (it changes nothing and is counted) or 'apply' (no "
            f"check: the update runs whatever the gradients, as plain Keras fit does); got "
            f"{action!r}."
        )
    return action


def _check_written(split: Split, devices: Sequence[str], readers: dict[int, list[int]]) -> None:
    for idx in split.program.written_variables():
        places = {devices[k] for k in readers.get(idx, [])}
        if len(places) > 1:
            v = split.variables[idx]
            raise GradSplitError(
                f"variable {v.name!r} is assigned by the program and read by stages "
                f"{readers[idx]} on different devices ({', '.join(sorted(places))}); each "
                "device would hold its own copy and the assignment would reach only one. "
                "Put those stages on one device, or cut so that one stage reads it."
            )


# -- helpers ------------------------------------------------------------------------------------


def _norm_and_finite(grads):
    norm_sq = tf.add_n([tf.reduce_sum(tf.square(tf.cast(g, tf.float64))) for g in grads])
    return norm_sq, tf.reduce_all(_finite_each(grads))


def _finite_each(grads):
    return tf.stack([tf.reduce_all(tf.math.is_finite(g)) for g in grads])


def plain_variable(variable: Any) -> tf.Variable:
    """The ``tf.Variable`` behind a Keras variable (itself for a ``tf.Variable``)."""
    return variable if isinstance(variable, tf.Variable) else variable.value


def _nbytes(variable: Any) -> int:
    return int(np.prod(variable.shape)) * tf.as_dtype(variable.dtype).size


def _listed(names: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _saved_names(path: str | os.PathLike) -> dict[str, set]:
    """The variable names and ``(variable, slot)`` pairs a ``Pipeline.save`` checkpoint
    holds, read from its object graph (the names as saved, not the escaped keys)."""
    from tensorflow.core.protobuf import trackable_object_graph_pb2

    prefix = os.fspath(path)
    try:
        if tf.io.gfile.exists(prefix + ".index"):
            # a checkpoint prefix: read it as it is (load_checkpoint would take a prefix for
            # a directory on filesystems where files have no parent, such as ram://)
            reader = tf.compat.v1.train.NewCheckpointReader(prefix)
        else:  # a directory: its latest checkpoint
            reader = tf.train.load_checkpoint(prefix)
        graph = trackable_object_graph_pb2.TrackableObjectGraph()
        graph.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
    except (tf.errors.OpError, ValueError) as exc:
        raise GradSplitError(
            f"cannot read a checkpoint at {os.fspath(path)!r}: "
            f"{getattr(exc, 'message', exc)}. Give the path Pipeline.save returned."
        ) from None

    def children(node_id: int) -> dict[str, int]:
        return {c.local_name: c.node_id for c in graph.nodes[node_id].children}

    root = children(0)
    names = {_VARIABLES: set(), _SLOTS: set()}
    if _VARIABLES in root:
        names[_VARIABLES] = set(children(root[_VARIABLES]))
    if _SLOTS in root:
        for var, node in children(root[_SLOTS]).items():
            names[_SLOTS] |= {(var, slot) for slot in children(node)}
    return names
