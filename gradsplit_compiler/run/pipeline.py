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
"""

from __future__ import annotations

import json
import os
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import tensorflow as tf

from gradsplit_compiler.core.split import Split, _run
from gradsplit_compiler.errors import GradSplitError
from gradsplit_compiler.run.schedules import (
    BACKWARD,
    BUILTIN_SCHEDULES,
    FORWARD,
    Action,
    _validate,
    ideal_idle_fraction,
    schedule_dependencies,
)

__all__ = ["IdleFraction", "Pipeline", "TimelineEvent", "pipeline"]

LOSS_REDUCTIONS = ("mean", "sum")


def pipeline(split: Split, microbatches: int, schedule: str | Sequence = "1f1b",
             devices: Sequence[str] | None = None, *, loss_reduction: str | None = None,
             jit_compile: bool = True, timeout: float | None = None) -> Pipeline:
    """Run ``split`` as a pipeline of ``microbatches`` micro-batches.

    Parameters
    ----------
    split : gsc.Split
        A split whose ``fn`` returns one floating-point scalar (the loss).
    microbatches : int
        ``M``; it must divide the batch given to ``step``.
    schedule : "gpipe", "1f1b" or list of lists of Action
        The order in which each device runs its forwards and backwards; a list is checked
        with ``validate_schedule`` first.
    devices : list of str, optional
        A TensorFlow device name per stage (``"/CPU:1"``, ``"/GPU:0"``, ...); stage ``k``
        runs on ``devices[k]`` (extra names are ignored). ``None``: every stage on
        TensorFlow's default device, still one thread each.
    loss_reduction : "mean" or "sum"
        Required: how ``fn`` reduces the per-example losses of a batch.
    jit_compile : bool
        Run each stage's forward and backward as its own XLA program.
    timeout : float, optional
        Seconds a step may take. A step that has not finished by then (a worker of a
        cluster died or stopped answering) raises ``GradSplitError`` naming the actions
        still running, their stages and devices; no variable changes. ``None``: wait.

    Returns
    -------
    Pipeline

    Raises
    ------
    GradSplitError
        For a missing or unknown ``loss_reduction`` or schedule, a bad ``microbatches``,
        fewer devices than stages, a device that does not exist, an ``fn`` that does not
        return a scalar. Nothing runs.
    """
    return Pipeline(split, microbatches, schedule, devices, loss_reduction=loss_reduction,
                    jit_compile=jit_compile, timeout=timeout)


class TimelineEvent(NamedTuple):
    """One action of the last step; ``start`` and ``end`` in seconds from the step start."""

    device_index: int
    device: str
    kind: str
    stage: int
    microbatch: int
    start: float
    end: float


class IdleFraction(NamedTuple):
    """``measured``: the share of device time spent waiting, between the first action's start
    and the last action's end. ``ideal``: the same when every forward and backward takes
    equal time, ``(K - 1) / (M + K - 1)`` for GPipe and 1F1B."""

    measured: float
    ideal: float


@dataclass
class _StageRunner:
    """What one device needs to run one stage."""

    index: int
    device: str
    forward: Any
    backward: Any
    inputs: list[str]
    outputs: list[str]
    output_dtypes: list[tf.DType]
    variable_indices: list[int]


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
                 jit_compile: bool = True, timeout: float | None = None):
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
        self._dependencies = dependencies = schedule_dependencies(split)
        if isinstance(schedule, str):
            maker = BUILTIN_SCHEDULES.get(schedule.lower())
            if maker is None:
                raise GradSplitError(
                    f"unknown schedule {schedule!r}; use one of "
                    f"{', '.join(repr(n) for n in BUILTIN_SCHEDULES)}, or a list with one list "
                    f"of Action(kind, stage, microbatch) per device."
                )
            # Checked all the same: the dependencies come from this split.
            self.schedule = _validate(maker(self.num_stages, microbatches), self.num_stages,
                                      microbatches, dependencies)
        else:
            self.schedule = _validate(schedule, self.num_stages, microbatches, dependencies)
        self._ideal_idle = ideal_idle_fraction(self.schedule, dependencies)
        self._batched = _batched_arguments(split)
        if microbatches > 1 and not self._batched:
            raise GradSplitError(
                f"microbatches={microbatches}, but no argument of fn has a batch dimension "
                f"(a None leading dimension in input_signature), so there is nothing to cut "
                f"into micro-batches. Declare the batch dimension as None, or use "
                f"microbatches=1."
            )
        self.devices = _resolve_devices(devices, self.num_stages)
        self._home = _default_device()
        self._replicas, self._copied_back = _plan_replicas(split, self.devices, self.jit_compile)
        self._runners = [
            _runner(split, stage, device, self._replicas, self.jit_compile)
            for stage, device in zip(split.stages, self.devices)
        ]
        self._last: _StepRun | None = None

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
        timeline shows; time the second.

        If any action fails, the other devices stop at their next action (one already
        running finishes), every variable the program assigns is put back as it was before
        the step, and the first error is raised here, with a note naming the action. On a
        device of another process (a cluster task), a TensorFlow error becomes a
        ``GradSplitError`` naming the task, the stage and the action; so does a step that
        outlives ``timeout``.
        """
        self._last = None
        tensors = self.split._check_args(list(args))
        per_microbatch = self._cut_into_microbatches(tensors)
        written = [self.split.variables[i] for i in self.split._program.written_variables()]
        before = [tf.identity(v) for v in written]
        run = _StepRun(self, per_microbatch)
        try:
            run.execute()
        except BaseException:
            # Micro-batches that finished may have assigned variables: undo them all.
            for v, value in zip(written, before):
                v.assign(value)
            raise
        for idx, device in self._copied_back:
            self.split.variables[idx].assign(self._replicas[(idx, device)])
        value, grads = run.value(), run.gradients()
        if any(_is_remote(d) for d in self.devices):  # results live here, not on a task
            with tf.device(self._home):
                value, grads = tf.identity(value), [tf.identity(g) for g in grads]
        run.release()
        self._last = run
        return value, grads

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

    # -- what the last step did -------------------------------------------------------------

    def _last_run(self) -> _StepRun:
        if self._last is None:
            raise GradSplitError("no step has run yet: call step(*args) first.")
        return self._last

    @property
    def peak_live_residuals(self) -> list[int]:
        """Per stage, the most micro-batches whose residuals were alive at once in the last
        step (a forward's residuals live until its backward ran)."""
        return list(self._last_run().peak_live)

    def bytes_moved(self) -> dict[str, int]:
        """Bytes the last step moved between devices, by kind: ``"activations"`` and
        ``"cotangents"`` (between stages on different devices), ``"inputs"`` (arguments
        from this process to the stages that read them), ``"results"`` (losses and
        gradients back to this process) and ``"replicas"`` (variables refreshed on the
        stages' devices). A tensor counts when it is consumed on a device other than the one
        holding it; sizes are ``num_elements * dtype.size``."""
        return dict(self._last_run().moved)

    def timeline(self) -> list[TimelineEvent]:
        """Every action of the last step, in order of start time."""
        return sorted(self._last_run().events, key=lambda e: (e.start, e.device_index))

    def idle_fraction(self) -> IdleFraction:
        """``(measured, ideal)`` idle share of the devices in the last step."""
        events = self.timeline()
        span = max(e.end for e in events) - min(e.start for e in events)
        busy = sum(e.end - e.start for e in events)
        measured = 1.0 - busy / (self.num_stages * span) if span > 0 else 0.0
        return IdleFraction(measured, self._ideal_idle)

    def write_chrome_trace(self, path: str | os.PathLike) -> str:
        """Write the last step's timeline as Chrome trace JSON (open it in Perfetto or
        chrome://tracing): one thread per device, one complete event per action."""
        events: list[dict] = [
            {"name": "process_name", "ph": "M", "pid": 0,
             "args": {"name": f"gradsplit pipeline ({self.microbatches} micro-batches)"}},
        ]
        for d in range(self.num_stages):
            events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": d,
                           "args": {"name": f"device {d}: {self._device_label(d)}"}})
        for e in self.timeline():
            events.append({
                "name": f"{e.kind}{e.microbatch}",
                "cat": "forward" if e.kind == FORWARD else "backward",
                "ph": "X", "pid": 0, "tid": e.device_index,
                "ts": e.start * 1e6, "dur": (e.end - e.start) * 1e6,
                "args": {"stage": e.stage, "microbatch": e.microbatch, "device": e.device},
            })
        path = os.fspath(path)
        with open(path, "w") as f:
            json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, f)
        return path

    def plot_timeline(self, path: str | os.PathLike) -> str:
        """Draw the last step as a PNG Gantt chart: one row per device, one colour per stage,
        forwards plain and backwards hatched, the micro-batch index in each box."""
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
            from matplotlib.patches import Patch
        except ImportError:  # pragma: no cover - matplotlib is an optional extra
            raise GradSplitError(
                "plotting the timeline needs matplotlib; install it with pip install "
                "'gradsplit-compiler[render]' (or pip install matplotlib)."
            ) from None
        from gradsplit_compiler.show.render import stage_colour

        events = self.timeline()
        k = self.num_stages
        fig = Figure(figsize=(11, 1.2 + 0.6 * k))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        span = max(e.end for e in events) or 1.0
        for e in events:
            ax.barh(e.device_index, (e.end - e.start) * 1e3, left=e.start * 1e3, height=0.8,
                    color=stage_colour(e.stage), edgecolor="black", linewidth=0.5,
                    hatch="///" if e.kind == BACKWARD else None)
            if (e.end - e.start) > span / 150:
                ax.text((e.start + e.end) / 2 * 1e3, e.device_index, str(e.microbatch),
                        ha="center", va="center", fontsize=7)
        ax.set_yticks(range(k), [f"device {d}\n{self._device_label(d)}" for d in range(k)],
                      fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("time since step start (ms)")
        idle = self.idle_fraction()
        ax.set_title(
            f"{k} stages, {self.microbatches} micro-batches: idle {idle.measured:.0%} "
            f"(ideal {idle.ideal:.0%}); plain = forward, hatched = backward, number = "
            f"micro-batch", fontsize=9)
        handles = [Patch(facecolor=stage_colour(s), edgecolor="black", label=f"stage {s}")
                   for s in range(k)]
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="///",
                             label="backward"))
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
        fig.tight_layout()
        path = os.fspath(path)
        fig.savefig(path, format="png", dpi=100)
        return path

    def _device_label(self, d: int) -> str:
        device = self.devices[d]
        spec = tf.DeviceSpec.from_string(device)
        short = f"{spec.device_type}:{spec.device_index}"
        return short if spec.job in (None, "localhost") else device


