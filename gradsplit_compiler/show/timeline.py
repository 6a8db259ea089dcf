"""Pictures of a pipeline step: Chrome trace JSON and a Gantt chart of its timeline.

Both read a list of recorded events (``gsc.Pipeline.timeline()``: each with
``device_index``, ``device``, ``kind`` ``"F"``, ``"B"``, ``"W"`` or ``"A"`` (a grid's
all-reduce, drawn in a colour of its own), ``stage``,
``microbatch``, and ``start`` and ``end`` in seconds from the step start) and one label per
device (per list of the schedule);
``Pipeline.write_chrome_trace`` and ``Pipeline.plot_timeline`` call them.

>>> from collections import namedtuple
>>> E = namedtuple("E", "device_index device kind stage microbatch start end")
>>> events = [E(0, "/CPU:0", "F", 0, 0, 0.0, 0.5), E(1, "/CPU:1", "F", 1, 0, 0.5, 1.0),
...           E(1, "/CPU:1", "B", 1, 0, 1.0, 1.5), E(0, "/CPU:0", "B", 0, 0, 1.5, 2.0)]
>>> trace = chrome_trace(events, ["CPU:0", "CPU:1"], microbatches=1)
>>> [e["name"] for e in trace["traceEvents"] if e["ph"] == "X"]
['F0', 'F0', 'B0', 'B0']
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from gradsplit_compiler.errors import GradSplitError
from gradsplit_compiler.run.engine import ALLREDUCE, TimelineEvent
from gradsplit_compiler.run.fused import ONE_PROGRAM
from gradsplit_compiler.run.schedules import BACKWARD, FORWARD, WEIGHT

__all__ = ["ALLREDUCE_COLOUR", "CATEGORIES", "HATCHES", "chrome_trace", "plot_simulation",
           "plot_timeline", "write_chrome_trace"]

# Chrome trace category and Gantt chart hatch of each action kind.
CATEGORIES = {FORWARD: "forward", BACKWARD: "backward", WEIGHT: "weight",
              ALLREDUCE: "allreduce", ONE_PROGRAM: "step as one program"}
HATCHES = {FORWARD: None, BACKWARD: "///", WEIGHT: "...", ALLREDUCE: "xx", ONE_PROGRAM: "++"}
# An all-reduce (a grid's stage gradients summed over its replicas) has a colour of its own.
ALLREDUCE_COLOUR = "#9e9e9e"


def chrome_trace(events: Sequence[Any], labels: Sequence[str], *, microbatches: int) -> dict:
    """The Chrome trace of ``events``: one thread per device (named ``device d: labels[d]``),
    one complete event per action, times in microseconds."""
    trace: list[dict] = [
        {"name": "process_name", "ph": "M", "pid": 0,
         "args": {"name": f"gradsplit pipeline ({microbatches} micro-batches)"}},
    ]
    for d, label in enumerate(labels):
        trace.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": d,
                      "args": {"name": f"device {d}: {label}"}})
    for e in events:
        trace.append({
            "name": f"allreduce s{e.stage}" if e.kind == ALLREDUCE else
                    f"{e.kind}{e.microbatch}",
            "cat": CATEGORIES.get(e.kind, e.kind),
            "ph": "X", "pid": 0, "tid": e.device_index,
            "ts": e.start * 1e6, "dur": (e.end - e.start) * 1e6,
            "args": {"stage": e.stage, "microbatch": e.microbatch, "device": e.device},
        })
    return {"traceEvents": trace, "displayTimeUnit": "ms"}


def write_chrome_trace(events: Sequence[Any], path: str | os.PathLike, *,
                       labels: Sequence[str], microbatches: int) -> str:
    """Write ``chrome_trace(events, labels, microbatches=...)`` to ``path`` as JSON (open it
    in Perfetto or chrome://tracing); returns the path."""
    path = os.fspath(path)
    with open(path, "w") as f:
        json.dump(chrome_trace(events, labels, microbatches=microbatches), f)
    return path


def plot_timeline(events: Sequence[Any], path: str | os.PathLike, *, labels: Sequence[str],
                  microbatches: int, idle: tuple[float, float],
                  xlabel: str = "time since step start (ms)") -> str:
    """Draw ``events`` as a PNG Gantt chart at ``path``: one row per device (``labels``),
    one colour per stage, forwards plain, backwards (``B``) hatched and weight gradients
    (``W``) dotted, the micro-batch index in each box; the title gives ``idle``, the
    ``(measured, ideal)`` idle shares; ``xlabel`` names the time axis (thousandths of the
    events' unit). Returns the path."""
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

    k = len(labels)
    fig = Figure(figsize=(11, 1.2 + 0.6 * k))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    span = max(e.end for e in events) or 1.0
    for e in events:
        ax.barh(e.device_index, (e.end - e.start) * 1e3, left=e.start * 1e3, height=0.8,
                color=ALLREDUCE_COLOUR if e.kind == ALLREDUCE else stage_colour(e.stage),
                edgecolor="black", linewidth=0.5, hatch=HATCHES.get(e.kind))
        if (e.end - e.start) > span / 150 and e.kind != ALLREDUCE:
            ax.text((e.start + e.end) / 2 * 1e3, e.device_index, str(e.microbatch),
                    ha="center", va="center", fontsize=7)
    ax.set_yticks(range(k), [f"device {d}\n{label}" for d, label in enumerate(labels)],
                  fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    measured, ideal = idle
    kinds = {e.kind for e in events}
    stages = sorted({e.stage for e in events if e.kind != ALLREDUCE})
    ax.set_title(
        f"{len(stages)} stages on {k} devices, {microbatches} micro-batches: idle "
        f"{measured:.0%} (ideal {ideal:.0%})\nplain = forward, hatched = backward"
        + (" (B), dotted = weight gradients (W)" if WEIGHT in kinds else "")
        + ", number = micro-batch", fontsize=9)
    handles = [Patch(facecolor=stage_colour(s), edgecolor="black", label=f"stage {s}")
               for s in stages]
    handles.append(Patch(facecolor="white", edgecolor="black", hatch="///",
                         label="backward (B)" if WEIGHT in kinds else "backward"))
    if WEIGHT in kinds:
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="...",
                             label="weight gradients (W)"))
    if ALLREDUCE in kinds:
        handles.append(Patch(facecolor=ALLREDUCE_COLOUR, edgecolor="black",
                             hatch=HATCHES[ALLREDUCE], label="all-reduce"))
    if ONE_PROGRAM in kinds:  # a step run as one program: no forwards or backwards apart
        handles = [Patch(facecolor="white", edgecolor="black", hatch=HATCHES[ONE_PROGRAM],
                         label="the whole step, one program")]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.tight_layout()
    path = os.fspath(path)
    fig.savefig(path, format="png", dpi=100)
    return path


def plot_simulation(simulation: Any, schedule: Sequence[Sequence[Any]], path: str | os.PathLike,
                    *, microbatches: int, labels: Sequence[str] | None = None,
                    xlabel: str = "time (units of the durations given)") -> str:
    """Draw a predicted step (``schedules.simulate``'s ``Simulation`` of ``schedule``) as
    ``plot_timeline`` draws a measured one: one row per list of the schedule. Returns the
    path."""
    def label(stages: list[int]) -> str:
        return ("stage " if len(stages) == 1 else "stages ") + ", ".join(map(str, stages))

    labels = list(labels) if labels is not None else [
        label(sorted({a.stage for a in actions})) for actions in schedule]
    events = [TimelineEvent(d, labels[d], a.kind, a.stage, a.microbatch,
                            simulation.times[a][0] / 1e3, simulation.times[a][1] / 1e3)
              for d, actions in enumerate(schedule) for a in actions]
    idle = sum(simulation.idle) / len(simulation.idle) if simulation.idle else 0.0
    return plot_timeline(events, path, labels=labels, microbatches=microbatches,
                         idle=(idle, idle), xlabel=xlabel)
