"""Refusals of `gradsplit demo`'s sizes, in the flags' own terms."""

from __future__ import annotations

import pytest

from gradsplit_compiler import GradSplitError
from gradsplit_compiler.cli.demo import DemoConfig


@pytest.mark.parametrize("flag, field", [("--cut-size", "cut_size"), ("--width", "width"),
                                         ("--features", "features"), ("--repeats", "repeats")])
def test_sizes_must_be_positive(flag, field):
    with pytest.raises(GradSplitError, match=rf"{flag} must be a positive integer; got 0\."):
        DemoConfig(**{field: 0}).check()


def test_cut_size_must_be_a_multiple_of_width():
    with pytest.raises(GradSplitError, match=r"--cut-size 100 must be a multiple of --width 16 "
                                             r"\(y is batch x width\); try --cut-size 96\."):
        DemoConfig(cut_size=100, width=16).check()
