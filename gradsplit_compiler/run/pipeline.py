"""``gsc.pipeline``: run a split as a micro-batched pipeline, one thread per device.

Each stage runs on its own device, its forward and backward compiled by XLA; a schedule
(GPipe or 1F1B, or a list of your own) says in which order each device runs them. The
gradients accumulated over the micro-batches equal ``split.value_and_gradients`` on the whole
batch, and each step leaves a timeline to look at.

>>> import numpy as np, tensorflow as tf
>>> import gradsplit_compiler as gsc
>>> W = tf.Variable(np.ones((3, 3)))
>>> def loss(x):
...     h = gsc.mark(tf.tanh(x @ W), "h")
...     return tf.reduce_mean(tf.tanh(h @ W) ** 2)
>>> s = gsc.split(loss, [tf.TensorSpec([None, 3], tf.float64)], cuts=["h"])
>>> p = gsc.pipeline(s, microbatches=4, schedule="1f1b", loss_reduction="mean")
>>> value, grads = p.step(np.ones((8, 3)))  # == s.value_and_gradients(np.ones((8, 3)))
>>> p.peak_live_residuals
[2, 1]

Micro-batches
    An argument whose ``input_signature`` entry has a ``None`` leading dimension is the
    batch: it is cut into ``M`` equal micro-batches along dimension 0 (all such arguments
    must have the same leading size, and ``M`` must divide it). Every other argument (a
    scalar, or one whose leading dimension is fixed in the signature) is given whole to every
    micro-batch. To keep a ``None``-leading argument whole, fix its leading dimension in the
    signature.
Loss reduction
    ``loss_reduction="mean"``: ``fn`` returns the mean over the batch of per-example losses;
    each micro-batch's backward starts from ``1/M`` and the value is the mean of the
    micro-batch values. ``"sum"``: ``fn`` returns their sum; seed 1, value summed. Either way
    the result is the full-batch one only if the loss is such a mean or sum: a program that
    couples the examples of a batch (batch normalisation in training mode, a loss
    normalised by a batch statistic) sees per-micro-batch statistics instead.
Variables
    A compiled function cannot read a variable on another device, so a stage whose device
    does not hold one of its variables reads a replica created on its device, refreshed from
    the variable at the start of every step (the pipeline keeps parameters where they are
    used); its gradient is summed like any other. A variable the program assigns (batch-norm
    statistics, a counter) is assigned once per micro-batch, in schedule order; if the step
    fails, every such variable is put back as it was.
Clusters
    A device may be a task of a TensorFlow cluster this process is connected to
    (``/job:worker/replica:0/task:1/device:CPU:0``; see ``gradsplit_compiler.cluster``). The
    variables stay in this process; each stage reads replicas created on its task and
    refreshed at the start of every step, activations and cotangents travel through
    TensorFlow's runtime, and ``step`` returns the value and gradients here. A TensorFlow
    error on a task becomes a ``GradSplitError`` naming the task and the stage, and
    ``timeout=`` bounds a step whose task stopped answering. ``bytes_moved()`` says what the
    last step sent between devices.

This module holds the public ``pipeline`` and ``Pipeline``; ``run.engine`` runs a step (a
thread per device, given a ``StepPlan``), ``run.devices`` resolves device names and places
variable replicas, ``run.faults`` says which action or task failed, and ``show.timeline``
draws the timeline a step records.
"""

from __future__ import annotations

import copy
import math
import os
import threading
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, NamedTuple

import tensorflow as tf

from gradsplit_compiler.core.split import Split
from gradsplit_compiler.core.verify import RANDOM_OPS, stateful_random_ops
from gradsplit_compiler.errors import GradSplitError
from gradsplit_compiler.run.devices import (
    default_device,
    device_label,
    is_grid,
    is_remote,
    plan_replicas,
    resolve_devices,
    stage_runner,
)
from gradsplit_compiler.run.engine import (
    StepPlan,
    StepRecord,
    StepRun,
    TimelineEvent,
    measured_idle_fraction,
)
from gradsplit_compiler.run.faults import RESTART, RESTART_AND_RESTORE
from gradsplit_compiler.run.fused import ONE_PROGRAM, OneProgramStep
from gradsplit_compiler.run.schedules import (
    BACKWARD,
    BUILTIN_SCHEDULES,
    FORWARD,
    WEIGHT,
    Action,
    Simulation,
    builtin_schedule,
    ideal_idle_fraction,
    measured_latency,
    schedule_dependencies,
    simulate,
    splits_backward,
    validate_schedule,
)
from gradsplit_compiler.run.training import TrainingState

__all__ = ["IdleFraction", "Pipeline", "TimelineEvent", "pipeline"]

LOSS_REDUCTIONS = ("mean", "sum")


