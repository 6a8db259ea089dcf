"""The examples in the docstrings run (STYLE.md: examples that run)."""

import doctest
import importlib

import pytest

MODULES = [
    "gradsplit_compiler.ir",
    "gradsplit_compiler.mark",
    "gradsplit_compiler.split",
    "passes.inline_calls",
    "passes.resolve_cuts",
    "passes.partition",
    "passes.residuals",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
