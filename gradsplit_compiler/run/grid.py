"""Data parallelism times pipeline parallelism: ``gsc.pipeline`` over a grid of devices.

``devices=[[d0, d2], [d1, d3]]`` gives one list per stage, a device per replica: ``R``
replicas of a ``K``-stage pipeline (here 2 x 2). Replica ``r`` is a ``Pipeline`` over
``[devices[0][r], ..., devices[K-1][r]]`` with its own stage-resident copies and optimizers
(``run.training``); stage ``k``'s group is the ``R`` devices ``devices[k]``. A
``train_step``:

1. cuts the batch into ``R`` equal shares (``R x M`` must divide it) and runs each
   replica's schedule on its share, one replica per thread, every backward seeded ``1/R``
   times the pipeline's seed for a mean loss (1 for a sum), so that the sum over the
   replicas is the full-batch gradient;
2. all-reduces (sums) each stage's trainable gradients within its group with TensorFlow's
   collective all-reduce (``tf.raw_ops.CollectiveReduceV2``, the op MultiWorkerMirroredStrategy
   runs; a ring on CPUs): one op per stage, replica and dtype, the gradients of that dtype
   flattened into one vector, launched on every member device at once (one thread each),
   with the pipeline's ``timeout`` as the op's own. Every member receives the same sum;
3. every replica applies its optimizers to its own copies (``TrainingState.update``):
   the same gradients, so the global norm for clipping, the finiteness check and every
   update are the same on every replica, and the copies stay bitwise equal. A variable
   read by several stages (tied) sums its stages' all-reduced gradients as in one replica.

The loss is the full-batch value: the mean of the replicas' values for a mean loss, their
sum for a sum. ``save`` writes each stage's state once, from replica 0, in the format of a
one-replica pipeline, so a checkpoint restores into any grid shape or plain pipeline of the
same program (and ``restore`` reads one into every replica).

A failure in a replica's schedule (a task of a cluster that died) raises the
``GradSplitError`` the pipeline raises (naming the task and the stage) prefixed by the
replica; one during the all-reduce names the task, the stage and the replica, detected
within ``faults.GRACE_AFTER_FAILURE`` of the first failed member or by the timeout.

>>> is_grid([["/CPU:0"], ["/CPU:1"]])
True
"""

from __future__ import annotations

import itertools
import math
import os
import queue
import threading
import time
from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from gradsplit_compiler.core.compose import sum_in_order
from gradsplit_compiler.core.split import Split
from gradsplit_compiler.errors import GradSplitError
from gradsplit_compiler.run.devices import (
    device_label,
    is_grid,
    is_remote,
    keep_alive,
    resolve_grid,
)
from gradsplit_compiler.run.engine import ALLREDUCE, TimelineEvent, measured_idle_fraction
from gradsplit_compiler.run.faults import (
    GRACE_AFTER_FAILURE,
    RESTART_AND_RESTORE,
    refuses_connections,
    task_label,
    unreachable,
    wait_for,
)
from gradsplit_compiler.run.pipeline import IdleFraction, Pipeline

__all__ = ["GridPipeline", "allreduce_bytes", "is_grid"]

# Collective group and instance keys are process-wide: a key names one group of devices (or
# one all-reduce) for the life of the process.
_KEYS = threading.Lock()
_GROUP_KEYS = itertools.count(1)
_INSTANCE_KEYS = itertools.count(1)


def allreduce_bytes(gradient_bytes: int, replicas: int) -> int:
    """Bytes a ring all-reduce of ``gradient_bytes`` over ``replicas`` devices sends in
    total: each device sends ``2 (R - 1) / R`` of them (a reduce-scatter, then an
    all-gather, ``R - 1`` chunks of ``1/R`` each), ``2 (R - 1)`` times them over the group.

    >>> allreduce_bytes(800, 2), allreduce_bytes(800, 4), allreduce_bytes(800, 1)
    (1600, 4800, 0)
    """
    return 2 * (replicas - 1) * gradient_bytes


