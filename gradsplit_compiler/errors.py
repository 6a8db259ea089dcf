"""The one exception type a caller of gradsplit_compiler needs to catch."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["GradSplitError", "close_names", "unknown_name_message"]


class GradSplitError(ValueError):
    """Raised for every failure caused by what the caller passed.

    The message names the offending input in the caller's own terms and says what would
    work instead.
    """


def close_names(name: str, candidates: Iterable[str], limit: int = 5) -> list[str]:
    """Up to ``limit`` names from ``candidates`` that look like ``name``, best first.

    Matches on the whole name and on its last path component, so ``"Tanh"`` finds
    ``"dense/Tanh"`` and ``"conv2_block1_out"`` finds ``"conv2_block1_out_1"``.
    """
    pool = sorted(set(candidates))
    found = difflib.get_close_matches(name, pool, n=limit, cutoff=0.6)
    if not found:  # short names: 'd3' is half of 'd1' and 'd2', and still their neighbour
        found = difflib.get_close_matches(name, pool, n=limit, cutoff=0.5)
    if len(found) < limit:
        tail = name.rsplit("/", 1)[-1].split(":")[0].lower()
        for cand in pool:
            if cand not in found and tail and tail in cand.lower():
                found.append(cand)
                if len(found) == limit:
                    break
    return found[:limit]


def unknown_name_message(what: str, name: str, candidates: Iterable[str]) -> str:
    close = close_names(name, candidates)
    hint = f" Close names in the graph: {', '.join(repr(c) for c in close)}." if close else ""
    return (
        f"{what} {name!r} is not a tensor, a gsc.mark name or a Keras layer of this program."
        f"{hint} `gradsplit inspect` lists every tensor one can cut at."
    )
