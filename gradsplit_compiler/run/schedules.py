"""Pipeline schedules as data: one list of actions per device, checked before anything runs.

A schedule for a split of ``K`` stages and ``M`` micro-batches is a list of ``K`` lists; list
``k`` is what device ``k`` (the device of stage ``k``) runs, in order. Each entry is an
``Action``: the forward (``"F"``) or backward (``"B"``) of one stage on one micro-batch.

>>> from gradsplit_compiler.schedules import gpipe_schedule, one_f_one_b_schedule
>>> [str(a) for a in one_f_one_b_schedule(2, 3)[0]]
['F(stage=0, microbatch=0)', 'F(stage=0, microbatch=1)', 'B(stage=0, microbatch=0)', \
'F(stage=0, microbatch=2)', 'B(stage=0, microbatch=1)', 'B(stage=0, microbatch=2)']

Dependencies come from the split, not from stage numbers alone: ``F(k, m)`` waits for
``F(j, m)`` of every stage ``j`` whose outputs stage ``k`` reads (a skip connection makes
``j < k - 1`` a dependency too); ``B(k, m)`` waits for ``F(k, m)`` and for ``B(j, m)`` of every
later stage ``j`` that reads a floating-point output of ``k`` (it sends ``k`` a cotangent).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from gradsplit_compiler.errors import GradSplitError

__all__ = [
    "BACKWARD",
    "BUILTIN_SCHEDULES",
    "FORWARD",
    "Action",
    "Dependencies",
    "gpipe_schedule",
    "ideal_idle_fraction",
    "one_f_one_b_schedule",
    "schedule_dependencies",
    "simulate_schedule",
    "validate_schedule",
]

FORWARD = "F"
BACKWARD = "B"


class Action(NamedTuple):
    """The forward (``kind="F"``) or backward (``kind="B"``) of ``stage`` on ``microbatch``."""

    kind: str
    stage: int
    microbatch: int

    def __str__(self) -> str:
        return f"{self.kind}(stage={self.stage}, microbatch={self.microbatch})"


class Dependencies(NamedTuple):
    """Which stages each stage waits for: ``forward[k]`` (stages whose outputs ``k`` reads)
    and ``backward[k]`` (later stages that send ``k`` a cotangent)."""

    forward: list[frozenset[int]]
    backward: list[frozenset[int]]

    def of(self, action: Action) -> list[Action]:
        """The actions that must finish before ``action`` starts."""
        k, m = action.stage, action.microbatch
        if action.kind == FORWARD:
            return [Action(FORWARD, j, m) for j in sorted(self.forward[k])]
        return [Action(FORWARD, k, m)] + [
            Action(BACKWARD, j, m) for j in sorted(self.backward[k])
        ]


def gpipe_schedule(num_stages: int, microbatches: int) -> list[list[Action]]:
    """GPipe: every device runs all its forwards, then all its backwards (micro-batch order).

    Stage ``k`` holds the residuals of all ``M`` micro-batches at its peak.
    """
    _check_counts(num_stages, microbatches)
    return [
        [Action(FORWARD, k, m) for m in range(microbatches)]
        + [Action(BACKWARD, k, m) for m in range(microbatches)]
        for k in range(num_stages)
    ]


def one_f_one_b_schedule(num_stages: int, microbatches: int) -> list[list[Action]]:
    """1F1B (PipeDream-flush): a warm-up of ``K - 1 - k`` forwards on stage ``k``, then one
    forward and one backward in turn, then the remaining backwards.

    Stage ``k`` holds at most ``min(K - k, M)`` micro-batches of residuals; the bubble is the
    same as GPipe's.
    """
    _check_counts(num_stages, microbatches)
    schedule = []
    for k in range(num_stages):
        warmup = min(num_stages - 1 - k, microbatches)
        actions = [Action(FORWARD, k, m) for m in range(warmup)]
        for i in range(microbatches - warmup):
            actions += [Action(FORWARD, k, warmup + i), Action(BACKWARD, k, i)]
        actions += [Action(BACKWARD, k, m) for m in range(microbatches - warmup, microbatches)]
        schedule.append(actions)
    return schedule


BUILTIN_SCHEDULES = {"gpipe": gpipe_schedule, "1f1b": one_f_one_b_schedule}


def schedule_dependencies(split: Any) -> Dependencies:
    """What each stage of ``split`` waits for, read from the stages' inputs and outputs."""
    producer: dict[str, int] = {}
    floating: dict[str, bool] = {}
    for stage in split.stages:
        for name, spec in zip(stage.outputs, stage.output_specs):
            producer[name] = stage.index
            floating[name] = spec.dtype.is_floating or spec.dtype.is_complex
    forward: list[set[int]] = [set() for _ in split.stages]
    backward: list[set[int]] = [set() for _ in split.stages]
    for stage in split.stages:
        for name in stage.inputs:
            if name in producer:
                forward[stage.index].add(producer[name])
                if floating[name]:
                    backward[producer[name]].add(stage.index)
    return Dependencies([frozenset(s) for s in forward], [frozenset(s) for s in backward])


def validate_schedule(schedule: Sequence[Sequence[Any]], split: Any,
                      microbatches: int) -> list[list[Action]]:
    """Check ``schedule`` for ``split`` and ``microbatches``; return it as lists of ``Action``.

    Parameters
    ----------
    schedule : list of lists
        One list per stage (stage ``k`` runs on device ``k``); entries are ``Action`` or
        ``(kind, stage, microbatch)`` tuples.
    split : gsc.Split
        Gives the number of stages and the dependencies between them.
    microbatches : int

    Returns
    -------
    list of list of Action

    Raises
    ------
    GradSplitError
        Naming the offending action: one on the wrong device or out of range, one listed
        twice or never, a backward before its forward, or a deadlock when each device runs
        its list in order (found by simulating it).

    Examples
    --------
    >>> validate_schedule([[("B", 0, 0), ("F", 0, 0)]], split, 1)  # doctest: +SKIP
    GradSplitError: B(stage=0, microbatch=0) comes before F(stage=0, microbatch=0) ...
    """
    return _validate(schedule, len(split.stages), microbatches, schedule_dependencies(split))