# -- one step ---------------------------------------------------------------------------------


class _StepRun:
    """The state of one step, shared by the device threads under one condition variable.

    Activations wait in ``activations`` until every stage that reads them ran its forward;
    cotangents wait in ``cotangents`` (one entry per sending stage, summed in a fixed order
    so the result does not depend on thread timing) until their stage's backward takes them;
    residuals live in ``residuals`` from a forward to its backward.
    """

    def __init__(self, pipe: Pipeline, per_microbatch: list[list[tf.Tensor]]):
        split = pipe.split
        self.pipe = pipe
        self.args = per_microbatch
        self.arg_position = {n: i for i, n in enumerate(split.arg_names)}
        self.loss_name = split.output_names[0]
        self.readers: dict[str, int] = {}
        for runner in pipe._runners:
            for name in runner.inputs:
                if name not in self.arg_position:
                    self.readers[name] = self.readers.get(name, 0) + 1
        self.dependencies = pipe._dependencies
        self.condition = threading.Condition()
        self.done: set[Action] = set()
        self.failed = False
        self.errors: list[BaseException] = []
        self.activations: dict[tuple[str, int], tf.Tensor] = {}
        self.unread: dict[tuple[str, int], int] = {}
        self.cotangents: dict[tuple[str, int], dict[int, tf.Tensor]] = {}
        self.residuals: list[dict[int, tuple]] = [{} for _ in pipe._runners]
        self.live = [0] * pipe.num_stages
        self.peak_live = [0] * pipe.num_stages
        self.values: dict[int, tf.Tensor] = {}
        self.grads: list[list[tf.Tensor] | None] = [None] * pipe.num_stages
        self.events: list[TimelineEvent] = []
        self.running: dict[int, tuple[Action, float]] = {}
        self.moved = {"inputs": 0, "activations": 0, "cotangents": 0, "results": 0,
                      "replicas": 0}
        self.sync = any(_is_remote(r.device) for r in pipe._runners)
        loss_dtype = split.output_specs[0].dtype
        seed = tf.constant(1.0 / pipe.microbatches if pipe.loss_reduction == "mean" else 1.0,
                           loss_dtype)
        # The caller's cotangent of the loss comes first, as in run_stages: source K.
        for m in range(pipe.microbatches):
            self.cotangents[(self.loss_name, m)] = {pipe.num_stages: seed}

    def execute(self) -> None:
        self.start = time.perf_counter()
        threads = [
            threading.Thread(target=self._device_loop, args=(d,), daemon=True,
                             name=f"gradsplit-pipeline-device{d}")
            for d in range(self.pipe.num_stages)
        ]
        for t in threads:
            t.start()
        timeout = self.pipe.timeout
        # keep a little of the timeout to find out which task does not answer
        self.probe_time = 0.0 if timeout is None else min(2.0, timeout / 4)
        deadline = None if timeout is None else time.monotonic() + timeout - self.probe_time
        try:
            for t in threads:
                t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
                if t.is_alive():  # past the deadline
                    raise self._timed_out()
        except BaseException:  # KeyboardInterrupt, timeout: stop the devices before leaving
            self._fail(None)
            if deadline is None:
                for t in threads:
                    t.join()
            # else: a thread stuck in a call to a dead task stays behind (a daemon); its
            # results go nowhere, since this step is abandoned.
            raise
        if self.errors:
            raise self._blame(self.errors)

    def _blame(self, errors: list[BaseException]) -> BaseException:
        """The error to raise: when tasks of a cluster failed, the one about a task that no
        longer answers (when one task dies, calls to the others can fail too, and which
        thread reports first is a race)."""
        remote = [e for e in errors if isinstance(e, GradSplitError)
                  and isinstance(e.__cause__, tf.errors.OpError)]
        if not remote:
            return errors[0]
        used = list(dict.fromkeys(r.device for r in self.pipe._runners))
        wait = 5.0 if self.pipe.timeout is None else min(5.0, self.pipe.timeout)
        remote_used = [d for d in used if _is_remote(d)]
        # One dead task breaks this process's calls to every task, so ask the network first:
        # a task whose port refuses connections is gone.
        dead = [d for d in remote_used if _refuses_connections(d)]
        if not dead:
            dead = _unreachable(remote_used, wait)
        if not dead or len(dead) == len(used):
            return remote[0]
        stages = [r.index for r in self.pipe._runners if r.device in dead]
        tasks = ", ".join(_task_label(d) for d in dead)
        error = GradSplitError(
            f"{tasks} no longer answers (it died or stopped answering) during the step; "
            f"stage{'s' if len(stages) > 1 else ''} {', '.join(map(str, stages))} ran "
            f"there. First failure: {remote[0]} The step was abandoned and no variable of "
            f"the split changed; restart the cluster, connect again and build a new pipeline.")
        error.__cause__ = remote[0].__cause__
        return error

    def _timed_out(self) -> GradSplitError:
        with self.condition:
            if self.errors:  # an action failed just now: that is the news
                return self.errors[0]
            running = sorted(self.running.items(), key=lambda item: item[1][1])
            pending = [self.pipe.schedule[d][0] for d in range(self.pipe.num_stages)
                       if d not in self.running and not any(
                           e.device_index == d for e in self.events)]
        now = time.perf_counter() - self.start
        parts = [
            f"{action} of stage {action.stage} on {_task_label(self.pipe.devices[d])}, "
            f"running for {now - started:.1f} s"
            for d, (action, started) in running
        ]
        dead = _unreachable([d for d in dict.fromkeys(self.pipe.devices) if _is_remote(d)],
                            self.probe_time)
        if dead:
            parts.insert(0, f"{', '.join(_task_label(d) for d in dead)} does not answer")
        what = "; ".join(parts) if parts else (
            "nothing was running: waiting for " + ", ".join(map(str, pending or ["?"])))
        return GradSplitError(
            f"the pipeline step did not finish within timeout={self.pipe.timeout:g} s: "
            f"{what}. A worker that died or stopped answering does this. The step was "
            f"abandoned and no variable of the split changed; restart the cluster, connect "
            f"again, and build a new pipeline (or raise timeout= if the step is just slow)."
        )

    def _fail(self, error: BaseException | None) -> None:
        with self.condition:
            if error is not None:
                self.errors.append(error)
            self.failed = True
            self.condition.notify_all()

    def _device_loop(self, d: int) -> None:
        runner = self.pipe._runners[d]
        action = None
        try:
            self._refresh_replicas(runner)
            for action in self.pipe.schedule[d]:
                needs = self.dependencies.of(action)
                with self.condition:
                    self.condition.wait_for(
                        lambda needs=needs: self.failed or all(a in self.done for a in needs))
                    if self.failed:
                        return
                start = time.perf_counter() - self.start
                with self.condition:
                    self.running[d] = (action, start)
                with tf.device(runner.device):
                    if action.kind == FORWARD:
                        self._forward(runner, action.microbatch)
                    else:
                        self._backward(runner, action.microbatch)
                end = time.perf_counter() - self.start
                with self.condition:
                    del self.running[d]
                    self.events.append(TimelineEvent(
                        d, runner.device, action.kind, action.stage,
                        action.microbatch, start, end))
                    self.done.add(action)
                    self.condition.notify_all()
        except tf.errors.OpError as exc:
            if not _is_remote(runner.device):
                self._fail(_noted(exc, action, d, self.pipe))
                return
            doing = (f"running {action}" if action is not None
                     else "refreshing its variable replicas")
            error = GradSplitError(
                f"{_task_label(runner.device)} failed while {doing} of stage {runner.index}: "
                f"{type(exc).__name__}: {_first_line(exc.message)}.")
            error.__cause__ = exc
            self._fail(error)
        except BaseException as exc:
            self._fail(_noted(exc, action, d, self.pipe))

    def _refresh_replicas(self, runner: _StageRunner) -> None:
        """Copy the variables into this stage's replicas (each stage in its own thread, so
        that a dead task holds up only its stage)."""
        mine = [(idx, device) for idx, device in self.pipe._replicas
                if device == runner.device and idx in runner.variable_indices]
        for idx, device in mine:
            replica = self.pipe._replicas[(idx, device)]
            with tf.device(device):
                replica.assign(self.pipe.split.variables[idx])
            self._count("replicas", replica)
        if self.sync:
            _wait_for([self.pipe._replicas[key] for key in mine])

    def _count(self, kind: str, tensor: Any, device: str | None = None) -> None:
        """Add ``tensor``'s bytes under ``kind`` if it moves (held elsewhere than
        ``device``; ``device=None``: it always moves)."""
        if device is not None and _same_device(tensor.device, device):
            return
        size = tensor.shape.num_elements() or 0
        with self.condition:
            self.moved[kind] += size * tensor.dtype.size

    def _forward(self, runner: _StageRunner, m: int) -> None:
        with self.condition:
            inputs = [self._take_activation(name, m) for name in runner.inputs]
        for name, value in zip(runner.inputs, inputs):
            self._count("inputs" if name in self.arg_position else "activations", value,
                        runner.device)
        outputs, residuals = _run(runner.forward, *inputs)
        if self.sync:
            _wait_for(list(outputs) + list(residuals))
        with self.condition:
            for name, value in zip(runner.outputs, outputs):
                if self.readers.get(name):
                    self.activations[(name, m)] = value
                    self.unread[(name, m)] = self.readers[name]
                if name == self.loss_name:
                    self.values[m] = value
            self.residuals[runner.index][m] = (residuals, [o.shape for o in outputs])
            self.live[runner.index] += 1
            self.peak_live[runner.index] = max(self.peak_live[runner.index],
                                               self.live[runner.index])

    def _take_activation(self, name: str, m: int) -> tf.Tensor:
        if name in self.arg_position:
            return self.args[m][self.arg_position[name]]
        value = self.activations[(name, m)]
        self.unread[(name, m)] -= 1
        if not self.unread[(name, m)]:  # every reader has it: let it go
            del self.activations[(name, m)], self.unread[(name, m)]
        return value

    def _backward(self, runner: _StageRunner, m: int) -> None:
        with self.condition:
            residuals, shapes = self.residuals[runner.index].pop(m)
            received = [self.cotangents.pop((name, m), None) for name in runner.outputs]
        cotangents = []
        for by_source in received:
            for source, value in (by_source or {}).items():
                # source K: the caller's seed of the loss, sent from this process
                kind = "inputs" if source == self.pipe.num_stages else "cotangents"
                self._count(kind, value, runner.device)
        for by_source, shape, dtype in zip(received, shapes, runner.output_dtypes):
            if not by_source:  # nobody sends one (integer, or unused downstream)
                cotangents.append(tf.zeros(shape, dtype))
                continue
            sources = sorted(by_source, reverse=True)
            total = by_source[sources[0]]
            for s in sources[1:]:
                total = total + by_source[s]
            cotangents.append(total)
        input_cotangents, variable_grads = _run(runner.backward, residuals, cotangents)
        if self.sync:
            _wait_for([c for c in input_cotangents if c is not None] + list(variable_grads))
        del residuals  # dropped right after their backward
        k = runner.index
        if self.grads[k] is None:
            self.grads[k] = list(variable_grads)
        else:
            self.grads[k] = [a + g for a, g in zip(self.grads[k], variable_grads)]
        with self.condition:
            for name, cotangent in zip(runner.inputs, input_cotangents):
                if cotangent is not None and name not in self.arg_position:
                    self.cotangents.setdefault((name, m), {})[k] = cotangent
            self.live[k] -= 1

    def release(self) -> None:
        """Let go of the tensors; keep what the timeline and the memory counts need."""
        self.args = self.values = self.grads = None
        self.activations, self.cotangents = {}, {}
        self.residuals = [{} for _ in self.residuals]

    def value(self) -> tf.Tensor:
        for m in range(self.pipe.microbatches):
            self._count("results", self.values[m], self.pipe._home)
        total = self.values[0]
        for m in range(1, self.pipe.microbatches):
            total = total + self.values[m]
        if self.pipe.loss_reduction == "mean":
            total = total / tf.cast(self.pipe.microbatches, total.dtype)
        return total

    def gradients(self) -> list[tf.Tensor]:
        totals: dict[int, tf.Tensor] = {}
        for runner in reversed(self.pipe._runners):  # later stages first, as run_stages
            for grad in self.grads[runner.index]:
                self._count("results", grad, self.pipe._home)
            for idx, grad in zip(runner.variable_indices, self.grads[runner.index]):
                totals[idx] = totals[idx] + grad if idx in totals else grad
        return [
            totals[i] if i in totals else tf.zeros(v.shape, v.dtype)
            for i, v in enumerate(self.pipe.split.variables)
        ]


