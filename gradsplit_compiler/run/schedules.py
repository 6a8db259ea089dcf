"""Pipeline schedules as data: one list of actions per device, checked before anything runs.

A schedule for a split of ``K`` stages and ``M`` micro-batches is a list of ``K`` lists; list
``k`` is what device ``k`` (the device of stage ``k``) runs, in order. Each entry is an
``Action``: the forward (``"F"``) or backward (``"B"``) of one stage on one micro-batch. In a
zero-bubble schedule the backward is split in two: ``"B"`` then computes only the input
cotangents (what the previous stage waits for) and ``"W"`` the variable gradients, later, on
the same device; a schedule lists a ``W`` for every ``B`` or none at all (fused backwards).
When several stages share a device (virtual stages: ``devices`` names a device more than
once), a schedule may instead hold one list per distinct device, in the order the devices
first appear; that list runs the actions of all its stages.

>>> from gradsplit_compiler.schedules import gpipe_schedule, one_f_one_b_schedule
>>> [str(a) for a in one_f_one_b_schedule(2, 3)[0]]
['F(stage=0, microbatch=0)', 'F(stage=0, microbatch=1)', 'B(stage=0, microbatch=0)', \
'F(stage=0, microbatch=2)', 'B(stage=0, microbatch=1)', 'B(stage=0, microbatch=2)']

Dependencies come from the split, not from stage numbers alone: ``F(k, m)`` waits for
``F(j, m)`` of every stage ``j`` whose outputs stage ``k`` reads (a skip connection makes
``j < k - 1`` a dependency too); ``B(k, m)`` waits for ``F(k, m)`` and for ``B(j, m)`` of every
later stage ``j`` that reads a floating-point output of ``k`` (it sends ``k`` a cotangent);
``W(k, m)`` waits for ``B(k, m)``.

>>> from gradsplit_compiler.schedules import zb_h1_schedule
>>> " ".join(f"{a.kind}{a.microbatch}" for a in zb_h1_schedule(3, 4)[0])
'F0 F1 F2 B0 W0 F3 B1 W1 B2 W2 B3 W3'
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from gradsplit_compiler.errors import GradSplitError

__all__ = [
    "BACKWARD",
    "BUILTIN_SCHEDULES",
    "FORWARD",
    "KINDS",
    "WEIGHT",
    "Action",
    "Simulation",
    "Dependencies",
    "builtin_schedule",
    "gpipe_schedule",
    "ideal_idle_fraction",
    "interleaved_one_f_one_b_schedule",
    "list_stages",
    "measured_latency",
    "one_f_one_b_schedule",
    "schedule_dependencies",
    "simulate",
    "simulate_schedule",
    "splits_backward",
    "timed_schedule",
    "unit_durations",
    "validate_schedule",
    "zb_h1_schedule",
    "zb_v_schedule",
]

FORWARD = "F"
BACKWARD = "B"
WEIGHT = "W"
KINDS = (FORWARD, BACKWARD, WEIGHT)


class Action(NamedTuple):
    """The forward (``kind="F"``), backward (``kind="B"``) or weight-gradient part of the
    backward (``kind="W"``, in a schedule that splits it) of ``stage`` on ``microbatch``."""

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
        if action.kind == WEIGHT:
            return [Action(BACKWARD, k, m)]
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


def zb_h1_schedule(num_stages: int, microbatches: int) -> list[list[Action]]:
    """ZB-H1 (zero bubble, Qi et al. 2024): 1F1B with each backward split into ``B`` (input
    cotangents) and ``W`` (variable gradients), the ``W`` passes postponed into what would be
    bubbles.

    Stage ``k`` runs 1F1B's warm-up of ``K - k`` forwards, then per micro-batch ``j`` its
    ``B``, the ``W`` of micro-batch ``j - k`` (none while ``j < k``) and its next forward;
    then the ``W`` passes left. Every stage holds the residuals of at most ``min(K, M)``
    micro-batches (a micro-batch's live until its ``W``): 1F1B's peak, which 1F1B reaches on
    stage 0 only. With every ``F``, ``B`` and ``W`` one time unit, a step takes
    ``3M + K - 1`` units (``M >= K``) against 1F1B's ``3M + 3(K - 1)``: a third of the bubble.
    """
    _check_counts(num_stages, microbatches)
    schedule = []
    for k in range(num_stages):
        warmup = min(num_stages - k, microbatches)
        actions = [Action(FORWARD, k, m) for m in range(warmup)]
        forwards, weights = warmup, 0
        for j in range(microbatches):
            actions.append(Action(BACKWARD, k, j))
            if j >= k:
                actions.append(Action(WEIGHT, k, weights))
                weights += 1
            if forwards < microbatches:
                actions.append(Action(FORWARD, k, forwards))
                forwards += 1
        actions += [Action(WEIGHT, k, m) for m in range(weights, microbatches)]
        schedule.append(actions)
    return schedule


def interleaved_one_f_one_b_schedule(num_stages: int, microbatches: int,
                                     num_devices: int) -> list[list[Action]]:
    """Megatron-LM's interleaved 1F1B over virtual stages: stage ``k`` runs on device
    ``k % D`` (``D = num_devices``, each holding ``K / D`` stages, "chunks"); one list per
    device.

    Each device runs its chunks' forwards in groups of ``D`` micro-batches, chunk after
    chunk, and its backwards in the same groups from the last chunk back; a warm-up of
    ``2 (D - 1 - d) + (K / D - 1) D`` forwards on device ``d``, then one forward and one
    backward in turn. The bubble shrinks by the number of chunks against 1F1B on ``D``
    devices. ``M`` must be a multiple of ``D``.
    """
    _check_counts(num_stages, microbatches)
    _check_counts(num_devices, 1)
    d_ = num_devices
    if num_stages % d_:
        raise GradSplitError(
            f"interleaved-1f1b puts stage k on device k % D: the {num_stages} stages do not "
            f"share {d_} devices equally. Give a number of stages that {d_} divides (name "
            f"each device once per chunk, e.g. devices=[d0, d1, d0, d1]).")
    if microbatches % d_:
        raise GradSplitError(
            f"interleaved-1f1b runs micro-batches in groups of D = {d_} (the devices); "
            f"microbatches={microbatches} is not a multiple of {d_}. Use a multiple of {d_}, "
            "or schedule='1f1b'.")
    chunks = num_stages // d_
    total = microbatches * chunks

    def unit(i: int, d: int, kind: str) -> Action:
        group, within = divmod(i, d_ * chunks)
        chunk = (i // d_) % chunks
        if kind == BACKWARD:
            chunk = chunks - 1 - chunk
        return Action(kind, chunk * d_ + d, group * d_ + within % d_)

    schedule = []
    for d in range(d_):
        warmup = min(total, 2 * (d_ - 1 - d) + (chunks - 1) * d_) if chunks > 1 else \
            min(total, d_ - 1 - d)
        actions = [unit(i, d, FORWARD) for i in range(warmup)]
        for i in range(total - warmup):
            actions += [unit(warmup + i, d, FORWARD), unit(i, d, BACKWARD)]
        actions += [unit(i, d, BACKWARD) for i in range(total - warmup, total)]
        schedule.append(actions)
    return schedule


def zb_v_schedule(num_stages: int, microbatches: int) -> list[list[Action]]:
    """ZB-V (zero bubble in a V, Qi et al. 2024): ``K = 2D`` stages on ``D`` devices, device
    ``d`` holding stage ``d`` and stage ``K - 1 - d`` (the forward goes down the devices and
    back up, the backward the other way); each backward split into ``B`` and ``W``. One
    list per device.

    The order is that of a list scheduler run with every ``F``, ``B`` and ``W`` one time
    unit: at each unit a device runs a ready ``B`` (the earliest micro-batch, the later
    stage first), else a ready forward (likewise) while fewer than ``2D`` of its
    micro-batch-stages hold residuals (1F1B's peak on ``D`` devices, its stages being half
    these: a micro-batch's residuals count from its ``F`` until its ``W``), else its oldest
    waiting ``W``. For ``D <= 4`` and ``M >= D`` this reaches the paper's zero bubble at
    1F1B's memory: the step takes ``6M + D - 1`` units and each device idles only ``D - 1``
    of them, the ramp (device ``d`` waits ``d`` units for its first forward): idle share
    ``(D - 1) / (6M + D - 1)``, half of ZB-H1's ramp in time, its actions being on stages
    half the size. With more devices the list scheduler loses a few units more.
    """
    _check_counts(num_stages, microbatches)
    if num_stages % 2:
        raise GradSplitError(
            f"zb-v puts two stages on each device, stage d and stage K-1-d; the "
            f"{num_stages} stages are an odd number. Cut into an even number of stages, or "
            "use schedule='zb-h1'.")
    k, m_ = num_stages, microbatches
    d_ = k // 2
    chain = Dependencies([frozenset({s - 1} if s else ()) for s in range(k)],
                         [frozenset({s + 1} if s < k - 1 else ()) for s in range(k)])
    done: dict[Action, int] = {}  # action -> the unit it ends at
    lists: list[list[Action]] = [[] for _ in range(d_)]
    waiting_w: list[list[Action]] = [[] for _ in range(d_)]
    alive = [0] * d_
    next_of = {kind: [[0, 0] for _ in range(d_)] for kind in (FORWARD, BACKWARD)}
    now = 0
    while len(done) < 3 * k * m_:
        for d in range(d_):
            stages = (d, k - 1 - d)

            def ready(kind: str, d=d, stages=stages, now=now) -> list[Action]:
                found = [Action(kind, stages[c], next_of[kind][d][c]) for c in (1, 0)
                         if next_of[kind][d][c] < m_]
                return [a for a in found if all(done.get(x, now + 1) <= now
                                                for x in chain.of(a))]

            options = ready(BACKWARD) or (ready(FORWARD) if alive[d] < 2 * d_ else [])
            if options:
                action = min(options, key=lambda a: (a.microbatch, -a.stage))
                next_of[action.kind][d][stages.index(action.stage)] += 1
                if action.kind == FORWARD:
                    alive[d] += 1
                else:
                    waiting_w[d].append(Action(WEIGHT, action.stage, action.microbatch))
            elif waiting_w[d]:
                action = waiting_w[d].pop(0)
                alive[d] -= 1
            else:
                continue
            lists[d].append(action)
            done[action] = now + 1
        now += 1
    return lists


BUILTIN_SCHEDULES = {"gpipe": gpipe_schedule, "1f1b": one_f_one_b_schedule,
                     "zb-h1": zb_h1_schedule,
                     "interleaved-1f1b": interleaved_one_f_one_b_schedule,
                     "zb-v": zb_v_schedule}


def builtin_schedule(name: str, num_stages: int, microbatches: int,
                     devices: Sequence[str] | None = None) -> list[list[Action]]:
    """The built-in schedule ``name`` for ``num_stages`` stages on ``devices`` (one name per
    stage; ``interleaved-1f1b`` needs stage ``k`` on the ``k % D``-th distinct device,
    ``zb-v`` stages ``k`` and ``K - 1 - k`` on the ``k``-th)."""
    maker = BUILTIN_SCHEDULES.get(name.lower())
    if maker is None:
        raise GradSplitError(
            f"unknown schedule {name!r}; use one of "
            f"{', '.join(repr(n) for n in BUILTIN_SCHEDULES)}, or a list with one list "
            f"of Action(kind, stage, microbatch) per device."
        )
    if maker is zb_v_schedule:
        named = list(devices or [None] * num_stages)
        half = num_stages // 2
        if num_stages % 2 == 0 and (len(set(named[:half])) < half or any(
                named[k] != named[num_stages - 1 - k] for k in range(half))):
            raise GradSplitError(
                f"zb-v runs stage k and stage K-1-k on one device, a V; devices {named} do "
                f"not. Name {half} distinct devices down and back up (e.g. devices=[d0, d1, "
                "d1, d0] for 4 stages on 2 devices).")
        return maker(num_stages, microbatches)
    if maker is not interleaved_one_f_one_b_schedule:
        return maker(num_stages, microbatches)
    distinct = list(dict.fromkeys(devices or [None] * num_stages))
    expected = [distinct[k % len(distinct)] for k in range(num_stages)]
    if list(devices or [None] * num_stages) != expected:
        raise GradSplitError(
            f"interleaved-1f1b puts stage k on device k % D, round robin; devices "
            f"{list(devices)} do not. Name the D devices in the same order once per chunk "
            f"(e.g. devices=[d0, d1, d0, d1] for 4 stages on 2 devices).")
    return interleaved_one_f_one_b_schedule(num_stages, microbatches, len(distinct))


def splits_backward(schedule: Sequence[Sequence[Action]]) -> bool:
    """Whether ``schedule`` splits the backwards into ``B`` and ``W`` (it lists ``W``)."""
    return any(a.kind == WEIGHT for actions in schedule for a in actions)


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


def validate_schedule(schedule: Sequence[Sequence[Any]], split: Any, microbatches: int,
                      devices: Sequence[str] | None = None) -> list[list[Action]]:
    """Check ``schedule`` for ``split`` and ``microbatches``; return it as lists of ``Action``.

    Parameters
    ----------
    schedule : list of lists
        One list per stage (stage ``k`` runs on device ``k``), or, when ``devices`` names a
        device more than once, one list per distinct device (in order of first appearance)
        holding the actions of all its stages; entries are ``Action`` or ``(kind, stage,
        microbatch)`` tuples.
    split : gsc.Split
        Gives the number of stages and the dependencies between them.
    microbatches : int
    devices : list of str, optional
        The device of each stage (the pipeline's ``devices``).

    Returns
    -------
    list of list of Action

    Raises
    ------
    GradSplitError
        Naming the offending action: one on the wrong device or out of range, one listed
        twice or never, a backward before its forward, a ``W`` before its ``B`` or missing
        in a schedule that splits the backward, or a deadlock when each device runs its
        list in order (found by simulating it).

    Examples
    --------
    >>> validate_schedule([[("B", 0, 0), ("F", 0, 0)]], split, 1)  # doctest: +SKIP
    GradSplitError: B(stage=0, microbatch=0) comes before F(stage=0, microbatch=0) ...
    """
    return _validate(schedule, len(split.stages), microbatches, schedule_dependencies(split),
                     devices)


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
    """Idle fraction of ``schedule`` when every forward, ``B`` and ``W`` takes the same time
    and a fused backward (``B`` in a schedule without ``W``) twice that:
    ``(K - 1) / (M + K - 1)`` for GPipe and 1F1B."""
    times = timed_schedule(schedule, dependencies, unit_durations(schedule))
    span = max(end for _, end in times.values())
    busy = sum(end - start for start, end in times.values())
    return 1.0 - busy / (len(schedule) * span)


def unit_durations(schedule: Sequence[Sequence[Action]]) -> dict[str, float]:
    """Time per action kind in units of a forward: a split ``B`` or a ``W`` one, a fused
    backward two."""
    return {FORWARD: 1.0, WEIGHT: 1.0, BACKWARD: 1.0 if splits_backward(schedule) else 2.0}


def timed_schedule(schedule: Sequence[Sequence[Action]], dependencies: Dependencies,
                   durations: Any, latency: float = 0.0) -> dict[Action, tuple[float, float]]:
    """``(start, end)`` of each action when each list runs in order and an action starts
    ``latency`` after its list's previous action and everything it waits for have ended.

    ``durations`` is a dict by kind (``{"F": 1.0, "B": 2.0}``) or by ``Action`` (a
    measured time per action), or a callable ``durations(action) -> seconds``. Raises
    ``GradSplitError`` naming the stuck actions when no list can move (a deadlock).
    """
    def duration(action: Action) -> float:
        if callable(durations):
            return float(durations(action))
        if action in durations:
            return float(durations[action])
        return float(durations[action.kind])

    position = [0] * len(schedule)
    free = [0.0] * len(schedule)
    times: dict[Action, tuple[float, float]] = {}
    total = sum(len(actions) for actions in schedule)
    while len(times) < total:
        moved = False
        for d, actions in enumerate(schedule):
            while position[d] < len(actions):
                action = actions[position[d]]
                needs = dependencies.of(action)
                if not all(dep in times for dep in needs):
                    break
                start = max([free[d]] + [times[dep][1] for dep in needs]) + latency
                times[action] = (start, start + duration(action))
                free[d] = times[action][1]
                position[d] += 1
                moved = True
        if not moved:
            raise GradSplitError(_deadlock_message(schedule, position, times, dependencies))
    return times


class Simulation(NamedTuple):
    """What ``simulate`` predicts for one step: ``step_time`` (first start to last end),
    per list of the schedule (per device) its ``idle`` share of that span and its
    ``peak_live_bytes`` of residuals, and the ``times`` ``(start, end)`` of every action."""

    step_time: float
    idle: list[float]
    peak_live_bytes: list[int]
    times: dict[Action, tuple[float, float]]


def simulate(schedule: Sequence[Sequence[Action]], dependencies: Dependencies, durations: Any,
             residual_bytes: Sequence[int] = (), weight_input_bytes: Sequence[int] = (),
             latency: float = 0.0) -> Simulation:
    """Predict a step of ``schedule``: ``timed_schedule`` with ``durations`` (by kind, by
    action, or a function) and ``latency`` (the time between what an action waits for and
    its start: a thread waking up, a device's dispatch), and the residual bytes each list
    holds over time.

    ``residual_bytes[k]``: what stage ``k`` keeps per micro-batch from its forward until its
    backward (``B``); ``weight_input_bytes[k]``: under a schedule that splits the backward,
    what it keeps from its ``B`` until its ``W``. As the pipeline engine counts them, a
    list's live bytes depend only on the order of its own actions, so the predicted peaks
    are those a run measures (``Pipeline.peak_live_residual_bytes``) whatever the times.

    >>> from gradsplit_compiler.schedules import zb_h1_schedule
    >>> chain = Dependencies([frozenset(), frozenset({0})], [frozenset({1}), frozenset()])
    >>> sim = simulate(zb_h1_schedule(2, 4), chain, {"F": 1.0, "B": 1.0, "W": 1.0},
    ...                residual_bytes=[100, 100], weight_input_bytes=[40, 40])
    >>> sim.step_time, [round(i, 3) for i in sim.idle], sim.peak_live_bytes
    (13.0, [0.077, 0.077], [240, 180])
    """
    times = timed_schedule(schedule, dependencies, durations, latency)
    first = min(start for start, _ in times.values()) if times else 0.0
    span = (max(end for _, end in times.values()) - first) if times else 0.0
    idle = []
    for actions in schedule:
        busy = sum(times[a][1] - times[a][0] for a in actions)
        idle.append(1.0 - busy / span if span > 0 else 0.0)
    split_backward = splits_backward(schedule)
    peaks = []
    for actions in schedule:
        live = peak = 0
        for a in actions:  # a list runs in order: its bytes follow that order
            r = residual_bytes[a.stage] if len(residual_bytes) > a.stage else 0
            w = weight_input_bytes[a.stage] if len(weight_input_bytes) > a.stage else 0
            if a.kind == FORWARD:
                live += r
            elif a.kind == BACKWARD:
                live += (w if split_backward else 0)
                peak = max(peak, live)  # both held while B runs
                live -= r
            else:
                live -= w
            peak = max(peak, live)
        peaks.append(peak)
    return Simulation(span, idle, peaks, times)


def measured_latency(schedule: Sequence[Sequence[Action]], dependencies: Dependencies,
                     times: dict[Action, tuple[float, float]]) -> float:
    """The median, over the actions of a measured step (``times``: ``(start, end)`` of each),
    of the time between the end of what an action waited for (its list's previous action
    and its dependencies) and its start: ``simulate``'s ``latency``."""
    gaps = []
    for actions in schedule:
        previous = None
        for a in actions:
            ready = max([times[d][1] for d in dependencies.of(a)] +
                        ([times[previous][1]] if previous is not None else []), default=None)
            if ready is not None:
                gaps.append(max(0.0, times[a][0] - ready))
            previous = a
    gaps.sort()
    return gaps[len(gaps) // 2] if gaps else 0.0


# -- checks -----------------------------------------------------------------------------------


def _check_counts(num_stages: int, microbatches: int) -> None:
    for what, value in (("number of stages", num_stages), ("microbatches", microbatches)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise GradSplitError(f"the {what} must be a positive int; got {value!r}.")


def list_stages(schedule_length: int, num_stages: int,
                devices: Sequence[str] | None = None) -> list[frozenset[int]]:
    """The stages each list of a schedule of ``schedule_length`` lists may hold: one list
    per stage, or one per distinct device of ``devices`` (virtual stages)."""
    distinct = list(dict.fromkeys(devices)) if devices is not None else []
    if schedule_length == num_stages or not distinct or schedule_length != len(distinct):
        return [frozenset({k}) for k in range(num_stages)]
    return [frozenset(k for k in range(num_stages) if devices[k] == d) for d in distinct]


def _validate(schedule: Any, num_stages: int, microbatches: int,
              dependencies: Dependencies,
              devices: Sequence[str] | None = None) -> list[list[Action]]:
    _check_counts(num_stages, microbatches)
    if isinstance(schedule, (str, bytes)) or not isinstance(schedule, Sequence):
        raise GradSplitError(
            f"a schedule is a list with one list of actions per device; got {schedule!r}."
        )
    holds = list_stages(len(schedule), num_stages, devices)
    if len(schedule) != len(holds):
        raise GradSplitError(
            f"the schedule has {len(schedule)} device lists, but the split has {num_stages} "
            f"stages: give one list per stage (stage k runs on device k)"
            + (f", or one per distinct device ({len(set(devices))})"
               if devices is not None and len(set(devices)) < num_stages else "") + "."
        )
    actions = [[_as_action(entry, d, num_stages, microbatches, holds) for entry in
                device_actions] for d, device_actions in enumerate(schedule)]
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
    split_backward = splits_backward(actions)
    for k in range(num_stages):
        for kind in KINDS if split_backward else (FORWARD, BACKWARD):
            for m in range(microbatches):
                if Action(kind, k, m) in where:
                    continue
                if kind == WEIGHT:
                    raise GradSplitError(
                        f"the schedule never runs {Action(kind, k, m)}; it splits the "
                        f"backward into B and W (it lists W actions), so every B needs its W. "
                        f"Add {Action(kind, k, m)} after {Action(BACKWARD, k, m)} on its "
                        f"device, or list no W at all (each B is then the whole backward)."
                    )
                raise GradSplitError(
                    f"the schedule never runs {Action(kind, k, m)}; device {k} must run "
                    f"the forward and the backward of stage {k} on every micro-batch."
                )
    for action, (d, i) in where.items():
        if action.kind in (BACKWARD, WEIGHT):
            before = Action(FORWARD if action.kind == BACKWARD else BACKWARD, action.stage,
                            action.microbatch)
            if where[before][1] > i:
                why = ("a backward needs the residuals of its forward" if action.kind ==
                       BACKWARD else "W reads what its B computed; run it after the B")
                raise GradSplitError(
                    f"{action} comes before {before} on device {d} (position {i} < "
                    f"{where[before][1]}); {why}."
                )
    simulate_schedule(actions, dependencies)
    return actions


def _as_action(entry: Any, device: int, num_stages: int, microbatches: int,
               holds: Sequence[frozenset[int]]) -> Action:
    try:
        if isinstance(entry, (str, bytes)):
            raise TypeError
        action = Action(*entry)
    except TypeError:
        raise GradSplitError(
            f"schedule entry {entry!r} on device {device} is not an Action(kind, stage, "
            f"microbatch)."
        ) from None
    if action.kind not in KINDS:
        raise GradSplitError(
            f"{action} on device {device} has kind {action.kind!r}; use 'F' (forward), 'B' "
            f"(backward) or 'W' (the weight gradients of a split backward, after its B)."
        )
    for what, value, limit in (("stage", action.stage, num_stages),
                               ("microbatch", action.microbatch, microbatches)):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < limit:
            raise GradSplitError(
                f"{action} on device {device}: {what} must be an int in [0, {limit}); got "
                f"{value!r}."
            )
    if action.stage not in holds[device]:
        if len(holds) == num_stages:
            raise GradSplitError(
                f"{action} is on device {device}, but stage {action.stage} runs on device "
                f"{action.stage}: list k holds the actions of stage k only."
            )
        raise GradSplitError(
            f"{action} is in the list of device {device}, which runs stages "
            f"{sorted(holds[device])}; stage {action.stage} runs on another device. Put "
            f"each action in the list of its stage's device."
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