def pipeline(split: Split, microbatches: int, schedule: str | Sequence = "1f1b",
             devices: Sequence[str] | None = None, *, loss_reduction: str | None = None,
             optimizer: Any = None, clip_global_norm: float | None = None,
             on_nonfinite: str = "raise", jit_compile: bool = True,
             timeout: float | None = None, shares_state_with: Pipeline | None = None,
             remat: Any = None, one_program: bool | None = None) -> Pipeline:
    """Run ``split`` as a pipeline of ``microbatches`` micro-batches.

    Parameters
    ----------
    split : gsc.Split
        A split whose ``fn`` returns one floating-point scalar (the loss).
    microbatches : int
        ``M``; it must divide the batch given to ``step``.
    schedule : "gpipe", "1f1b", "zb-h1", "interleaved-1f1b", "zb-v" or list of lists of Action
        The order in which each device runs its forwards and backwards; a list is checked
        with ``validate_schedule`` first. ``"zb-h1"`` splits each backward into ``B``
        (input cotangents) and ``W`` (variable gradients), two programs of the stage;
        ``"interleaved-1f1b"`` runs several stages per device (``devices`` round robin,
        e.g. ``[d0, d1, d0, d1]``), one thread per device; ``"zb-v"`` splits the backward
        and runs stages ``k`` and ``K - 1 - k`` on one device (``devices`` in a V, e.g.
        ``[d0, d1, d1, d0]``).
    devices : list of str, optional
        A TensorFlow device name per stage (``"/CPU:1"``, ``"/GPU:0"``, ...); stage ``k``
        runs on ``devices[k]`` (extra names are ignored); a name may repeat. ``None``: every
        stage on TensorFlow's default device, still one thread each (except under
        ``"interleaved-1f1b"``, or a schedule with one list per distinct device).
        A list of lists is a grid (one list per stage, a device per replica, ``R`` each):
        the result is then a ``run.grid.GridPipeline`` of ``R`` replicas whose stages'
        gradients are all-reduced with TensorFlow's collectives (it needs ``optimizer=``).
    loss_reduction : "mean" or "sum"
        Required: how ``fn`` reduces the per-example losses of a batch. Checked on the
        first step: a loss declared ``"mean"`` that sums (or the reverse) is refused.
    optimizer : keras.optimizers.Optimizer, optional
        A fresh Keras optimizer: the pipeline then owns the training state. Each stage's
        device gets, once, its own copy of the variables its stages read and an optimizer
        like this one (same class and configuration) over the trainable ones;
        ``train_step`` updates them there, and ``write_back``, ``save`` and ``restore``
        move the state in and out. See "Training" below. A
        ``keras.optimizers.LossScaleOptimizer`` (mixed precision) works as in Keras'
        ``train_step``: every backward is seeded with the loss scale, a step whose gradients
        are not all finite is skipped on every device and halves the scale, and the scale
        doubles after its growth steps; the gradients are unscaled before clipping and the
        update. An optimizer's static ``loss_scale_factor`` seeds the backward likewise.
    clip_global_norm : float, optional
        With ``optimizer``: scale the gradients so that their norm over all stages is at
        most this (``tf.clip_by_global_norm``); an optimizer's own ``global_clipnorm`` is
        taken as this.
    on_nonfinite : "raise", "skip" or "apply"
        With ``optimizer``: a step whose gradients are not all finite changes no variable,
        and raises ``GradSplitError`` naming the variable (``"raise"``) or is skipped and
        counted in ``skipped_steps`` (``"skip"``). ``"apply"``: no check, the update runs
        whatever the gradients, as in plain Keras ``fit`` (with a loss scale the check
        stays: its skipped steps need it).
    jit_compile : bool
        Run each stage's forward and backward as its own XLA program.
    timeout : float, optional
        Seconds a step may take. A step that has not finished by then (a worker of a
        cluster died or stopped answering) raises ``GradSplitError`` naming the actions
        still running, their stages and devices; no variable changes. ``None``: wait. In
        ``train_step`` the optimizer update is bounded by it too.
    remat : bool, list of bool or list of int, optional
        Rematerialisation: ``True`` for every stage, one bool per stage, or the indices of
        the stages. Such a stage keeps only its inputs as residuals; its backward (``B``
        under ``"zb-h1"``) runs its forward again first, in the same XLA program. Refused
        for a stage that assigns a variable or draws random numbers (running it again
        would repeat that). ``None`` (the default): what ``split.plan.remat`` says for a
        split made by ``gsc.auto_split`` (remat chosen to fit its ``memory_limit``), no
        remat otherwise.
    shares_state_with : Pipeline, optional
        A training pipeline (built with ``optimizer=``) of the same model: this pipeline's
        stages then read that one's stage-resident copies instead of ``split.variables``
        (e.g. the model's inference program, ``training=False``, to ``forward`` it with
        the weights being trained, nothing written back). Stage ``k`` runs on that
        pipeline's ``devices[k]`` unless ``devices`` says otherwise, and each variable it
        reads must be held on its device there: cut both programs at the same places.
    one_program : bool, optional
        With ``optimizer``, when every stage runs on one device of this process, there is
        nothing to overlap: ``train_step`` then runs the whole step (every micro-batch's
        forwards and backwards, the gradient sums, the check, clipping and update) as one
        program, one XLA program under ``jit_compile``, instead of one program per action
        and thread hand-offs between them. Same results up to rounding; its timeline is
        one event of kind ``"S"``. ``None`` (default): so whenever it applies (not with
        ``remat``); ``False``: one program per action (a per-action timeline);
        ``True``: insist (refused where it does not apply).

    Returns
    -------
    Pipeline, or GridPipeline for a grid of devices

    Raises
    ------
    GradSplitError
        For a missing or unknown ``loss_reduction`` or schedule, a bad ``microbatches``,
        fewer devices than stages, a device that does not exist, an ``fn`` that does not
        return a scalar, an optimizer that is not a fresh Keras optimizer, a clip norm that
        is not positive. Nothing runs.
    """
    if is_grid(devices):
        from gradsplit_compiler.run.grid import GridPipeline  # it builds on Pipeline

        if shares_state_with is not None:
            raise GradSplitError(
                "shares_state_with is not supported on a grid of devices (one list per "
                "stage) yet; give a plain list of devices, one per stage.")
        if one_program:
            raise GradSplitError(
                "one_program=True runs a training step as one program on one device, but a "
                "grid of devices sums each stage's gradients over its replicas between the "
                "schedule and the update. Leave one_program unset for a grid.")
        return GridPipeline(split, microbatches, schedule, devices,
                            loss_reduction=loss_reduction, optimizer=optimizer,
                            clip_global_norm=clip_global_norm, on_nonfinite=on_nonfinite,
                            jit_compile=jit_compile, timeout=timeout, remat=remat)
    return Pipeline(split, microbatches, schedule, devices, loss_reduction=loss_reduction,
                    optimizer=optimizer, clip_global_norm=clip_global_norm,
                    on_nonfinite=on_nonfinite, jit_compile=jit_compile, timeout=timeout,
                    shares_state_with=shares_state_with, remat=remat,
                    one_program=one_program)