class GridPipeline:
    """``R`` replicas of a ``K``-stage pipeline whose stages' gradients are all-reduced; built
    by ``gsc.pipeline`` when ``devices`` is a grid (see the module docstring).

    Attributes
    ----------
    split, microbatches, loss_reduction, jit_compile, timeout, num_stages, schedule, remat
        As for ``Pipeline`` (each replica's).
    devices : list of list of str
        The grid: per stage, the full name of each replica's device.
    replicas : list of Pipeline
        Replica ``r``'s pipeline (its stages on ``devices[k][r]``).
    """

    def __init__(self, split: Split, microbatches: int, schedule: Any, devices: Any, *,
                 loss_reduction: str | None, optimizer: Any, clip_global_norm: Any,
                 on_nonfinite: str, jit_compile: bool, timeout: float | None, remat: Any):
        def replica(row: Sequence[str]) -> Pipeline:
            return Pipeline(split, microbatches, schedule, row,
                            loss_reduction=loss_reduction, optimizer=optimizer,
                            clip_global_norm=clip_global_norm, on_nonfinite=on_nonfinite,
                            jit_compile=jit_compile, timeout=timeout, remat=remat,
                            # the all-reduce comes between a replica's schedule and its
                            # update: never one program, even with its stages on one device
                            one_program=False)

        if not isinstance(split, Split):
            replica(devices)  # refuses it, as a pipeline does
        if optimizer is None:
            raise GradSplitError(
                "a grid of devices (one list per stage, a device per replica) trains its "
                "replicas together: it needs optimizer= (a Keras optimizer), with which "
                "train_step all-reduces each stage's gradients and updates every replica. "
                "For gradients alone, give a plain list of devices, one per stage.")
        self.devices = resolve_grid(devices, len(split.stages))
        self.num_replicas = len(self.devices[0])
        self._batched = [i for i, spec in enumerate(split.arg_specs)
                         if spec.shape.rank and spec.shape[0] is None]
        if self.num_replicas > 1 and not self._batched:
            raise GradSplitError(
                f"a grid of {self.num_replicas} replicas cuts the batch into "
                f"{self.num_replicas} shares, but no argument of fn has a batch dimension "
                "(a None leading dimension in input_signature). Declare the batch dimension "
                "as None, or give one device per stage (a plain list).")
        self.replicas = [replica([row[r] for row in self.devices])
                         for r in range(self.num_replicas)]
        first = self.replicas[0]
        self.split, self.microbatches = split, microbatches
        self.loss_reduction, self.jit_compile = loss_reduction, first.jit_compile
        self.timeout, self.num_stages = timeout, first.num_stages
        self.schedule, self.remat, self.optimizer = first.schedule, first.remat, optimizer
        with _KEYS:
            self._group_keys = [next(_GROUP_KEYS) for _ in range(self.num_stages)]
        # per stage, the positions (in its variable_indices) of its trainable variables
        self._trainable = [[j for j, idx in enumerate(stage.variable_indices)
                            if split.variables[idx].trainable] for stage in split.stages]
        self._reducers: dict[tuple[int, int], Any] = {}
        self._steps = 0
        self._events: list[TimelineEvent] | None = None
        self._moved: dict[str, int] = {}

    def __repr__(self) -> str:
        return (f"GridPipeline({self.num_stages} stages x {self.num_replicas} replicas, "
                f"{self.microbatches} micro-batches, "
                f"loss_reduction={self.loss_reduction!r})")

    @property
    def grid(self) -> tuple[int, int]:
        """``(stages, replicas)``."""
        return self.num_stages, self.num_replicas

    # -- a step ----------------------------------------------------------------------------

    def train_step(self, *args) -> tf.Tensor:
        """One training step over the whole batch (see the module docstring); returns the
        full-batch loss. Equal, up to rounding, to the same optimizer on
        ``split.value_and_gradients(*args)``. A failure changes no variable, except that
        a task that dies during the update takes its copies with it (restore the last
        checkpoint into a new pipeline)."""
        tensors = self.split.check_arguments(list(args))
        shares = self._shares(tensors)
        factor = 1.0 / self.num_replicas if self.loss_reduction == "mean" else 1.0
        origin = time.perf_counter()
        self._events = None
        # The first step traces and checks each replica: one after the other.
        outcomes = self._on_replicas(
            lambda r: self.replicas[r].run_share(shares[r], factor),
            together=self._steps > 0)
        failed = [(r, out) for r, out in enumerate(outcomes) if isinstance(out, BaseException)]
        if failed:
            error = self._replica_error(*self._first_failure(failed))
            for r, out in enumerate(outcomes):
                if not isinstance(out, BaseException):
                    self.replicas[r].undo_share(out[1], error)
            raise error
        runs = [run for run, _ in outcomes]
        restores = [restore for _, restore in outcomes]

        def undo(error: BaseException) -> None:
            for replica, restore in zip(self.replicas, restores):
                replica.undo_share(restore, error)

        try:
            reduced, reduce_events = self._all_reduce([run.stage_gradients() for run in runs],
                                                      origin)
        except BaseException as exc:
            undo(exc)
            raise
        updates = self._on_replicas(
            lambda r: self.replicas[r].training_state.update(
                reduced[r], runs[r].count, self.replicas[r].runners), together=True)
        failed = [(r, out) for r, out in enumerate(updates) if isinstance(out, BaseException)]
        if failed:
            error = self._replica_error(*self._first_failure(failed))
            undo(error)
            raise error
        if updates[0] == "skipped":
            for restore in restores:
                restore()
        values = [replica.value_of_share(run) for replica, run in zip(self.replicas, runs)]
        self._record(runs, reduce_events, origin)
        self._steps += 1
        return self._combine(values)

    def _shares(self, tensors: list[tf.Tensor]) -> list[list[tf.Tensor]]:
        """The batch cut into ``R`` equal shares (unbatched arguments whole in each)."""
        batched = self._batched
        r, m = self.num_replicas, self.microbatches
        if batched:
            batch = tensors[batched[0]].shape[0]
            if batch is not None and (batch % (r * m) or batch < r * m):
                raise GradSplitError(
                    f"a batch of {batch} does not cut into {r} replicas x {m} micro-batches "
                    f"of equal size; give a batch that {r * m} divides ({r * m}, "
                    f"{2 * r * m}, {3 * r * m}, ...), or fewer micro-batches.")
        pieces = [tf.split(t, r, axis=0) if i in batched and r > 1 else [t] * r
                  for i, t in enumerate(tensors)]
        return [[p[j] for p in pieces] for j in range(r)]

    def _combine(self, values: list[Any]) -> Any:
        """The full-batch value from the replicas' values: the loss averaged (a mean) or
        summed, the other outputs concatenated along the batch."""
        flat = [tf.nest.flatten(v) for v in values]
        losses = [f[0] for f in flat]
        loss = sum_in_order(losses)
        if self.loss_reduction == "mean":
            loss = loss / tf.cast(len(losses), loss.dtype)
        if len(flat[0]) == 1:
            return loss
        rest = [tf.concat([f[i] for f in flat], axis=0) for i in range(1, len(flat[0]))]
        return tf.nest.pack_sequence_as(values[0], [loss, *rest])

    def _on_replicas(self, work, together: bool) -> list:
        """``work(r)`` for every replica, in a thread each (``together``) or in turn; per
        replica its result or the exception it raised. Each replica's work is bounded by
        the pipeline's own ``timeout``."""
        results: list = [None] * self.num_replicas

        def run(r: int) -> None:
            try:
                results[r] = work(r)
            except BaseException as exc:  # reported by the caller
                results[r] = exc

        if not together or self.num_replicas == 1:
            for r in range(self.num_replicas):
                run(r)
            return results
        threads = [threading.Thread(target=run, args=(r,), daemon=True,
                                    name=f"gradsplit-replica{r}")
                   for r in range(self.num_replicas)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results

    def _first_failure(self, failed: list[tuple[int, BaseException]]
                       ) -> tuple[int, BaseException]:
        """Of the replicas that failed, one that ran on a task of a cluster that is gone:
        when a task dies, this process's calls to the other tasks can fail too, and the
        replica whose own task died is the news. Else the first."""
        if len(failed) == 1 or not any(is_remote(d) for row in self.devices for d in row):
            return failed[0]
        for r, error in failed:
            if any(refuses_connections(row[r]) for row in self.devices):
                return r, error
        return failed[0]

    def _replica_error(self, r: int, error: BaseException) -> BaseException:
        """``error`` of replica ``r``; one about a task of a cluster names the replica."""
        if not (isinstance(error, GradSplitError)
                and isinstance(error.__cause__, tf.errors.OpError)):
            return error
        where = ", ".join(f"stage {k} on {device_label(row[r])}"
                          for k, row in enumerate(self.devices))
        named = GradSplitError(f"replica {r} of the grid failed ({where}): {error}")
        named.__cause__ = error.__cause__
        return named

    # -- the all-reduce --------------------------------------------------------------------

    def _reducer(self, k: int, r: int, grads: Sequence[tf.Tensor]) -> Any:
        """The function that sums stage ``k``'s trainable gradients over its group, run on
        replica ``r``'s device: per dtype, one ``CollectiveReduceV2`` of the flattened
        gradients."""
        key = (k, r)
        if key not in self._reducers:
            size = self.num_replicas
            op_timeout = float(self.timeout or 0.0)  # 0: no timeout of the op's own
            groups: dict[tf.DType, list[int]] = {}
            for j, g in enumerate(grads):
                groups.setdefault(g.dtype, []).append(j)
            shapes = [g.shape for g in grads]

            def reduce(gradients, group_key, instance_keys):
                out = list(gradients)
                for i, members in enumerate(groups.values()):
                    flat = tf.concat([tf.reshape(gradients[j], [-1]) for j in members], 0)
                    summed = tf.raw_ops.CollectiveReduceV2(
                        input=flat, group_size=size, group_key=group_key,
                        instance_key=instance_keys[i], ordering_token=[], merge_op="Add",
                        final_op="Id", timeout_seconds=op_timeout)
                    parts = tf.split(summed, [shapes[j].num_elements() for j in members])
                    for j, part in zip(members, parts):
                        out[j] = tf.reshape(part, shapes[j])
                return out

            function = tf.function(reduce, autograph=False)
            if is_remote(self.devices[k][r]):
                keep_alive(function)  # see devices.keep_alive
            self._reducers[key] = (function, len(groups))
        return self._reducers[key]

    def _all_reduce(self, grads: list[list[list[tf.Tensor]]], origin: float):
        """Per replica, per stage, the stage's gradients with the trainable ones summed over
        the stage's group; the all-reduce's timeline events. Every member device's op runs
        in a thread of its own (a collective blocks until its whole group joined)."""
        R, K = self.num_replicas, self.num_stages
        if R == 1:
            return grads, []
        todo = [(k, r) for k in range(K) if self._trainable[k] for r in range(R)]
        with _KEYS:
            keys = {}
            for k in range(K):
                if self._trainable[k]:
                    count = self._reducer(k, 0, [grads[0][k][j] for j in self._trainable[k]])[1]
                    keys[k] = [next(_INSTANCE_KEYS) for _ in range(count)]
        reduced = [[list(g) for g in per_stage] for per_stage in grads]
        events: list[tuple[int, int, float, float, int]] = []  # k, r, start, end, bytes
        errors: dict[tuple[int, int], BaseException] = {}
        finished: queue.SimpleQueue = queue.SimpleQueue()

        def work(k: int, r: int) -> None:
            try:
                device = self.devices[k][r]
                mine = [grads[r][k][j] for j in self._trainable[k]]
                function, _ = self._reducer(k, r, mine)
                start = time.perf_counter() - origin
                with tf.device(device):
                    out = function(mine, tf.constant(self._group_keys[k]),
                                   [tf.constant(i) for i in keys[k]])
                if is_remote(device):
                    wait_for(out)
                for j, g in zip(self._trainable[k], out):
                    reduced[r][k][j] = g
                events.append((k, r, start, time.perf_counter() - origin,
                               sum(_nbytes(g) for g in mine)))
            except BaseException as exc:  # reported below
                errors[(k, r)] = exc
            finally:
                finished.put((k, r))

        threads = [threading.Thread(target=work, args=job, daemon=True,
                                    name=f"gradsplit-allreduce-s{job[0]}r{job[1]}")
                   for job in todo]
        for t in threads:
            t.start()
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        done, cut_short = 0, False
        while done < len(threads):
            if errors and not cut_short:  # the others may wait on a dead member: briefly
                grace = time.monotonic() + GRACE_AFTER_FAILURE
                deadline = grace if deadline is None else min(deadline, grace)
                cut_short = True
            try:
                finished.get(timeout=None if deadline is None
                             else max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            done += 1
        if errors or done < len(threads):
            raise self._all_reduce_error(errors, [j for j in todo if j not in errors])
        return reduced, events

    def _all_reduce_error(self, errors: dict, unfinished: list) -> GradSplitError:
        """The error of an all-reduce that failed or did not finish: the task that no
        longer answers (with its stage and replica) if one is found, else the first
        failure."""
        members = [(k, r) for k in range(self.num_stages) for r in range(self.num_replicas)]
        remote = list(dict.fromkeys(self.devices[k][r] for k, r in members
                                    if is_remote(self.devices[k][r])))
        dead = [d for d in remote if refuses_connections(d)]
        if not dead and remote:
            dead = unreachable(remote, 5.0 if self.timeout is None else min(5.0, self.timeout))
        if dead:
            where = "; ".join(
                f"{task_label(d)} ran stage {k} of replica {r}"
                for d in dead for k, r in members if self.devices[k][r] == d)
            first = next(iter(errors.values()), None)
            said = f" First failure: {type(first).__name__}: {_first_line(first)}." \
                if first is not None else ""
            error = GradSplitError(
                f"a device no longer answers (it died or stopped answering) during the "
                f"all-reduce of the gradients: {where}.{said} No variable changed; "
                f"{RESTART_AND_RESTORE}.")
        elif errors:
            (k, r), first = next(iter(errors.items()))
            error = GradSplitError(
                f"the all-reduce of stage {k}'s gradients failed on replica {r} "
                f"({device_label(self.devices[k][r])}): {type(first).__name__}: "
                f"{_first_line(first)}. No variable changed.")
        else:
            waiting = ", ".join(f"stage {k} of replica {r} on "
                                f"{device_label(self.devices[k][r])}" for k, r in unfinished)
            error = GradSplitError(
                f"the all-reduce of the gradients did not finish within "
                f"timeout={self.timeout:g} s (waiting: {waiting}). No variable changed; "
                f"{RESTART_AND_RESTORE} (or raise timeout= if it is just slow).")
        first = next(iter(errors.values()), None)
        if first is not None:
            error.__cause__ = first
        return error

    # -- what the last step did --------------------------------------------------------------

    def _record(self, runs: list, reduce_events: list, origin: float) -> None:
        lists = len(self.schedule)
        list_of = {a.stage: d for d, actions in enumerate(self.schedule) for a in actions}
        events = []
        for r, run in enumerate(runs):
            shift = run.start - origin
            for e in self.replicas[r].last_record().events:
                events.append(TimelineEvent(r * lists + e.device_index, e.device, e.kind,
                                            e.stage, e.microbatch, e.start + shift,
                                            e.end + shift))
        sent = 0
        for k, r, start, end, nbytes in reduce_events:
            events.append(TimelineEvent(r * lists + list_of.get(k, k), self.devices[k][r],
                                        ALLREDUCE, k, -1, start, end))
            # a ring member sends 2 (R - 1) / R of what it gives the op
            sent += allreduce_bytes(nbytes, self.num_replicas) // self.num_replicas
        self._events = events
        moved: dict[str, int] = {}
        for replica in self.replicas:
            for kind, count in replica.last_record().moved.items():
                moved[kind] = moved.get(kind, 0) + count
        moved["allreduce"] = sent
        self._moved = moved

    def allreduce_bytes_per_step(self) -> list[int]:
        """Per stage, the bytes its group's all-reduce sends in a step, predicted from its
        trainable variables' sizes (``allreduce_bytes``, as a ring sends them)."""
        out = []
        for k, stage in enumerate(self.split.stages):
            nbytes = sum(_nbytes(self.split.variables[stage.variable_indices[j]])
                         for j in self._trainable[k])
            out.append(allreduce_bytes(nbytes, self.num_replicas))
        return out

    def _last_run(self) -> list[TimelineEvent]:
        if self._events is None:
            raise GradSplitError("no step has run yet: call train_step(*args) first.")
        return self._events

    def bytes_moved(self) -> dict[str, int]:
        """The replicas' ``bytes_moved()`` summed by kind, and ``"allreduce"``: what the
        stage groups' all-reduces sent, counted from the gradients each member gave its op
        as a ring sends them (``2 (R - 1) / R`` of them per member; what
        ``allreduce_bytes_per_step`` predicts)."""
        self._last_run()
        return dict(self._moved)

    def timeline(self) -> list[TimelineEvent]:
        """Every action of the last step, replica by replica (replica ``r``'s list ``d`` is
        row ``r * L + d``, ``L`` lists per replica), and one ``"A"`` event (stage ``k``,
        micro-batch -1) per device for its stage's all-reduce."""
        return sorted(self._last_run(), key=lambda e: (e.start, e.device_index))

    def idle_fraction(self) -> IdleFraction:
        """``(measured, ideal)`` idle share of the grid's devices in the last step (the
        ideal is one replica's: the all-reduce is not in it)."""
        events = self.timeline()
        rows = len(self.schedule) * self.num_replicas
        return IdleFraction(measured_idle_fraction(events, rows),
                            self.replicas[0].idle_fraction().ideal)

    def _labels(self) -> list[str]:
        labels = []
        for r in range(self.num_replicas):
            for actions in self.schedule:
                k = actions[0].stage if actions else 0
                labels.append(f"replica {r}: {device_label(self.devices[k][r])}")
        return labels

    def write_chrome_trace(self, path: str | os.PathLike) -> str:
        """The last step as Chrome trace JSON: a thread per replica's device, the
        all-reduces as their own events (category ``"allreduce"``)."""
        from gradsplit_compiler.show.timeline import write_chrome_trace

        return write_chrome_trace(self.timeline(), path, labels=self._labels(),
                                  microbatches=self.microbatches)

    def plot_timeline(self, path: str | os.PathLike) -> str:
        """The last step as a PNG Gantt chart, a row per replica's device; all-reduces in
        their own colour."""
        from gradsplit_compiler.show.timeline import plot_timeline

        return plot_timeline(self.timeline(), path, labels=self._labels(),
                             microbatches=self.microbatches, idle=self.idle_fraction())

    # -- training state ----------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> str:
        """Replica 0's training state (every replica holds the same), in the format of a
        one-replica pipeline; returns the path prefix."""
        return self.replicas[0].save(path)

    def restore(self, path: str | os.PathLike) -> None:
        """Read a checkpoint of this program (saved by any pipeline or grid of it) into
        every replica; one of another program is refused before anything changes."""
        for replica in self.replicas:
            replica.restore(path)

    def write_back(self) -> None:
        """Copy replica 0's variables into ``split.variables``."""
        self.replicas[0].write_back()

    @property
    def iterations(self) -> int:
        """Optimizer steps taken."""
        return self.replicas[0].iterations

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for a non-finite gradient."""
        return self.replicas[0].skipped_steps

    @property
    def training_state(self) -> Any:
        """Replica 0's training state."""
        return self.replicas[0].training_state

    def stage_variables(self, stage: int, replica: int = 0) -> list[tf.Variable]:
        """The copies stage ``stage`` of replica ``replica`` reads."""
        if not 0 <= replica < self.num_replicas:
            raise GradSplitError(
                f"replica {replica} does not exist; this grid has replicas 0 to "
                f"{self.num_replicas - 1}.")
        return self.replicas[replica].stage_variables(stage)

    def memory(self) -> dict[str, dict[str, int]]:
        """Per device of the grid: bytes of the variables and optimizer slots it holds."""
        report: dict[str, dict[str, int]] = {}
        for replica in self.replicas:
            for device, held in replica.memory().items():
                mine = report.setdefault(device, {"variables": 0, "slots": 0})
                for kind, count in held.items():
                    mine[kind] += count
        return report


def _nbytes(value: Any) -> int:
    """Bytes of a variable or tensor."""
    return int(math.prod(value.shape)) * tf.as_dtype(value.dtype).size


def _first_line(exc: BaseException) -> str:
    message = exc.message if isinstance(exc, tf.errors.OpError) else str(exc)
    return message.strip().splitlines()[0] if message.strip() else "(no message)"
