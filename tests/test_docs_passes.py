"""docs/passes.md runs: each of its examples (every ```python block that starts with an
import) is executed as written, and each asserts its transformed program against
``tf.GradientTape`` on the original function (or ``gsc.verify``, which does the same)."""

from __future__ import annotations

import pathlib
import re

import pytest

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "passes.md"
BLOCKS = [b for b in re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
          if b.startswith("import")]


def test_the_tutorial_has_its_examples():
    assert len(BLOCKS) == 4  # three examples and the cotangents one


@pytest.mark.parametrize("index", range(len(BLOCKS)),
                         ids=["block_outputs_auto_split", "relu_to_maximum",
                              "check_numerics_after_cuts", "cotangents_by_name"])
def test_docs_passes_example_runs(index):
    namespace: dict = {"__name__": f"docs_passes_example_{index}"}
    exec(compile(BLOCKS[index], f"{DOC.name} example {index}", "exec"), namespace)