class IdleFraction(NamedTuple):
    """``measured``: the share of device time spent waiting, between the first action's start
    and the last action's end. ``ideal``: the same when every forward and backward takes
    equal time, ``(K - 1) / (M + K - 1)`` for GPipe and 1F1B."""

    measured: float
    ideal: float


class Pipeline:
    """A split run as a pipeline; built by ``gsc.pipeline`` (see there for the arguments).

    Attributes
    ----------
    split, microbatches, loss_reduction, jit_compile
        As given.
    schedule : list of list of Action
        The validated schedule: list ``k`` is what device ``k`` runs, in order.
    devices : list of str
        The full name of each stage's device.
    """

    def __init__(self, split: Split, microbatches: int, schedule: str | Sequence = "1f1b",
                 devices: Sequence[str] | None = None, *, loss_reduction: str | None = None,
                 optimizer: Any = None, clip_global_norm: float | None = None,
                 on_nonfinite: str = "raise", jit_compile: bool = True,
                 timeout: float | None = None, shares_state_with: Pipeline | None = None,
                 remat: Any = None, one_program: bool | None = None):
        if not isinstance(split, Split):
            raise GradSplitError(
                f"pipeline needs a gsc.Split (from gsc.split); got {type(split).__name__}."
            )
        _check_loss_reduction(loss_reduction)
        _check_scalar_loss(split)
        self.split = split
        self.num_stages = len(split.stages)
        self.loss_reduction = loss_reduction
        self.jit_compile = bool(jit_compile)
        self.microbatches = microbatches
        if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
            raise GradSplitError(
                f"timeout must be a positive number of seconds or None; got {timeout!r}.")
        self.timeout = timeout
        self._schedule_name = schedule.lower() if isinstance(schedule, str) else None
        if isinstance(schedule, str) and self._schedule_name not in BUILTIN_SCHEDULES:
            builtin_schedule(schedule, 1, 1)  # an unknown name, before anything else
        self.remat = _remat_flags(remat, split, self.jit_compile)
        if shares_state_with is not None:
            _check_shared_state(shares_state_with, optimizer)
            if devices is None:
                devices = shares_state_with.devices
        self.devices = resolve_devices(devices, self.num_stages)
        if isinstance(schedule, str):
            schedule = builtin_schedule(schedule, self.num_stages, microbatches, self.devices)
        # A built-in one is checked all the same: the dependencies come from this split.
        # Lists per device (virtual stages) only where the caller named devices, or asked for
        # interleaved-1f1b: devices=None keeps one thread per stage.
        self._list_devices = self.devices if (devices is not None or self._schedule_name in (
            "interleaved-1f1b", "zb-v")) else None
        self.schedule = validate_schedule(schedule, split, microbatches, self._list_devices)
        dependencies = schedule_dependencies(split)
        self._ideal_idle = ideal_idle_fraction(self.schedule, dependencies)
        self._batched = _batched_arguments(split)
        if microbatches > 1 and not self._batched:
            raise GradSplitError(
                f"microbatches={microbatches}, but no argument of fn has a batch dimension "
                f"(a None leading dimension in input_signature), so there is nothing to cut "
                f"into micro-batches. Declare the batch dimension as None, or use "
                f"microbatches=1."
            )
        if optimizer is None and (clip_global_norm is not None or on_nonfinite != "raise"):
            raise GradSplitError(
                "clip_global_norm and on_nonfinite act on the optimizer's step; they need "
                "optimizer= (a Keras optimizer). Without one, step() returns the gradients "
                "and clipping is yours (tf.clip_by_global_norm)."
            )
        home = default_device()
        self.optimizer = optimizer
        self._training: TrainingState | None = None
        if optimizer is not None:
            self._training = TrainingState(
                split, self.devices, optimizer, clip_global_norm=clip_global_norm,
                on_nonfinite=on_nonfinite, jit_compile=self.jit_compile, timeout=timeout)
            self._replicas, self._copied_back = {}, []
            runners = tuple(
                replace(stage_runner(split, stage, device, {
                    (idx, device): copy for idx, copy in zip(
                        stage.variable_indices, self._training.stage_variables(stage.index))},
                    self.jit_compile, self.remat[stage.index]), replicas=())
                for stage, device in zip(split.stages, self.devices))
        elif shares_state_with is not None:
            self._replicas, self._copied_back = {}, []
            state = shares_state_with.training_state
            self._shared_copies = {
                (idx, device): state.copy_on(device, split.variables[idx], stage.index)
                for stage, device in zip(split.stages, self.devices)
                for idx in stage.variable_indices}
            runners = tuple(
                replace(stage_runner(split, stage, device, self._shared_copies,
                                     self.jit_compile, self.remat[stage.index]), replicas=())
                for stage, device in zip(split.stages, self.devices))
        else:
            self._replicas, self._copied_back = plan_replicas(split, self.devices,
                                                              self.jit_compile)
            runners = tuple(stage_runner(split, stage, device, self._replicas,
                                         self.jit_compile, self.remat[stage.index])
                            for stage, device in zip(split.stages, self.devices))
        split_backward = splits_backward(self.schedule)
        for runner in runners:
            if split_backward and runner.backward_input is None:
                raise GradSplitError(
                    f"the schedule splits the backward into B and W, but stage "
                    f"{runner.index} holds a tf.cond whose gradient reads branch "
                    "intermediates: XLA compiles it per input shape, from the forward's "
                    "trace, and only its fused backward that way. Use schedule='1f1b' or "
                    "'gpipe', or jit_compile=False.")
        self._plan = StepPlan(
            runners=runners,
            schedule=self.schedule, dependencies=dependencies, microbatches=microbatches,
            loss_reduction=loss_reduction, variables=tuple(split.variables),
            arg_names=tuple(split.arg_names), loss_name=split.output_names[0],
            loss_dtype=split.output_specs[0].dtype, home=home, timeout=timeout,
            aux_names=tuple(split.output_names[1:]),
            after_fault=RESTART if optimizer is None else RESTART_AND_RESTORE,
            split_backward=split_backward)
        self._one_program = self._one_program_step(one_program)
        self._last: StepRecord | None = None
        self._last_batch: int | None = None
        self._reduction_checked = False
        self._shares_state = shares_state_with is not None

    def _one_program_step(self, wanted: bool | None) -> OneProgramStep | None:
        """The step as one program (``fused.OneProgramStep``) when ``one_program`` asks for
        it or leaves it open and it applies; refuses ``one_program=True`` where it does
        not."""
        if wanted not in (None, True, False):
            raise GradSplitError(
                f"one_program must be True, False or None (decide by the devices); got "
                f"{wanted!r}.")
        if wanted is False:
            return None
        devices = set(self.devices)
        why = ("it needs optimizer= (train_step runs as one program; step() runs per action)"
               if self._training is None else
               "the stages run on several devices" if len(devices) > 1 else
               f"{self.devices[0]} is a task of a cluster" if is_remote(self.devices[0]) else
               "remat= keeps a stage's residuals small by running its forward again in its "
               "own backward program" if any(self.remat) else None)
        if why is None:
            return OneProgramStep(self.split, self._training, self.microbatches,
                                  self.loss_reduction, self.jit_compile, self._plan.home)
        if wanted:
            raise GradSplitError(
                f"one_program=True runs a training step as one program on the one device "
                f"that holds every stage, but {why}. Leave one_program unset (None) to use "
                "it only where it applies.")
        return None

    def __repr__(self) -> str:
        return (
            f"Pipeline({self.num_stages} stages, {self.microbatches} micro-batches, "
            f"loss_reduction={self.loss_reduction!r})"
        )

    # -- running ---------------------------------------------------------------------------

    def step(self, *args) -> tuple[tf.Tensor, list[tf.Tensor]]:
        """One pipelined forward and backward over a whole batch: ``(value, grads)``.

        Equal to ``split.value_and_gradients(*args)`` up to rounding: ``grads`` align with
        ``split.variables`` (zeros for a variable the value does not depend on). The first
        step also traces and compiles each stage for the micro-batch shape, which its
        timeline shows; time the second. On a pipeline with an optimizer, the stages read
        their stage-resident copies and nothing is updated.

        If any action fails, the other devices stop at their next action (one already
        running finishes; on a cluster, the step waits for it at most
        ``faults.GRACE_AFTER_FAILURE`` = 2 s more, since a call to a task can hang once
        another task died), every variable the program assigns is put back as it was before
        the step, and the first error is raised here, with a note naming the action. On a
        device of another process (a cluster task), a TensorFlow error becomes a
        ``GradSplitError`` naming the task, the stage and the action; so does a step that
        outlives ``timeout``.
        """
        run, restore = self._run_schedule(args, "step")
        if self._training is None:
            for idx, device in self._copied_back:
                self.split.variables[idx].assign(self._replicas[(idx, device)])
        value, grads = run.value(), run.gradients()
        if any(is_remote(d) for d in self.devices):  # results live here, not on a task
            with tf.device(self._plan.home):
                value, grads = tf.identity(value), [tf.identity(g) for g in grads]
        value = self._with_aux(value, run)
        self._last = run.record()  # none of the step's tensors
        return value, grads

    def _value_of(self, run: StepRun) -> Any:
        """The step's value (with the outputs after the loss) in this process; the step's
        record kept for the timeline (none of its tensors)."""
        value = run.value()
        if any(is_remote(d) for d in self.devices):
            with tf.device(self._plan.home):
                value = tf.identity(value)
        value = self._with_aux(value, run)
        self._last = run.record()
        return value

    def _with_aux(self, value: tf.Tensor, run: StepRun) -> Any:
        """``value`` alone for a scalar ``fn``; else ``fn``'s output structure, the loss
        and the other outputs over the whole batch."""
        if len(self.split.output_names) == 1:
            return value
        return tf.nest.pack_sequence_as(self.split.program.output_structure,
                                        [value, *run.aux_outputs()])

    def forward(self, *args) -> Any:
        """Forwards alone over a whole batch, each stage on its device, micro-batches
        pipelined (GPipe's forward half): the value of ``fn`` (the loss, summed or averaged
        over the micro-batches as ``loss_reduction`` says), with ``fn``'s outputs after the
        loss concatenated over the micro-batches as for ``step``. No backward runs and no
        residual is kept, so it costs a forward and holds one micro-batch's activations per
        stage boundary. The stages read what ``step`` reads (the stage-resident copies on a
        training pipeline, or those of ``shares_state_with``); variables the program
        assigns change as in ``step``."""
        run, _ = self._run_schedule(args, "forward", forward_only=True)
        if self._training is None and not self._shares_state:
            for idx, device in self._copied_back:
                self.split.variables[idx].assign(self._replicas[(idx, device)])
        return self._value_of(run)

    def train_step(self, *args) -> tf.Tensor:
        """One training step over a whole batch; returns the loss (the full-batch value).

        Runs the schedule on the stage-resident copies, then every device applies its
        optimizer to its own variables (after one scalar per device for the global norm
        and the finiteness check). Equal, up to rounding, to one step of the same optimizer
        on ``split.value_and_gradients(*args)`` applied to the trainable variables. Neither
        variable values nor gradients cross devices, except the gradients of a variable
        that stages on several devices read. A failure changes no variable, except that a
        task of a cluster that dies or hangs (a ``GradSplitError`` naming it and its
        stages, within ``timeout`` for the schedule and again for the update) takes the
        copies and optimizer state it held with it: restart the workers, build the
        pipeline again and ``restore`` the last checkpoint.
        """
        if self._training is None:
            raise GradSplitError(
                "train_step needs a pipeline built with optimizer= (a Keras optimizer, e.g. "
                "gsc.pipeline(split, 4, optimizer=keras.optimizers.Adam(1e-3), ...)); this "
                "one has none. step() returns the gradients for your own optimizer."
            )
        run, restore = self._run_schedule(args, "train_step")
        try:
            if self._one_program is not None:
                outcome = self._training.after_one_program(run.finite_each)
            else:
                outcome = self._training.update(run.stage_gradients(), run.count,
                                                self._plan.runners)
        except BaseException as exc:
            self._undo(restore, exc)
            raise
        if outcome == "skipped":
            restore()
        return self._value_of(run)

    def _run_schedule(self, args: Sequence, caller: str, forward_only: bool = False,
                      seed_factor: float = 1.0):
        """Run the schedule on ``args`` (or its forwards alone): the finished ``StepRun`` and
        a function that puts back what the program assigned during it. ``seed_factor``
        multiplies every backward's seed (a replica of a grid: ``1/R`` for a mean)."""
        if not tf.executing_eagerly():
            raise GradSplitError(
                f"pipeline.{caller} was called inside a tf.function (or graph mode): a step "
                "runs one thread per device and compiled stage programs eagerly, and cannot "
                f"be traced into another function. Call {caller}() from plain Python, outside "
                "tf.function; each stage's forward and backward are compiled already.")
        self._last = None
        tensors = self.split.check_arguments(list(args))
        self._last_batch = tensors[self._batched[0]].shape[0] if self._batched else None
        per_microbatch = self._cut_into_microbatches(tensors)
        if self._training is not None:
            written = self._training.written_copies()
        elif self._shares_state:  # the other pipeline's copies this program assigns
            assigned = {id(v) for v in self.split.written_variables()}
            written = [(copy, device) for (idx, device), copy in self._shared_copies.items()
                       if id(self.split.variables[idx]) in assigned]
        else:
            written = [(v, None) for v in self.split.written_variables()]
        before = []
        for v, device in written:
            with tf.device(device or v.device):
                before.append(tf.identity(v))

        def restore():
            for (v, device), value in zip(written, before):
                with tf.device(device or v.device):
                    v.assign(value)

        seed_scale = seed_factor * (self._training.seed_scale if caller == "train_step"
                                    and self._training is not None else 1.0)
        plan = self._plan
        if forward_only:  # each device its forwards, in micro-batch order
            plan = replace(plan, forward_only=True, schedule=[
                [Action(FORWARD, k, m) for m in range(self.microbatches)]
                for k in range(self.num_stages)])
        if caller == "train_step" and self._one_program is not None:
            scale = self._training.loss_scale
            run = self._one_program.run(per_microbatch, seed_scale,
                                        1.0 if scale is None else scale.value)
        else:
            run = StepRun(plan, per_microbatch, seed_scale)
        try:
            run.execute()
            if not self._reduction_checked and not forward_only:
                self._check_reduction(tensors, run)
        except BaseException as exc:
            # Micro-batches that finished may have assigned variables: undo them all.
            self._undo(restore, exc)
            raise
        return run, restore

    def _undo(self, restore, error: BaseException) -> None:
        """``restore()`` after ``error`` failed a step. Assigned copies held on a task that
        died cannot be put back (nor waited for, on one that hangs): then ``error`` is what
        the caller needs, with a note, and the wait is bounded by ``timeout``."""
        failed: list[BaseException] = []

        def run() -> None:
            try:
                restore()
            except Exception as exc:  # reported as a note on the error being raised
                failed.append(exc)

        if self._training is None or not any(is_remote(d) for d in self.devices):
            run()
        else:
            thread = threading.Thread(target=run, daemon=True, name="gradsplit-undo")
            thread.start()
            thread.join(self.timeout)
            if thread.is_alive():
                failed.append(TimeoutError(f"no answer within timeout={self.timeout:g} s"))
        if failed and hasattr(error, "add_note"):
            error.add_note(f"(putting back the variables the program assigned during the "
                           f"step failed too: {type(failed[0]).__name__}: {failed[0]})")

    def _check_reduction(self, tensors: list[tf.Tensor], run: StepRun) -> None:
        """On the first step: the full-batch value of ``fn`` against the micro-batch values
        combined as ``loss_reduction`` says; refuse a declared reduction that does not
        match when the other one does."""
        self._reduction_checked = True
        program = self.split.program
        m = self.microbatches
        if m == 1 or program.tf_function is None or stateful_random_ops(program):
            return  # one micro-batch cannot tell; random draws differ between the two runs
        values = [float(v) for v in run.micro_values()]
        structured = tf.nest.pack_sequence_as(program.input_signature, tensors) \
            if program.input_signature is not None else tensors
        written = self.split.written_variables()
        before = [tf.identity(v) for v in written]
        try:
            with tf.device(self._plan.home):
                full = float(tf.nest.flatten(program.tf_function(*structured))[0])
        finally:
            for v, value in zip(written, before):
                v.assign(value)
        total = math.fsum(values)
        rtol = 1e-4 if self.split.output_specs[0].dtype.size < 8 else 1e-8
        fits = {"sum": _close(full, total, rtol), "mean": _close(full, total / m, rtol)}
        declared = self.loss_reduction
        other = "sum" if declared == "mean" else "mean"
        if not fits[declared] and fits[other]:
            raise GradSplitError(
                f"loss_reduction={declared!r}, but fn's value on the whole batch ({full:.6g}) "
                f"is the {other} of its values on the {m} micro-batches ({values[0]:.6g}, ...), "
                f"not their {declared}: fn {'sums' if other == 'sum' else 'averages'} over the "
                f"batch. Pass loss_reduction={other!r} (with {declared!r} every gradient "
                f"would be {m}x too {'small' if declared == 'mean' else 'large'})."
            )

    def _cut_into_microbatches(self, tensors: list[tf.Tensor]) -> list[list[tf.Tensor]]:
        m = self.microbatches
        labels = [_arg_label(n) for n in self.split.arg_names]
        sizes = {labels[i]: tensors[i].shape[0] for i in self._batched}
        if len(set(sizes.values())) > 1:
            raise GradSplitError(
                "the batched arguments (None leading dimension in input_signature) have "
                f"different batch sizes: {sizes}; they must share one batch size."
            )
        batch = next(iter(sizes.values()), None)
        if batch is not None and (batch % m or batch < m):
            divisors = [d for d in range(1, batch + 1) if batch % d == 0]
            raise GradSplitError(
                f"a batch of {batch} does not cut into {m} equal micro-batches; use a number "
                f"of micro-batches that divides it ({', '.join(map(str, divisors))}) or a "
                f"batch that {m} divides."
            )
        pieces = [
            tf.split(t, m, axis=0) if i in self._batched else [t] * m
            for i, t in enumerate(tensors)
        ]
        return [[p[j] for p in pieces] for j in range(m)]

    # -- one replica of a grid (the package's interface for ``run.grid``) --------------------

    @property
    def runners(self) -> tuple:
        """Each stage bound to its device (``devices.StageRunner``)."""
        return self._plan.runners

    def run_share(self, args: Sequence, seed_factor: float):
        """The schedule of ``train_step`` on ``args`` (this replica's share of a grid's
        batch), every backward seeded ``seed_factor`` times as much: ``(run, restore)``
        as ``train_step`` has them before the update. A failure puts back what the program
        assigned and raises."""
        return self._run_schedule(args, "train_step", seed_factor=seed_factor)

    def undo_share(self, restore, error: BaseException) -> None:
        """Put back what the program assigned during a share whose step failed later."""
        self._undo(restore, error)

    def value_of_share(self, run: StepRun) -> Any:
        """The value of a share's run (with ``fn``'s outputs after the loss), here; the
        run's record kept for this replica's timeline and traffic."""
        return self._value_of(run)

    def last_record(self) -> StepRecord:
        """What the last step left (``GradSplitError`` before any step)."""
        return self._last_run()

    # -- training state ----------------------------------------------------------------------

    @property
    def training_state(self) -> TrainingState | None:
        """The stage-resident variables and optimizers (``None`` without ``optimizer=``);
        the package's internal interface, for ``gradsplit_compiler.keras``."""
        return self._training

    def with_microbatches(self, microbatches: int) -> Pipeline:
        """This pipeline with another micro-batch count, sharing its stages, devices and
        training state (for a last batch that ``microbatches`` does not divide). Only for
        a built-in schedule."""
        if self._schedule_name is None:
            raise GradSplitError(
                "with_microbatches needs a built-in schedule ('gpipe' or '1f1b'); this "
                "pipeline runs a schedule given as a list.")
        schedule = validate_schedule(
            builtin_schedule(self._schedule_name, self.num_stages, microbatches, self.devices),
            self.split, microbatches, self._list_devices)
        twin = copy.copy(self)
        vars(twin).update(  # the copy's own state for its count; stages and training shared
            microbatches=microbatches, schedule=schedule, _last=None,
            _ideal_idle=ideal_idle_fraction(schedule, self._plan.dependencies),
            _plan=replace(self._plan, schedule=schedule, microbatches=microbatches))
        if self._one_program is not None:  # traced again for the count
            vars(twin).update(_one_program=OneProgramStep(
                self.split, self._training, microbatches, self.loss_reduction,
                self.jit_compile, self._plan.home))
        return twin

    def _state(self, what: str) -> TrainingState:
        if self._training is None:
            raise GradSplitError(
                f"{what} needs a pipeline built with optimizer= (a Keras optimizer): only then "
                "does it hold training state of its own. Without one, the variables are "
                "split.variables themselves."
            )
        return self._training

    def write_back(self) -> None:
        """Copy the stage-resident variables into ``split.variables`` (the user's own
        model). Training never touches those otherwise."""
        self._state("write_back()").write_back()

    def save(self, path: str | os.PathLike) -> str:
        """Write the training state (every variable once, the optimizer slots, the iteration
        count; by the variables' own names) as a TensorFlow checkpoint; returns its path
        prefix. ``restore`` reads it into a pipeline of the same program on any cuts and
        devices; ``gsc.load_variables`` reads the variables into the plain model."""
        return self._state("save()").save(path)

    def restore(self, path: str | os.PathLike) -> None:
        """Read a checkpoint written by ``save`` into this pipeline's training state. A
        checkpoint of another program is refused (naming the missing and unexpected
        variables) before anything changes."""
        self._state("restore()").restore(path)

    @property
    def iterations(self) -> int:
        """Optimizer steps taken (advanced once per ``train_step``; a skipped step does not
        count)."""
        return self._state("iterations").iterations

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for a non-finite gradient (``on_nonfinite="skip"``)."""
        return self._state("skipped_steps").skipped_steps

    def stage_variables(self, stage: int) -> list[tf.Variable]:
        """The stage-resident copies stage ``stage`` reads, aligned with its ``variables``."""
        return self._state("stage_variables()").stage_variables(stage)

    def memory(self) -> dict[str, dict[str, int]]:
        """Per device (full name): bytes of the variables (``"variables"``) and optimizer
        slots (``"slots"``) it holds. Each device holds only its stages' share."""
        return self._state("memory()").memory()

    # -- what the last step did -------------------------------------------------------------

    def _last_run(self) -> StepRecord:
        if self._last is None:
            raise GradSplitError("no step has run yet: call step(*args) first.")
        return self._last

    @property
    def peak_live_residuals(self) -> list[int]:
        """Per stage, the most micro-batches whose residuals were alive at once in the last
        step (a forward's residuals live until its backward ran)."""
        return list(self._last_run().peak_live)

    @property
    def peak_live_residual_bytes(self) -> list[int]:
        """Per list of the schedule (per device), the most bytes of residuals alive at once
        in the last step: a forward's residuals until its backward; under a schedule that
        splits the backward, what ``W`` reads until the ``W`` (residuals that are also a
        stage output or input count once, variables not at all)."""
        return list(self._last_run().peak_live_bytes)

    def bytes_moved(self) -> dict[str, int]:
        """Bytes the last step moved between devices, by kind: ``"activations"`` and
        ``"cotangents"`` (between stages on different devices), ``"inputs"`` (arguments
        from this process to the stages that read them), ``"results"`` (losses and
        gradients back to this process) and ``"replicas"`` (variables refreshed on the
        stages' devices). After a ``train_step``: ``"gradients"`` (the gradients of a
        variable read on several devices, sent between those devices) and ``"scalars"``
        (each device's squared norm and finiteness flag, and the clipping scale sent back);
        ``"replicas"`` is 0 and ``"results"`` holds only the loss values. A tensor counts
        when it is consumed on a device other than the one holding it; sizes are
        ``num_elements * dtype.size``."""
        return dict(self._last_run().moved)

    def timeline(self) -> list[TimelineEvent]:
        """Every action of the last step, in order of start time."""
        return sorted(self._last_run().events, key=lambda e: (e.start, e.device_index))

    def idle_fraction(self) -> IdleFraction:
        """``(measured, ideal)`` idle share of the devices in the last step."""
        return IdleFraction(measured_idle_fraction(self.timeline(), len(self.schedule)),
                            self._ideal_idle)

    def simulate(self, durations: Any = None, schedule: Sequence | None = None,
                 latency: float | None = None) -> Simulation:
        """Predict a step (``schedules.simulate``): its time, each device's idle share and
        peak live residual bytes, from per-action ``durations`` (default: each action's
        time in the last step; a dict by kind such as ``{"F": 1.0, "B": 2.0}`` works too),
        the ``latency`` between what an action waits for and its start (default: the
        median the last step measured, ``schedules.measured_latency``) and the residual
        bytes per micro-batch the last step measured. ``schedule``: another
        schedule for the same stages and devices to predict instead (validated first), e.g.
        ``"zb-h1"`` from a 1F1B step; a ``W`` then takes the time the kind-level
        ``durations`` give it, or, from measured times, the fused backward's half (and ``B``
        the other half)."""
        record = self._last_run()
        if any(e.kind == ONE_PROGRAM for e in record.events) and (
                durations is None or latency is None):
            raise GradSplitError(
                "the last step ran as one program (every stage on one device, see "
                "one_program=): it has no time per action to simulate from. Pass durations= "
                "(e.g. {'F': 1.0, 'B': 2.0}) and latency=, or build the pipeline with "
                "one_program=False and run a step.")
        if latency is None:
            latency = measured_latency(self.schedule, self._plan.dependencies, {
                Action(e.kind, e.stage, e.microbatch): (e.start, e.end)
                for e in record.events})
        if durations is None:
            durations = {Action(e.kind, e.stage, e.microbatch): e.end - e.start
                         for e in record.events}
        target = self.schedule
        if schedule is not None:
            if isinstance(schedule, str):
                schedule = builtin_schedule(schedule, self.num_stages, self.microbatches,
                                            self.devices)
            target = validate_schedule(schedule, self.split, self.microbatches,
                                       self._list_devices)
        measured_split = splits_backward(self.schedule)
        durations = _durations_for(durations, measured_split, splits_backward(target))
        weights = record.weight_input_bytes if any(record.weight_input_bytes) else \
            self._weight_bytes_per_microbatch()
        return simulate(target, self._plan.dependencies, durations, record.residual_bytes,
                        weights, latency)

    def _weight_bytes_per_microbatch(self) -> list[int]:
        """Per stage, the bytes its ``W`` reads for one micro-batch, from
        ``split.summary`` at the micro-batch size of the last step."""
        batch = self._last_batch // self.microbatches if self._last_batch else None
        return [r["weight_input_bytes"] for r in self.split.summary(batch_size=batch)]

    def write_chrome_trace(self, path: str | os.PathLike) -> str:
        """Write the last step's timeline as Chrome trace JSON (open it in Perfetto or
        chrome://tracing): one thread per device, one complete event per action."""
        from gradsplit_compiler.show.timeline import write_chrome_trace

        return write_chrome_trace(self.timeline(), path, labels=self._device_labels(),
                                  microbatches=self.microbatches)

    def plot_timeline(self, path: str | os.PathLike) -> str:
        """Draw the last step as a PNG Gantt chart: one row per device, one colour per stage,
        forwards plain and backwards hatched, the micro-batch index in each box."""
        from gradsplit_compiler.show.timeline import plot_timeline

        return plot_timeline(self.timeline(), path, labels=self._device_labels(),
                             microbatches=self.microbatches, idle=self.idle_fraction())

    def _device_labels(self) -> list[str]:
        """One label per list of the schedule: the device of its stages."""
        return [device_label(self.devices[actions[0].stage] if actions else self.devices[d])
                for d, actions in enumerate(self.schedule)]