def _noted(exc: BaseException, action: Action | None, d: int, pipe: Pipeline) -> BaseException:
    if action is not None and hasattr(exc, "add_note"):
        exc.add_note(f"(while running {action} on device {d}: {pipe._device_label(d)})")
    return exc


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else "(no message)"


def _wait_for(tensors: list) -> None:
    """Block until remote ``tensors`` exist: a remote call returns before its task has run
    it, and its failure (or a hang) would surface later, in someone else's action. Asking
    a handle for its shape waits for the task."""
    for t in tensors:
        if t is not None:
            t.shape  # noqa: B018 - resolving the remote handle is the point


def _refuses_connections(device: str) -> bool:
    """Whether the server of ``device``'s task refuses TCP connections (its process is gone).
    ``False`` when unknown; a stopped (hung) process still accepts them."""
    import socket

    from tensorflow.python.eager import context

    spec = tf.DeviceSpec.from_string(device)
    server_def = getattr(context.context(), "_server_def", None)
    if server_def is None:
        return False
    for job in server_def.cluster.job:
        if job.name == spec.job and (spec.task or 0) in job.tasks:
            host, _, port = job.tasks[spec.task or 0].rpartition(":")
            try:
                with socket.create_connection((host, int(port)), timeout=1.0):
                    return False
            except ConnectionRefusedError:
                return True
            except (OSError, ValueError):
                return False
    return False