def simulate_schedule(schedule: Sequence[Sequence[Action]], dependencies: Dependencies
                      ) -> dict[Action, int]:
    """Run ``schedule`` in lockstep with every action taking one time unit.

    Returns the time slot of each action. Each device starts its next action as soon as
    everything it waits for finished in an earlier slot. Raises ``GradSplitError`` naming the
    stuck actions when no device can move.
    """
    position = [0] * len(schedule)
    slot_of: dict[Action, int] = {}
    total = sum(len(actions) for actions in schedule)
    time = 0
    while len(slot_of) < total:
        ready = []
        for d, actions in enumerate(schedule):
            if position[d] < len(actions):
                action = actions[position[d]]
                if all(dep in slot_of for dep in dependencies.of(action)):
                    ready.append(d)
        if not ready:
            raise GradSplitError(_deadlock_message(schedule, position, slot_of, dependencies))
        for d in ready:
            slot_of[schedule[d][position[d]]] = time
            position[d] += 1
        time += 1
    return slot_of


def ideal_idle_fraction(schedule: Sequence[Sequence[Action]],
                        dependencies: Dependencies) -> float:
    """Idle fraction of ``schedule`` when every forward and backward takes the same time:
    ``(K - 1) / (M + K - 1)`` for GPipe and 1F1B."""
    slots = simulate_schedule(schedule, dependencies)
    span = max(slots.values()) + 1
    busy = sum(len(actions) for actions in schedule)
    return 1.0 - busy / (len(schedule) * span)


# -- checks -----------------------------------------------------------------------------------


def _check_counts(num_stages: int, microbatches: int) -> None:
    for what, value in (("number of stages", num_stages), ("microbatches", microbatches)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise GradSplitError(f"the {what} must be a positive int; got {value!r}.")


def _validate(schedule: Any, num_stages: int, microbatches: int,
              dependencies: Dependencies) -> list[list[Action]]:
    _check_counts(num_stages, microbatches)
    if isinstance(schedule, (str, bytes)) or not isinstance(schedule, Sequence):
        raise GradSplitError(
            f"a schedule is a list with one list of actions per device; got {schedule!r}."
        )
    if len(schedule) != num_stages:
        raise GradSplitError(
            f"the schedule has {len(schedule)} device lists, but the split has {num_stages} "
            f"stages: give one list per stage (stage k runs on device k)."
        )
    actions = [[_as_action(entry, d, num_stages, microbatches) for entry in device_actions]
               for d, device_actions in enumerate(schedule)]
    where: dict[Action, tuple[int, int]] = {}
    for d, device_actions in enumerate(actions):
        for i, action in enumerate(device_actions):
            if action in where:
                d0, i0 = where[action]
                raise GradSplitError(
                    f"{action} is listed twice: at position {i0} of device {d0} and at "
                    f"position {i} of device {d}. Each action runs exactly once."
                )
            where[action] = (d, i)
    for k in range(num_stages):
        for kind in (FORWARD, BACKWARD):
            for m in range(microbatches):
                if Action(kind, k, m) not in where:
                    raise GradSplitError(
                        f"the schedule never runs {Action(kind, k, m)}; device {k} must run "
                        f"the forward and the backward of stage {k} on every micro-batch."
                    )
    for action, (d, i) in where.items():
        if action.kind == BACKWARD:
            forward = Action(FORWARD, action.stage, action.microbatch)
            if where[forward][1] > i:
                raise GradSplitError(
                    f"{action} comes before {forward} on device {d} (position {i} < "
                    f"{where[forward][1]}); a backward needs the residuals of its forward."
                )
    simulate_schedule(actions, dependencies)
    return actions


def _as_action(entry: Any, device: int, num_stages: int, microbatches: int) -> Action:
    try:
        if isinstance(entry, (str, bytes)):
            raise TypeError
        action = Action(*entry)
    except TypeError:
        raise GradSplitError(
            f"schedule entry {entry!r} on device {device} is not an Action(kind, stage, "
            f"microbatch)."
        ) from None
    if action.kind not in (FORWARD, BACKWARD):
        raise GradSplitError(
            f"{action} on device {device} has kind {action.kind!r}; use 'F' (forward) or 'B' "
            f"(backward)."
        )
    for what, value, limit in (("stage", action.stage, num_stages),
                               ("microbatch", action.microbatch, microbatches)):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < limit:
            raise GradSplitError(
                f"{action} on device {device}: {what} must be an int in [0, {limit}); got "
                f"{value!r}."
            )
    if action.stage != device:
        raise GradSplitError(
            f"{action} is on device {device}, but stage {action.stage} runs on device "
            f"{action.stage}: list k holds the actions of stage k only."
        )
    return action


def _deadlock_message(schedule, position, done, dependencies) -> str:
    stuck = []
    for d, actions in enumerate(schedule):
        if position[d] < len(actions):
            action = actions[position[d]]
            missing = [str(dep) for dep in dependencies.of(action) if dep not in done]
            stuck.append(f"device {d} is stuck at {action}, waiting for {', '.join(missing)}")
    return (
        "the schedule deadlocks when each device runs its list in order: "
        + "; ".join(stuck)
        + ". Move the awaited actions earlier on their devices (a forward waits for the "
        "forwards of the stages it reads; a backward for the backwards of the stages it feeds)."
    )