# -- checks and setup -------------------------------------------------------------------------


def _check_shared_state(other: Any, optimizer: Any) -> None:
    if not isinstance(other, Pipeline) or other.training_state is None:
        raise GradSplitError(
            "shares_state_with takes a training pipeline (one built with optimizer=), whose "
            f"stage-resident variables the stages read; got {other!r}.")
    if optimizer is not None:
        raise GradSplitError(
            "a pipeline that shares another's training state has no optimizer of its own: "
            "give optimizer= or shares_state_with=, not both.")


def _check_loss_reduction(loss_reduction: Any) -> None:
    if loss_reduction in LOSS_REDUCTIONS:
        return
    got = "was not given" if loss_reduction is None else f"is {loss_reduction!r}"
    raise GradSplitError(
        f"loss_reduction {got}; say how fn reduces the losses of a batch, so that the "
        "micro-batches add up to the full batch: loss_reduction='mean' when fn returns the "
        "mean over the batch (each micro-batch's backward starts from 1/M and the value is the "
        "mean of the micro-batch values), loss_reduction='sum' when it returns the sum (seed "
        "1, values summed)."
    )


def _check_scalar_loss(split: Split) -> None:
    specs = split.output_specs
    if specs[0].shape.rank not in (0, None) or not specs[0].dtype.is_floating:
        got = ", ".join(f"{s.dtype.name}{s.shape}" for s in specs)
        raise GradSplitError(
            f"a pipeline needs fn to return one floating-point scalar (the loss) first; it "
            f"returns {got}. Reduce the output, e.g. with tf.reduce_mean."
        )
    unbatched = [f"{name} {spec.dtype.name}{spec.shape}" for name, spec in
                 zip(split.output_names[1:], specs[1:])
                 if not spec.shape.rank or spec.shape[0] is not None]
    if unbatched:
        raise GradSplitError(
            f"fn returns more than the loss, and the pipeline concatenates those outputs over "
            f"the micro-batches, so each needs a batch dimension (None first in its shape); "
            f"these have none: {', '.join(unbatched)}. Return the loss alone, or the loss and "
            "per-example outputs (predictions)."
        )