def _unreachable(devices: list[str], seconds: float) -> list[str]:
    """Those of ``devices`` that do not run a trivial op within ``seconds``."""
    answered: set[str] = set()

    def probe(device: str) -> None:
        try:
            with tf.device(device):
                tf.identity(tf.constant(0.0)).numpy()  # a copy back waits for the task
            answered.add(device)
        except Exception:  # any failure means it does not answer
            pass

    threads = [threading.Thread(target=probe, args=(d,), daemon=True) for d in devices]
    for t in threads:
        t.start()
    deadline = time.monotonic() + seconds
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return [d for d in devices if d not in answered]


def _is_remote(device: str) -> bool:
    """Whether ``device`` belongs to another process of a cluster (a task of a job)."""
    job = tf.DeviceSpec.from_string(device).job
    return job not in (None, "localhost")


def _same_device(a: str, b: str) -> bool:
    if not a or not b:
        return False
    x, y = tf.DeviceSpec.from_string(a), tf.DeviceSpec.from_string(b)
    return all(str(getattr(x, part)).upper() == str(getattr(y, part)).upper()
               for part in ("job", "replica", "task", "device_type", "device_index"))


def _task_label(device: str) -> str:
    spec = tf.DeviceSpec.from_string(device)
    if spec.job in (None, "localhost"):
        return f"device {device}"
    return f"task {spec.task} of job {spec.job!r} ({device})"


