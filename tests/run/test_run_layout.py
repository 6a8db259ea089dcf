"""The runtime's modules keep to their boundaries, and the timeline pictures work on recorded
events alone (without a pipeline)."""

import ast
import json
from pathlib import Path

import pytest

import gradsplit_compiler

PACKAGE = Path(gradsplit_compiler.__file__).parent
MODULES = sorted((PACKAGE / "run").glob("*.py")) + [PACKAGE / "show" / "timeline.py"]
# ``os._exit`` is a public function despite its name (a worker leaves without cleanup).
ALLOWED = {("os", "_exit")}
NETWORKX_INTERNALS = {"_pred", "_succ", "_node", "_adj"}


def _private_reads(tree: ast.AST) -> list[str]:
    """``x._name`` where ``x`` is not ``self`` or ``cls``, and private names imported from
    another module."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") \
                and not node.attr.startswith("__"):
            owner = node.value.id if isinstance(node.value, ast.Name) else None
            if owner in ("self", "cls") and node.attr not in NETWORKX_INTERNALS:
                continue
            if (owner, node.attr) in ALLOWED:
                continue
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if alias.name.startswith("_") and node.module != "__future__":
                    found.append(f"line {node.lineno}: from {node.module} import {alias.name}")
    return found


@pytest.mark.parametrize("path", MODULES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_module_reads_another_modules_private_names(path):
    tree = ast.parse(path.read_text())
    assert _private_reads(tree) == []


@pytest.mark.parametrize("path", MODULES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_module_says_what_it_exports(path):
    if path.name == "__init__.py":
        return
    tree = ast.parse(path.read_text())
    names = [t.id for node in tree.body if isinstance(node, ast.Assign)
             for t in node.targets if isinstance(t, ast.Name)]
    assert "__all__" in names


def test_only_tf_internal_touches_the_server_def():
    for path in MODULES:
        assert "_server_def" not in path.read_text().replace("connected_server_def", ""), path


def _events():
    from gradsplit_compiler.run.engine import TimelineEvent

    return [TimelineEvent(0, "/CPU:0", "F", 0, 0, 0.0, 0.25),
            TimelineEvent(1, "/CPU:1", "F", 1, 0, 0.25, 0.5),
            TimelineEvent(1, "/CPU:1", "B", 1, 0, 0.5, 0.75),
            TimelineEvent(0, "/CPU:0", "B", 0, 0, 0.75, 1.0)]


def test_idle_fraction_of_recorded_events():
    from gradsplit_compiler.run.engine import measured_idle_fraction

    assert measured_idle_fraction(_events(), 2) == 0.5
    assert measured_idle_fraction(_events()[:1], 1) == 0.0


def test_chrome_trace_from_recorded_events(tmp_path):
    from gradsplit_compiler.show.timeline import write_chrome_trace

    path = write_chrome_trace(_events(), tmp_path / "t.json", labels=["CPU:0", "CPU:1"],
                              microbatches=1)
    with open(path) as f:
        trace = json.load(f)["traceEvents"]
    assert [e["args"]["name"] for e in trace if e["ph"] == "M"] == [
        "gradsplit pipeline (1 micro-batches)", "device 0: CPU:0", "device 1: CPU:1"]
    complete = [e for e in trace if e["ph"] == "X"]
    assert [(e["name"], e["cat"], e["tid"]) for e in complete] == [
        ("F0", "forward", 0), ("F0", "forward", 1), ("B0", "backward", 1),
        ("B0", "backward", 0)]
    assert complete[1]["ts"] == 0.25e6 and complete[1]["dur"] == 0.25e6


def test_plot_timeline_from_recorded_events(tmp_path):
    from gradsplit_compiler.show.timeline import plot_timeline  # matplotlib: render extra

    path = plot_timeline(_events(), tmp_path / "t.png", labels=["CPU:0", "CPU:1"],
                         microbatches=1, idle=(0.5, 0.5))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
