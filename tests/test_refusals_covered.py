"""Every ``GradSplitError`` the package can raise is named by some test.

The package's promise is that every caller error is a ``GradSplitError`` "in the caller's
terms". This walks ``gradsplit_compiler/`` and ``passes/`` with ``ast`` for each place a
``GradSplitError(...)`` is made, takes the fixed words of its message (the string constants,
with every ``{...}`` a hole; a message built by a helper in the package is looked up in that
helper) and looks for them in the string constants of the test files. A site is covered when

- the first words (up to six) of its longest fixed run of words appear in some test string, or
- some test string of three words or more (ten characters or more) is part of one run of
  the message's fixed words (a ``match=`` or an ``in`` check quoting the message),

after undoing regex escapes (``tf\\.cast`` reads as ``tf.cast``); docstrings do not count.
A site no test names must be in ``UNCOVERED`` with the reason it has no test. The check is by
message, not by file and line, so it survives code moving between modules.
"""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = [ROOT / "gradsplit_compiler", ROOT / "passes"]
TESTS = ROOT / "tests"
HOLE = "\x00"

# fixed words of the message (as `_key` gives them) -> why no test makes this error
UNCOVERED: dict[str, str] = {
    "its backward reads other values than": (
        "core/stage.py _static_vjp: a defensive check (`pragma: no cover`); no known program "
        "traces a stage to other residuals at a static shape."),
    "does not depend on the cotangents.": (
        "core/rebuild.py: a defensive check on TensorFlow's gradient graph; no known op gives "
        "a gradient that reads no cotangent once the stage receives one."),
    "fn computes nothing from its arguments": (
        "plan/autosplit.py: auto_split refuses a program without work earlier ('pieces of "
        "work that stages can hold apart', tested in tests/plan/test_refusals_plan.py); no "
        "known program reaches this check."),
    "plotting the timeline needs matplotlib; install": (
        "run/pipeline.py plot_timeline without matplotlib: the test environment installs the "
        "render extra, so this branch cannot run here."),
    "'s gradients failed on replica": (
        "run/grid.py: an all-reduce that fails on a device that still answers; a collective "
        "that fails in the test process aborts its collective executor for the process. A "
        "dead task's all-reduce is tested (tests/run/test_cluster_training.py)."),
    "the all-reduce of the gradients did": (
        "run/grid.py: an all-reduce past timeout= with every task answering; a task that "
        "hangs is named instead ('no longer answers'), and a collective that times out in "
        "the test process aborts its collective executor for the process."),
}


def _fixed_text(node: ast.AST, functions: dict[str, ast.FunctionDef]) -> str | None:
    """The message's fixed text, ``HOLE`` for each part computed at run time; ``None`` when
    the message is not a string expression the walker understands."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else HOLE for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _fixed_text(node.left, functions), _fixed_text(node.right, functions)
        return (left or HOLE) + (right or HOLE)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and (
            node.func.id in functions):
        # a message made by a helper: the fixed text of what the helper returns
        returns = [n.value for n in ast.walk(functions[node.func.id])
                   if isinstance(n, ast.Return) and n.value is not None]
        texts = [t for t in (_fixed_text(r, functions) for r in returns) if t]
        return HOLE.join(texts) if texts else None
    return None


def _segments(text: str) -> list[str]:
    """Runs of fixed words between holes, whitespace normalised."""
    runs = (" ".join(s.split()).lstrip(".,;:)] ").rstrip() for s in text.split(HOLE))
    return [r for r in runs if r]


def _key(text: str) -> str:
    """The first words (up to six) of the message's longest fixed run of words."""
    longest = max(_segments(text), key=len, default="")
    return " ".join(longest.split()[:6])


def _raise_sites() -> list[tuple[str, int, str]]:
    """``(path, line, fixed text)`` of every ``GradSplitError(...)`` made in the package."""
    trees = {}
    for package in PACKAGES:
        for path in sorted(package.rglob("*.py")):
            trees[path] = ast.parse(path.read_text(), filename=str(path))
    functions = {n.name: n for tree in trees.values() for n in ast.walk(tree)
                 if isinstance(n, ast.FunctionDef)}
    sites = []
    for path, tree in trees.items():
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and getattr(
                    node.func, "id", getattr(node.func, "attr", None)) == "GradSplitError"):
                continue
            rel = str(path.relative_to(ROOT))
            text = _fixed_text(node.args[0], functions) if node.args else None
            sites.append((rel, node.lineno, text))
    return sites


def _test_strings() -> list[str]:
    """Every string constant of the test files, regex escapes undone, whitespace
    normalised."""
    strings = []
    for path in sorted(TESTS.rglob("*.py")):
        if path.name == pathlib.Path(__file__).name:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        docstrings = {id(n.value) for n in ast.walk(tree)
                      if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and (
                    id(node) not in docstrings):
                text = re.sub(r"\\(.)", r"\1", node.value)
                strings.append(" ".join(text.split()))
    return strings


def _covered(text: str, strings: list[str]) -> bool:
    key = _key(text)
    if key and any(key in s for s in strings):
        return True
    segments = _segments(text)
    return any(len(s.split()) >= 3 and len(s) >= 10 and any(s in seg for seg in segments)
               for s in strings)


SITES = _raise_sites()


def test_the_walk_finds_the_refusals():
    # a walker that finds nothing would pass vacuously
    assert len(SITES) >= 80, SITES
    assert all(text is not None for _, _, text in SITES), [
        f"{path}:{line}" for path, line, text in SITES if text is None]
    assert any(_key(t) == "cuts must be a list with" for _, _, t in SITES)
    # a helper-built message is read through the helper
    assert any("the schedule deadlocks when each device" in t for _, _, t in SITES)


def test_every_refusal_has_a_test_naming_it():
    strings = _test_strings()
    missing = [f"{path}:{line}: {_key(text)!r}" for path, line, text in SITES
               if text is not None and not _covered(text, strings)
               and _key(text) not in UNCOVERED]
    assert not missing, (
        "these GradSplitErrors are raised by the package but no test names their words; "
        "write a test with pytest.raises(GradSplitError, match=...) quoting them (or add "
        "the key to UNCOVERED with the reason):\n" + "\n".join(missing))


def test_the_allow_list_is_not_stale():
    keys = {_key(text) for _, _, text in SITES if text is not None}
    stale = [k for k in UNCOVERED if k not in keys]
    assert not stale, f"UNCOVERED names messages the package no longer raises: {stale}"
    strings = _test_strings()
    tested = [k for k in UNCOVERED
              if any(_covered(t, strings) for _, _, t in SITES if t and _key(t) == k)]
    assert not tested, f"these are tested now; remove them from UNCOVERED: {tested}"


@pytest.mark.parametrize("text, strings, expected", [
    (f"argument {HOLE} has shape {HOLE}, but input_signature says {HOLE}.",
     ["but input_signature says"], True),
    (f"argument {HOLE} has shape {HOLE}, but input_signature says {HOLE}.",
     ["has shape"], False),
    (f"stage {HOLE} holds a tf.while_loop without maximum_iterations; XLA needs a bound. "
     "Pass maximum_iterations= to tf.while_loop",
     ["Pass maximum_iterations= to tf.while_loop"], True),
])
def test_coverage_rule(text, strings, expected):
    assert _covered(text, strings) is expected