# -- checks and setup -------------------------------------------------------------------------


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
    if len(specs) != 1 or specs[0].shape.rank not in (0, None) or not specs[0].dtype.is_floating:
        got = ", ".join(f"{s.dtype.name}{s.shape}" for s in specs)
        raise GradSplitError(
            f"a pipeline needs fn to return one floating-point scalar (the loss); it returns "
            f"{got}. Reduce the output, e.g. with tf.reduce_mean."
        )


def _batched_arguments(split: Split) -> list[int]:
    """Arguments cut into micro-batches: those with a ``None`` leading dimension."""
    return [i for i, spec in enumerate(split.arg_specs)
            if spec.shape.rank is not None and spec.shape.rank >= 1 and spec.shape[0] is None]


def _arg_label(name: str) -> str:
    return name.rsplit(":", 1)[0]


def _resolve_devices(devices: Any, num_stages: int) -> list[str]:
    if devices is None:
        return [_default_device()] * num_stages
    if isinstance(devices, (str, bytes)) or not isinstance(devices, Sequence):
        raise GradSplitError(
            f"devices must be a list of device names, one per stage (e.g. ['/CPU:0', "
            f"'/CPU:1']); got {devices!r}."
        )
    names = [getattr(d, "name", d) for d in devices]  # tf.config.LogicalDevice works too
    if len(names) < num_stages:
        raise GradSplitError(
            f"the split has {num_stages} stages but only {len(names)} devices were given "
            f"({names}); give one device per stage (a name may repeat), or devices=None to "
            f"run every stage on the default device."
        )
    return [_resolve_device(n) for n in names[:num_stages]]