def _durations_for(durations: Any, measured_split: bool, target_split: bool) -> Any:
    """Per-action ``durations`` measured under one kind of backward, for a schedule of the
    other kind: a fused backward's time is halved between its ``B`` and its ``W``; a
    ``B`` and its ``W`` add up to the fused one."""
    if callable(durations) or measured_split == target_split or not any(
            isinstance(key, Action) for key in durations):
        return durations
    adjusted = {}
    for action, seconds in durations.items():
        if target_split and action.kind == BACKWARD:
            adjusted[action] = seconds / 2
            adjusted[Action(WEIGHT, action.stage, action.microbatch)] = seconds / 2
        elif not target_split and action.kind == WEIGHT:
            b = Action(BACKWARD, action.stage, action.microbatch)
            adjusted[b] = adjusted.get(b, durations[b]) + seconds
        elif action not in adjusted:
            adjusted[action] = seconds
    return adjusted


def _remat_flags(remat: Any, split: Split, jit_compile: bool = True) -> list[bool]:
    """``remat=`` as one bool per stage; refuses a stage whose forward cannot run twice
    (or, under XLA, cannot run again inside its backward's program). ``None``: the plan's
    choice (``split.plan.remat``), or no remat."""
    k = len(split.stages)
    from_plan = False
    if remat is None:
        planned = getattr(split.plan, "remat", None)
        from_plan = bool(planned) and len(planned) == k and any(planned)
        remat = list(planned) if planned and len(planned) == k else False
    if isinstance(remat, bool):
        flags = [remat] * k
    elif isinstance(remat, Sequence) and not isinstance(remat, (str, bytes)) and remat and all(
            isinstance(r, bool) for r in remat):
        if len(remat) != k:
            raise GradSplitError(
                f"remat has {len(remat)} flags, but the split has {k} stages; give one bool "
                "per stage, the indices of the stages to rematerialise, or True/False.")
        flags = list(remat)
    elif isinstance(remat, (Sequence, set, frozenset)) and not isinstance(
            remat, (str, bytes)) and all(isinstance(r, int) and not isinstance(r, bool)
                                         for r in remat):
        bad = [r for r in remat if not 0 <= r < k]
        if bad:
            raise GradSplitError(
                f"remat names stage {bad[0]}, but the split has stages 0 to {k - 1}.")
        flags = [i in set(remat) for i in range(k)]
    else:
        raise GradSplitError(
            f"remat must be True/False, one bool per stage or a list of stage indices; got "
            f"{remat!r}.")
    written = set(split.program.written_variables())
    g = split.graph
    for stage, flag in zip(split.stages, flags):
        if not flag:
            continue
        assigned = [split.variables[i].name for i in stage.variable_indices if i in written]
        random = [n for n in g.nodes if g.nodes[n]["op"] in RANDOM_OPS
                  and g.nodes[n].get("stage") == stage.index]
        if assigned or random:
            what = (f"may assign variable {assigned[0]!r} (an op that can write it, an "
                    "assignment or a tf.cond, tf.while_loop or call holding it, reads its "
                    "handle)" if assigned else f"draws random numbers ({random[0]})")
            raise GradSplitError(
                f"remat for stage {stage.index}: the stage {what}, and its backward would "
                "run its forward again, repeating that. Leave this stage out of remat= "
                "(give the indices of the others), or cut so that it sits in a stage of "
                "its own.")
    per_shape = [stage.index for stage, flag in zip(split.stages, flags)
                 if flag and jit_compile and stage.compiles_per_shape]
    if per_shape:
        k_bad = per_shape[0]
        why = (f"stage {k_bad} holds a tf.cond whose gradient reads branch intermediates, which "
               "XLA compiles per input shape from the forward's trace; its backward cannot run "
               "the forward again (remat).")
        if from_plan:
            others = [i for i, flag in enumerate(flags) if flag and i not in per_shape]
            raise GradSplitError(
                f"remat for stage {k_bad} is the plan's choice (auto_split's memory_limit), "
                f"but {why} Give split's input_signature a fixed batch size, pass "
                f"remat={others} (the plan's other stages) and more memory, plan with a "
                "larger memory_limit, or use jit_compile=False.")
        raise GradSplitError(
            f"remat for stage {k_bad}: {why} Leave this stage out of remat= (give the "
            "indices of the others), give split's input_signature a fixed batch size, or "
            "use jit_compile=False.")
    return flags


def _batched_arguments(split: Split) -> list[int]:
    """Arguments cut into micro-batches: those with a ``None`` leading dimension."""
    return [i for i, spec in enumerate(split.arg_specs)
            if spec.shape.rank is not None and spec.shape.rank >= 1 and spec.shape[0] is None]


def _close(a: float, b: float, rtol: float) -> bool:
    return abs(a - b) <= rtol * max(abs(a), abs(b), 1e-30)


def _arg_label(name: str) -> str:
    return name.rsplit(":", 1)[0]
