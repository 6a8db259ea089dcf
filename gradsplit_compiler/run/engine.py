"""The step engine: one pipelined forward and backward over micro-batches, a thread per
device.

Each device runs its list of the schedule in order; an action waits (on one condition
variable shared by the threads) until the actions it depends on are done. Activations wait
in a table until every stage that reads them ran its forward; cotangents wait, one entry per
sending stage, until their stage's backward takes them, and are summed in one fixed order
(the caller's seed first, then later stages first, as ``core.compose`` sums) so that the
result does not depend on thread timing; residuals live from a forward to its backward.
Variable gradients are summed with ``core.compose.GradientTotals`` in the same order.

The engine reads a pipeline only through ``StepPlan``; what a step leaves behind for the
timeline and the memory counts is a ``StepRecord``.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import tensorflow as tf

from gradsplit_compiler.core.compose import GradientTotals, sum_in_order
from gradsplit_compiler.core.xla import run_reporting_xla_errors
from gradsplit_compiler.run.devices import StageRunner, is_remote, same_device
from gradsplit_compiler.run.faults import (
    GRACE_AFTER_FAILURE,
    RESTART,
    action_failure,
    blame,
    timeout_error,
    wait_for,
)
from gradsplit_compiler.run.schedules import FORWARD, WEIGHT, Action, Dependencies

__all__ = ["ALLREDUCE", "StepPlan", "StepRecord", "StepRun", "TimelineEvent", "gather_outputs",
           "measured_idle_fraction"]


# The kind of a timeline event that is no action of a schedule: a stage's gradients
# all-reduced over the replicas of a grid (``run.grid``).
ALLREDUCE = "A"


class TimelineEvent(NamedTuple):
    """One action of the last step; ``start`` and ``end`` in seconds from the step start."""

    device_index: int
    device: str
    kind: str
    stage: int
    microbatch: int
    start: float
    end: float


def measured_idle_fraction(events: Sequence[TimelineEvent], num_devices: int) -> float:
    """The share of device time spent waiting between the first action's start and the last
    action's end (0 for an empty span).

    >>> events = [TimelineEvent(0, "/CPU:0", "F", 0, 0, 0.0, 0.5),
    ...           TimelineEvent(1, "/CPU:1", "F", 1, 0, 0.5, 1.0)]
    >>> measured_idle_fraction(events, 2)
    0.5
    """
    span = max(e.end for e in events) - min(e.start for e in events)
    busy = sum(e.end - e.start for e in events)
    return 1.0 - busy / (num_devices * span) if span > 0 else 0.0


@dataclass(frozen=True)
class StepPlan:
    """What the engine needs of a pipeline, named.

    ``runners[k]`` is stage ``k`` on its device; ``schedule`` holds one list per thread
    (per stage, or per device running several stages), each run in order;
    ``dependencies`` says what each action waits for; ``split_backward``: the schedule
    runs each backward as ``B`` (``backward_input``) and ``W`` (``backward_weight``).
    ``variables`` are the split's variables (gradients align with them; replicas are
    refreshed from them); ``arg_names`` its argument graph names; ``loss_name`` and
    ``loss_dtype`` its loss, the first output;
    ``aux_names`` its other outputs (batched, returned without a cotangent). ``home`` is
    the device of this process that results come back to; ``timeout`` bounds a step
    (``None``: wait). ``after_fault`` ends the error about a task that died or hung: what
    the caller does next (``faults.RESTART`` or ``faults.RESTART_AND_RESTORE``).
    """

    runners: tuple[StageRunner, ...]
    schedule: Sequence[Sequence[Action]]
    dependencies: Dependencies
    microbatches: int
    loss_reduction: str
    variables: tuple[tf.Variable, ...]
    arg_names: tuple[str, ...]
    loss_name: str
    loss_dtype: tf.DType
    home: str
    timeout: float | None
    aux_names: tuple[str, ...] = ()
    after_fault: str = RESTART
    forward_only: bool = False  # a schedule of forwards alone: no residual is kept
    split_backward: bool = False

    @property
    def num_stages(self) -> int:
        return len(self.runners)

    def list_runner(self, d: int) -> StageRunner:
        """The runner of the first stage in list ``d`` (its device is the list's)."""
        return self.runners[self.schedule[d][0].stage] if self.schedule[d] else \
            self.runners[d]


@dataclass(frozen=True)
class StepRecord:
    """What a finished step leaves to look at: every action's ``events`` (in the order they
    finished), per stage the ``peak_live`` micro-batches whose residuals were alive at once,
    the bytes ``moved`` between devices by kind, and per schedule list the
    ``peak_live_bytes`` of residuals (and of what ``W`` reads) alive at once."""

    events: tuple[TimelineEvent, ...]
    peak_live: tuple[int, ...]
    moved: dict[str, int]
    peak_live_bytes: tuple[int, ...] = ()
    residual_bytes: tuple[int, ...] = ()  # per stage, one micro-batch's
    weight_input_bytes: tuple[int, ...] = ()  # per stage, one micro-batch's (B to W)


class StepRun:
    """The state of one step, shared by the device threads under one condition variable.

    ``execute()`` runs the step (raising the first error, or the one blaming a task that no
    longer answers); then ``value()`` and ``gradients()`` sum the micro-batches, and
    ``record()`` keeps what the timeline and the memory counts need.
    """

    def __init__(self, plan: StepPlan, per_microbatch: list[list[tf.Tensor]],
                 seed_scale: float = 1.0):
        self.plan = plan
        self.args = per_microbatch
        self.arg_position = {n: i for i, n in enumerate(plan.arg_names)}
        self.readers: dict[str, int] = {}
        for runner in plan.runners:
            for name in runner.inputs:
                if name not in self.arg_position:
                    self.readers[name] = self.readers.get(name, 0) + 1
        self.condition = threading.Condition()
        self.done: set[Action] = set()
        self.failed = False
        self.errors: list[BaseException] = []
        self.activations: dict[tuple[str, int], tf.Tensor] = {}
        self.unread: dict[tuple[str, int], int] = {}
        self.cotangents: dict[tuple[str, int], dict[int, tf.Tensor]] = {}
        self.residuals: list[dict[int, tuple]] = [{} for _ in plan.runners]
        self.live = [0] * plan.num_stages
        self.peak_live = [0] * plan.num_stages
        self.weight_inputs: list[dict[int, list]] = [{} for _ in plan.runners]
        self.list_of = {a.stage: d for d, actions in enumerate(plan.schedule) for a in actions}
        self.live_bytes = [0] * len(plan.schedule)
        self.peak_live_bytes = [0] * len(plan.schedule)
        self.residual_bytes = [0] * plan.num_stages
        self.weight_input_bytes = [0] * plan.num_stages
        self.values: dict[int, tf.Tensor] = {}
        self.aux: dict[tuple[str, int], tf.Tensor] = {}
        self.grads: list[list[tf.Tensor] | None] = [None] * plan.num_stages
        self.events: list[TimelineEvent] = []
        self.running: dict[int, tuple[Action, float]] = {}
        self.moved = {"inputs": 0, "activations": 0, "cotangents": 0, "results": 0,
                      "replicas": 0, "gradients": 0, "scalars": 0}
        self.sync = any(is_remote(r.device) for r in plan.runners)
        # ``seed_scale``: a loss scale (mixed precision) multiplies every backward's seed.
        seed = tf.constant(
            (seed_scale / plan.microbatches if plan.loss_reduction == "mean" else seed_scale),
            plan.loss_dtype)
        # The caller's cotangent of the loss comes first, as in run_stages: source K.
        for m in range(plan.microbatches):
            self.cotangents[(plan.loss_name, m)] = {plan.num_stages: seed}

    def execute(self) -> None:
        self.start = time.perf_counter()
        self.finished: queue.SimpleQueue[int] = queue.SimpleQueue()
        threads = [
            threading.Thread(target=self._device_loop, args=(d,), daemon=True,
                             name=f"gradsplit-pipeline-device{d}")
            for d in range(len(self.plan.schedule))
        ]
        for t in threads:
            t.start()
        timeout = self.plan.timeout
        # keep a little of the timeout to find out which task does not answer
        self.probe_time = 0.0 if timeout is None else min(2.0, timeout / 4)
        deadline = None if timeout is None else time.monotonic() + timeout - self.probe_time
        try:
            # Wait for every device; on a cluster, once an action has failed, only a little
            # longer: when a task dies, calls to the other tasks can hang rather than fail.
            done, cut_short = 0, False
            while done < len(threads):
                if self.errors and self.sync and not cut_short:
                    grace = time.monotonic() + GRACE_AFTER_FAILURE
                    deadline = grace if deadline is None else min(deadline, grace)
                    cut_short = True
                try:
                    self.finished.get(timeout=None if deadline is None
                                      else max(0.0, deadline - time.monotonic()))
                except queue.Empty:  # past the deadline
                    break
                done += 1
            if done < len(threads) and not cut_short:
                raise self._timed_out()
            # else: cut short, the failure is the news (blamed below)
        except BaseException:  # KeyboardInterrupt, timeout: stop the devices before leaving
            self._fail(None)
            if deadline is None:
                for t in threads:
                    t.join()
            # else: a thread stuck in a call to a dead task stays behind (a daemon); its
            # results go nowhere, since this step is abandoned.
            raise
        if done < len(threads):
            self._fail(None)  # the threads left behind stop at their next action
        if self.errors:
            raise blame(self.errors, self.plan.runners, self.plan.timeout,
                        self.plan.after_fault)

    def _timed_out(self) -> BaseException:
        with self.condition:
            if self.errors:  # an action failed just now: that is the news
                return self.errors[0]
            running = sorted(self.running.items(), key=lambda item: item[1][1])
            waiting = [self.plan.schedule[d][0] for d in range(len(self.plan.schedule))
                       if d not in self.running and self.plan.schedule[d] and not any(
                           e.device_index == d for e in self.events)]
        now = time.perf_counter() - self.start
        return timeout_error(
            self.plan.timeout,
            [(action, self.plan.runners[action.stage].device, now - started)
             for d, (action, started) in running],
            waiting, [r.device for r in self.plan.runners], self.probe_time,
            self.plan.after_fault)

    def _fail(self, error: BaseException | None) -> None:
        with self.condition:
            if error is not None:
                self.errors.append(error)
            self.failed = True
            self.condition.notify_all()

    def _device_loop(self, d: int) -> None:
        runner = self.plan.list_runner(d)
        action = None
        try:
            for k in sorted({a.stage for a in self.plan.schedule[d]}):
                runner = self.plan.runners[k]
                self._refresh_replicas(runner)
            for action in self.plan.schedule[d]:
                runner = self.plan.runners[action.stage]
                needs = self.plan.dependencies.of(action)
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
                    elif action.kind == WEIGHT:
                        self._weight(runner, action.microbatch)
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
        except BaseException as exc:
            self._fail(action_failure(exc, action, d, runner))
        finally:
            self.finished.put(d)

    def _refresh_replicas(self, runner: StageRunner) -> None:
        """Copy the variables into this stage's replicas (each stage in its own thread, so
        that a dead task holds up only its stage)."""
        for idx, replica in runner.replicas:
            with tf.device(runner.device):
                replica.assign(self.plan.variables[idx])
            self.count("replicas", replica)
        if self.sync:
            wait_for([replica for _, replica in runner.replicas])

    def count(self, kind: str, tensor: Any, device: str | None = None) -> None:
        """Add ``tensor``'s bytes under ``kind`` if it moves (held elsewhere than
        ``device``; ``device=None``: it always moves)."""
        if device is not None and same_device(tensor.device, device):
            return
        size = tensor.shape.num_elements() or 0
        with self.condition:
            self.moved[kind] += size * tensor.dtype.size

    def _forward(self, runner: StageRunner, m: int) -> None:
        with self.condition:
            inputs = [self._take_activation(name, m) for name in runner.inputs]
        for name, value in zip(runner.inputs, inputs):
            self.count("inputs" if name in self.arg_position else "activations", value,
                        runner.device)
        outputs, residuals = run_reporting_xla_errors(runner.forward, *inputs)
        if self.sync:
            wait_for(list(outputs) + list(residuals))
        with self.condition:
            for name, value in zip(runner.outputs, outputs):
                if self.readers.get(name):
                    self.activations[(name, m)] = value
                    self.unread[(name, m)] = self.readers[name]
                if name == self.plan.loss_name:
                    self.values[m] = value
                if name in self.plan.aux_names:
                    self.aux[(name, m)] = value
            if self.plan.forward_only:
                return
            self.residuals[runner.index][m] = (residuals, [o.shape for o in outputs])
            self.live[runner.index] += 1
            self.peak_live[runner.index] = max(self.peak_live[runner.index],
                                               self.live[runner.index])
            self.residual_bytes[runner.index] = _nbytes(residuals)
            self._hold(runner.index, self.residual_bytes[runner.index])

    def _take_activation(self, name: str, m: int) -> tf.Tensor:
        if name in self.arg_position:
            return self.args[m][self.arg_position[name]]
        value = self.activations[(name, m)]
        self.unread[(name, m)] -= 1
        if not self.unread[(name, m)]:  # every reader has it: let it go
            del self.activations[(name, m)], self.unread[(name, m)]
        return value

    def _backward(self, runner: StageRunner, m: int) -> None:
        with self.condition:
            residuals, shapes = self.residuals[runner.index].pop(m)
            received = [self.cotangents.pop((name, m), None) for name in runner.outputs]
        cotangents = []
        for by_source in received:
            for source, value in (by_source or {}).items():
                # source K: the caller's seed of the loss, sent from this process
                kind = "inputs" if source == self.plan.num_stages else "cotangents"
                self.count(kind, value, runner.device)
        for by_source, shape, dtype in zip(received, shapes, runner.output_dtypes):
            if not by_source:  # nobody sends one (integer, or unused downstream)
                cotangents.append(tf.zeros(shape, dtype))
                continue
            # the caller's seed (source K) first, then later stages first, as compose sums
            cotangents.append(sum_in_order([by_source[s]
                                            for s in sorted(by_source, reverse=True)]))
        k = runner.index
        held = _nbytes(residuals)
        if self.plan.split_backward:
            input_cotangents, weight_inputs = run_reporting_xla_errors(
                runner.backward_input, residuals, cotangents)
            if self.sync:
                wait_for([c for c in input_cotangents if c is not None])
            with self.condition:
                self.weight_inputs[k][m] = weight_inputs
                self.weight_input_bytes[k] = _nbytes(weight_inputs)
                self._hold(k, self.weight_input_bytes[k])
        else:
            input_cotangents, variable_grads = run_reporting_xla_errors(
                runner.backward, residuals, cotangents)
            if self.sync:
                wait_for([c for c in input_cotangents if c is not None] + list(variable_grads))
            self._add_gradients(k, variable_grads)
        del residuals  # dropped right after their backward (W keeps what it reads)
        with self.condition:
            for name, cotangent in zip(runner.inputs, input_cotangents):
                if cotangent is not None and name not in self.arg_position:
                    self.cotangents.setdefault((name, m), {})[k] = cotangent
            self._hold(k, -held)
            if not self.plan.split_backward:
                self.live[k] -= 1

    def _weight(self, runner: StageRunner, m: int) -> None:
        k = runner.index
        with self.condition:
            weight_inputs = self.weight_inputs[k].pop(m)
        variable_grads = run_reporting_xla_errors(runner.backward_weight, weight_inputs)
        if self.sync:
            wait_for(list(variable_grads))
        self._add_gradients(k, variable_grads)
        with self.condition:
            self._hold(k, -_nbytes(weight_inputs))
            self.live[k] -= 1

    def _add_gradients(self, k: int, variable_grads: Sequence[tf.Tensor]) -> None:
        """Add one micro-batch's variable gradients of stage ``k`` (micro-batches finish in
        each stage's schedule order, one thread per stage)."""
        if self.grads[k] is None:
            self.grads[k] = list(variable_grads)
        else:
            self.grads[k] = [a + g for a, g in zip(self.grads[k], variable_grads)]

    def _hold(self, k: int, nbytes: int) -> None:
        """Count ``nbytes`` more (fewer, if negative) residual bytes alive on stage ``k``'s
        list; under the condition."""
        d = self.list_of[k]
        self.live_bytes[d] += nbytes
        self.peak_live_bytes[d] = max(self.peak_live_bytes[d], self.live_bytes[d])

    # -- after the step ----------------------------------------------------------------------

    def micro_values(self) -> list[tf.Tensor]:
        """The loss of each micro-batch, in order, where its stage computed it."""
        return [self.values[m] for m in range(self.plan.microbatches)]

    def value(self) -> tf.Tensor:
        """The loss over the whole batch: the micro-batch values summed in order (their
        mean for ``loss_reduction="mean"``)."""
        for m in range(self.plan.microbatches):
            self.count("results", self.values[m], self.plan.home)
        total = sum_in_order([self.values[m] for m in range(self.plan.microbatches)])
        if self.plan.loss_reduction == "mean":
            total = total / tf.cast(self.plan.microbatches, total.dtype)
        return total

    def gradients(self) -> list[tf.Tensor]:
        """Per variable, the gradient summed over stages (later stages first, as compose
        sums) and micro-batches; zeros for a variable no stage reads."""
        totals = GradientTotals([lambda v=v: tf.zeros(v.shape, v.dtype)
                                 for v in self.plan.variables])
        for runner in reversed(self.plan.runners):  # later stages first, as compose sums
            for grad in self.grads[runner.index]:
                self.count("results", grad, self.plan.home)
            totals.add(runner.variable_indices, self.grads[runner.index])
        return totals.result()

    def aux_outputs(self) -> list[tf.Tensor]:
        """The outputs after the loss, each the micro-batches' values concatenated along
        the batch dimension."""
        return gather_outputs([[self.aux[(name, m)] for m in range(self.plan.microbatches)]
                               for name in self.plan.aux_names], self.plan.home, self.count)

    def stage_gradients(self) -> list[list[tf.Tensor]]:
        """Per stage, its variable gradients summed over the micro-batches, on the stage's
        device (aligned with the stage's ``variable_indices``); nothing moves."""
        return [list(g) for g in self.grads]

    def record(self) -> StepRecord:
        """What the timeline and the memory counts need; none of the step's tensors."""
        with self.condition:
            return StepRecord(tuple(self.events), tuple(self.peak_live), dict(self.moved),
                              tuple(self.peak_live_bytes), tuple(self.residual_bytes),
                              tuple(self.weight_input_bytes))


def gather_outputs(parts_per_output: Sequence[Sequence[tf.Tensor]], home: str,
                   count: Any) -> list[tf.Tensor]:
    """Each output's micro-batch values (counted as ``"results"`` moving to ``home``)
    concatenated along the batch dimension on ``home``."""
    outputs = []
    for parts in parts_per_output:
        for part in parts:
            count("results", part, home)
        with tf.device(home):
            outputs.append(tf.concat(list(parts), axis=0) if len(parts) > 1 else
                           tf.identity(parts[0]))
    return outputs


def _nbytes(*groups: Sequence[Any]) -> int:
    """Bytes of the distinct tensors in ``groups`` (a residual that is also a stage output or
    input counts once)."""
    seen, total = set(), 0
    for group in groups:
        for t in group or ():
            if t is None or id(t) in seen:
                continue
            seen.add(id(t))
            total += (t.shape.num_elements() or 0) * t.dtype.size
    return total
