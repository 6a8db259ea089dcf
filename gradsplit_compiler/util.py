"""Small helpers every layer may use: the garbage-collector pause around big graph work, and
byte counts for people, in two styles: ``human_bytes`` for tables (short, rounded to
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
import gc
from collections.abc import Iterator

__all__ = ["collector_paused", "format_bytes", "human_bytes"]


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
