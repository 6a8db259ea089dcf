"""Progress lines: ``[k/n] text ... 1.2 s``, one per step, as the CLI commands print them."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

__all__ = ["Progress"]


class Progress:
    """``[k/n] text ... 1.2 s``: one line per step on ``out``, flushed as the step starts,
    finished with the time it took (or ``failed``); nothing at all when not ``enabled``."""

    def __init__(self, total: int, out: TextIO, enabled: bool = True):
        self.total, self.done, self.out, self.enabled = total, 0, out, enabled

    @contextmanager
    def step(self, text: str) -> Iterator[None]:
        self.done += 1
        if self.enabled:
            self.out.write(f"[{self.done}/{self.total}] {text} ... ")
            self.out.flush()
        start = time.perf_counter()
        try:
            yield
        except BaseException:
            if self.enabled:
                self.out.write("failed\n")
                self.out.flush()
            raise
        if self.enabled:
            self.out.write(f"{time.perf_counter() - start:.1f} s\n")
            self.out.flush()