def _default_device() -> str:
    """The device an op lands on in a thread with no device scope (the device threads see:
    the caller's ``with tf.device`` does not reach them)."""
    placed: list[str] = []
    thread = threading.Thread(target=lambda: placed.append(tf.zeros([]).device))
    thread.start()
    thread.join()
    return placed[0]


def _resolve_device(name: Any) -> str:
    """The full name of the device ``name`` places ops on; refuses a device that TensorFlow
    would silently replace by another (soft placement)."""
    available = [d.name for d in tf.config.list_logical_devices()]
    try:
        wanted = tf.DeviceSpec.from_string(name)
        with tf.device(name):
            placed = tf.zeros([]).device
    except (TypeError, ValueError) as exc:
        raise GradSplitError(f"device {name!r} is not a device name: {exc}") from None
    got = tf.DeviceSpec.from_string(placed)
    for part in ("job", "replica", "task", "device_type", "device_index"):
        want = getattr(wanted, part)
        if want is not None and str(want).upper() != str(getattr(got, part)).upper():
            raise GradSplitError(
                f"device {name!r} does not exist here (TensorFlow would run on {placed} "
                f"instead); devices: {', '.join(available)}. More CPU devices come from "
                f"tf.config.set_logical_device_configuration before TensorFlow starts."
            )
    return placed


