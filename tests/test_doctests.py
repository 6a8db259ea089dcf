"""Every docstring example in the package runs: the modules are found by walking
``gradsplit_compiler`` and ``passes``, so a new module's examples are tested without a list."""

import doctest
import importlib
import pkgutil

import pytest

import gradsplit_compiler
import passes


def _modules() -> list[str]:
    names = []
    for package in (gradsplit_compiler, passes):
        names.append(package.__name__)
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            names.append(info.name)
    return sorted(names)


MODULES = _modules()


def _examples(name: str) -> int:
    finder = doctest.DocTestFinder()
    return sum(len(t.examples) for t in finder.find(importlib.import_module(name)))


def test_the_walk_finds_every_layer():
    layers = {n.split(".")[1] for n in MODULES if n.startswith("gradsplit_compiler.")}
    assert {"ir", "frontend", "core", "plan", "run", "show", "cli"} <= layers
    assert "passes.partition" in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
