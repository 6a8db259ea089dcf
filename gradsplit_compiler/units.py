"""Quantities as people read them. Plain Python: any layer may import this module.

>>> from gradsplit_compiler.units import human_bytes
>>> [human_bytes(n) for n in (748, 131072, 5_872_026, 1_288_490_189)]
['748 B', '128 KB', '5.6 MB', '1.2 GB']
"""

from __future__ import annotations

__all__ = ["human_bytes"]


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