# Replicas and stage copies per split, so pipelines over one split share their XLA programs.
_REPLICA_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

# Functions and replicas ever placed on a task of a cluster, kept for the life of the process.
# When a tf.function is garbage-collected, eager TensorFlow asks every task of the cluster it
# is connected to *now* to forget it; after a reconnect to a restarted cluster, whose tasks
# never had it, that request fails ("Tried to remove non-existent function") and the failure
# surfaces in the next remote call, a step of an unrelated pipeline. Keeping them avoids that.
_KEEP_ALIVE: list = []


def _plan_replicas(split: Split, devices: list[str], jit_compile: bool):
    """``{(variable index, device): replica}`` for every variable a compiled stage reads on a
    device that does not hold it, and the written ones to copy back after a step."""
    if not jit_compile:  # a graph function reads across devices by itself
        return {}, []
    cache = _REPLICA_CACHE.setdefault(split, {"replicas": {}, "stages": {}})
    written = set(split._program.written_variables())
    readers: dict[int, int] = {}
    for stage in split.stages:
        for idx in stage.variable_indices:
            readers[idx] = readers.get(idx, 0) + 1
    replicas, copied_back = {}, []
    for stage, device in zip(split.stages, devices):
        for idx in stage.variable_indices:
            v = split.variables[idx]
            if v.device == device:
                continue
            if idx in written and readers[idx] > 1:
                raise GradSplitError(
                    f"variable {v.name!r} is assigned by the program and read by "
                    f"{readers[idx]} stages; stage {stage.index} runs on {device} but the "
                    f"variable lives on {v.device}, and XLA cannot read across devices. "
                    f"Create it under `with tf.device({device!r})`, or pass jit_compile=False."
                )
            key = (idx, device)
            cached = (idx, device, _incarnation(device))
            if cached not in cache["replicas"]:
                with tf.init_scope(), tf.device(device):
                    cache["replicas"][cached] = tf.Variable(
                        v.read_value(), trainable=v.trainable,
                        name=f"{v.name.split(':')[0]}_on_stage{stage.index}")
                    if _is_remote(device):
                        _KEEP_ALIVE.append(cache["replicas"][cached])
            replicas[key] = cache["replicas"][cached]
            if idx in written:
                copied_back.append(key)
    return replicas, copied_back


