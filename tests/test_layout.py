"""The README's Layout block matches the tree: what it names exists, and every module is named.

The block lists folders (``name/``) and files (``name.py``). A line that starts at column 0
with a folder (``passes/``) or at column 2 with a folder (``  core/``, inside
``gradsplit_compiler/``) opens that folder; a line at column 2 that starts with a file opens
``gradsplit_compiler/`` itself; a line at column 0 that starts with anything else (the
``Makefile`` line) opens the repository root; deeper-indented lines continue the folder
above. Every ``name.py`` and ``name/`` on a line is taken inside the open folder.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "gradsplit_compiler"
_FILE = re.compile(r"(?<![\w./])([A-Za-z_][\w]*\.py)\b")
_FOLDER = re.compile(r"(?<![\w./])([A-Za-z_][\w]*)/(?=[\s,;)]|$)")


def layout_block(readme: str) -> list[str]:
    """The lines of the first code block after the ``## Layout`` heading."""
    section = readme.split("\n## Layout\n", 1)[1]
    lines = section.split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("```"))
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("```"))
    return lines[start + 1:end]


def named_paths(block: list[str]) -> set[str]:
    """Every file and folder the block names, as paths relative to the repository."""
    named: set[str] = set()
    folder = ""
    for line in block:
        indent = len(line) - len(line.lstrip(" "))
        first = line.split()[0] if line.split() else ""
        if indent == 0:
            folder = first if first.endswith("/") else ""
            named_line = line[len(first):] if folder else line
            if folder:
                named.add(folder.rstrip("/"))
        elif indent == 2:
            folder = f"{PACKAGE}/{first}" if first.endswith("/") else f"{PACKAGE}/"
            named_line = line[indent + len(first):] if first.endswith("/") else line
            if first.endswith("/"):
                named.add(folder.rstrip("/"))
        else:
            named_line = line
        for match in _FILE.finditer(named_line):
            named.add(folder + match.group(1))
        for match in _FOLDER.finditer(named_line):
            named.add(folder + match.group(1))
    return named


@pytest.fixture(scope="module")
def named() -> set[str]:
    return named_paths(layout_block((ROOT / "README.md").read_text()))


def _modules(folder: str) -> set[str]:
    return {p.relative_to(ROOT).as_posix() for p in (ROOT / folder).rglob("*.py")
            if "__pycache__" not in p.parts and p.name != "__init__.py"}


def _subfolders(folder: str) -> set[str]:
    return {p.relative_to(ROOT).as_posix() for p in (ROOT / folder).rglob("*")
            if p.is_dir() and "__pycache__" not in p.parts and not p.name.startswith(".")}


def test_the_block_is_found_and_names_the_top_level_folders(named):
    assert {PACKAGE, "passes", "tests", "tools", "docs"} <= named


def test_every_file_and_folder_the_layout_names_exists(named):
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"README's Layout names what is not in the tree: {missing}"


@pytest.mark.parametrize("folder", [PACKAGE, "passes"])
def test_every_module_and_subpackage_is_in_the_layout(named, folder):
    absent = sorted((_modules(folder) | _subfolders(folder)) - named)
    assert not absent, f"README's Layout does not mention {absent}"


def test_every_file_in_tools_is_in_the_layout(named):
    files = {p.relative_to(ROOT).as_posix() for p in (ROOT / "tools").iterdir()
             if p.is_file()}
    assert files and not sorted(files - named), sorted(files - named)


def test_every_test_layer_is_in_the_layout(named):
    layers = {p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").iterdir()
              if p.is_dir() and not p.name.startswith((".", "__"))}
    assert layers and not sorted(layers - named), sorted(layers - named)


def test_the_parser_reads_folders_files_and_continuations():
    block = [
        "pkg_root/   words",
        "passes/     a.py, b.py",
        "            c.py (and forward/backward words)",
        "  ir/       graph.py",
        "  x.py, y.py",
        "            described",
        "Makefile, .ci/run   make demo / test",
    ]
    assert named_paths(block) == {
        "pkg_root", "passes", "passes/a.py", "passes/b.py", "passes/c.py",
        f"{PACKAGE}/ir", f"{PACKAGE}/ir/graph.py", f"{PACKAGE}/x.py", f"{PACKAGE}/y.py",
    }


_CITED = re.compile(r"(?<![\w./-])((?:gradsplit_compiler|passes|tests|tools|docs)/[\w./-]*\w)")


@pytest.mark.parametrize("doc", ["README.md", "BENCHMARKS.md", *sorted(
    p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))])
def test_every_repository_path_a_document_cites_exists(doc):
    text = (ROOT / doc).read_text()
    base = (ROOT / doc).parent
    cited = set(_CITED.findall(text))
    cited |= {m for m in re.findall(r"\]\(([^)#:]+)\)", text)}  # relative markdown links
    missing = sorted(c for c in cited if not (ROOT / c).exists() and not (base / c).exists())
    assert not missing, f"{doc} cites paths that are not in the repository: {missing}"


@pytest.mark.parametrize("folder", [PACKAGE, "passes", "tools"])
def test_no_module_takes_a_standard_library_name(folder):
    # Run by path (python gradsplit_compiler/cli/parser.py), a module's folder comes first on
    # sys.path, and a module there named like the standard library's replaces it.
    clashes = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / folder).rglob("*.py")
                     if p.stem in sys.stdlib_module_names)
    assert not clashes, f"modules named like the standard library's: {clashes}"


def test_the_command_line_runs_by_path():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, str(ROOT / PACKAGE / "cli" / "parser.py"), "inspect", "--help"],
        env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: gradsplit inspect")
