"""Small helpers every layer may use: the garbage-collector pause around big graph work, the
time spent in each phase of a piece of work (``recording_phases`` / ``phase``), and byte
counts for people, in two styles: ``human_bytes`` for tables (short, rounded to
what a column needs) and ``format_bytes`` for messages (two decimals, optionally exact).

The lowest layer with ``errors`` and ``_tf_internal``: it imports nothing of the package (and
not TensorFlow).

>>> format_bytes(1536)
'1.50 KB'
>>> format_bytes(3 * 2**20, exact=True)
'3.00 MB (3145728 bytes)'
>>> [human_bytes(n) for n in (748, 131072, 5_872_026, 1_288_490_189)]
['748 B', '128 KB', '5.6 MB', '1.2 GB']
"""

from __future__ import annotations

import contextlib
import functools
import gc
import time
from collections.abc import Iterator

__all__ = ["collector_paused", "format_bytes", "forwarding", "human_bytes", "phase",
           "recording_phases"]


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off inside the block (and back on after, if it was).

    Building a split or costing a program creates graph objects by the hundred thousand; each
    full collection walks every object of the process, so with a big model already in memory
    the collector alone made split time per node grow with the size of the heap (~20% at
    4,000 nodes beside ResNet50), and on a 100,000-op program one collection costs more than
    a cost-model pass. What the block leaves as garbage is collected when the collector
    resumes. Nesting is fine: only the outermost block turns it back on.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# The phases being timed, innermost last: [name, start, seconds of nested phases, record].
_open_phases: list[list] = []


@contextlib.contextmanager
def recording_phases() -> Iterator[dict[str, float]]:
    """Time every ``phase`` entered inside the block; yields the record it fills.

    The record maps each phase name to the seconds spent in it, outside the phases nested in
    it (each second counts once), in the order phases were first entered; ``"other"`` holds
    the block's time outside every phase, so the values add up to the block's wall time.
    A phase entered twice (one per stage, say) adds up. A recording inside another keeps its
    phases to itself; the outer one sees its whole time as spent in the enclosing phase.

    >>> with recording_phases() as record:
    ...     with phase("outer"):
    ...         with phase("inner"):
    ...             pass
    >>> list(record)
    ['outer', 'inner', 'other']
    >>> abs(sum(record.values()) - record.total) < 1e-9
    True
    """
    record = _PhaseRecord()
    root = ["other", time.perf_counter(), 0.0, record]
    _open_phases.append(root)
    try:
        yield record
    finally:
        _open_phases.pop()
        record.total = time.perf_counter() - root[1]
        record["other"] = record.get("other", 0.0) + record.total - root[2]


class _PhaseRecord(dict):
    """``{phase: seconds}`` with ``total``, the recorded block's wall time."""

    total: float = 0.0


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Count the block's time as phase ``name`` of the innermost ``recording_phases``
    (nothing is timed outside one)."""
    if not _open_phases:
        yield
        return
    record = _open_phases[-1][3]
    record.setdefault(name, 0.0)  # in the order phases are first entered
    frame = [name, time.perf_counter(), 0.0, record]
    _open_phases.append(frame)
    try:
        yield
    finally:
        _open_phases.pop()
        elapsed = time.perf_counter() - frame[1]
        record[name] = record.get(name, 0.0) + elapsed - frame[2]
        _open_phases[-1][2] += elapsed


_UNITS = (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10))


def format_bytes(nbytes: float, digits: int = 2, exact: bool = False) -> str:
    """``nbytes`` in the largest binary unit it reaches (KB = 1024 bytes, MB, GB), with
    ``digits`` decimals; ``exact`` adds the byte count in parentheses. Below 1 KB: ``"N
    bytes"``."""
    for unit, size in _UNITS:
        if nbytes >= size:
            text = f"{nbytes / size:.{digits}f} {unit}"
            return f"{text} ({int(nbytes)} bytes)" if exact else text
    return f"{int(nbytes)} bytes"


def human_bytes(nbytes: int) -> str:
    """``"748 B"``, ``"128 KB"``, ``"5.6 MB"``, ``"1.2 GB"``: bytes below 10 KB, whole KB
    below 1 MB, tenths of MB and GB above."""
    if nbytes >= 1 << 30:
        return f"{nbytes / (1 << 30):.1f} GB"
    if nbytes >= 1 << 20:
        return f"{nbytes / (1 << 20):.1f} MB"
    if nbytes >= 10 << 10:
        return f"{nbytes / (1 << 10):.0f} KB"
    return f"{nbytes} B"


def _forward_call(function, *args, **kwargs):
    return function(*args, **kwargs)


def forwarding(function, *bound, **bound_keywords) -> functools.partial:
    """A callable that calls ``function(*bound, *args, **bound_keywords, **kwargs)``, to wrap
    in ``tf.function`` where a lambda would do.

    TensorFlow keys its "frequent retracing" warning by the code of the Python function:
    every ``tf.function(lambda ...)`` made at one line of code shares a key, so five of them,
    each traced once (one per stage, per device), log a warning that blames the user. A
    ``functools.partial`` has no code of its own and is keyed by itself.

    >>> forwarding(divmod, 7)(2)
    (3, 1)
    """
    return functools.partial(_forward_call, function, *bound, **bound_keywords)