def _runner(split: Split, stage: Any, device: str, replicas: dict,
            jit_compile: bool) -> _StageRunner:
    mine = {idx: r for (idx, d), r in replicas.items() if d == device
            and idx in stage.variable_indices}
    # read the replicas on this device instead of the variables they stand for
    variables = [mine.get(idx, split.variables[idx]) for idx in stage.variable_indices] \
        if mine else None
    if jit_compile and _is_remote(device):
        forward, backward = stage.compiled(jit_compile, variables)
        wrappers = _REPLICA_CACHE.setdefault(split, {"replicas": {}, "stages": {}})
        key = ("remote", stage.index, device, _incarnation(device))
        if key not in wrappers["stages"]:
            wrappers["stages"][key] = _remote_callable(stage, forward, backward)
            _KEEP_ALIVE.append(wrappers["stages"][key])
        forward, backward = wrappers["stages"][key]
    else:
        forward, flat_backward = stage.callers(jit_compile, variables)

        def backward(residuals, cotangents, flat_backward=flat_backward):
            return flat_backward(*residuals, *cotangents)
    return _StageRunner(
        index=stage.index, device=device, forward=forward, backward=backward,
        inputs=list(stage.inputs), outputs=list(stage.outputs),
        output_dtypes=[s.dtype for s in stage.output_specs],
        variable_indices=list(stage.variable_indices),
    )


def _incarnation(device: str) -> Any:
    """What a replica on ``device`` is only valid for: the cluster this process is connected
    to (a restarted cluster has the same device names, but none of the old variables)."""
    if not _is_remote(device):
        return None
    from tensorflow.python.eager import context

    server_def = getattr(context.context(), "_server_def", None)
    return None if server_def is None else server_def.SerializeToString()


def _remote_callable(stage: Any, forward: Any, backward: Any) -> tuple[Any, Any]:
    """Plain functions that call the XLA ones, for a device of another process.

    TensorFlow 2.21 cannot run a ``jit_compile=True`` function as the top-level call on a
    remote task: eager raises ``InternalError: KernelAndDeviceOp does not support
    EagerFunctionParams``. Called from inside a plain function, the same XLA function runs
    on the task as a compiled cluster (``_XlaMustCompile``), as on a local device.
    """
    outer_forward = tf.function(lambda *inputs: forward(*inputs),
                                input_signature=stage.input_specs, autograph=False)
    outer_backward = tf.function(
        lambda residuals, cotangents: backward(residuals, cotangents),
        input_signature=[list(stage.residual_specs), list(stage.output_specs)],
        autograph=False)
    return outer_forward, outer_backward
