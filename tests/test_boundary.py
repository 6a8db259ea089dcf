"""The package's boundaries, checked on the source with ``ast`` (no import, no TensorFlow).

Every ``.py`` file of ``gradsplit_compiler/``, ``passes/`` and ``tools/`` is read, and the test
fails on

(a) ``x._name`` where ``x`` is not ``self``/``cls`` and ``_name`` is not defined in the same
    module (reading another module's privates), ``getattr(x, "_name")`` alike;
(b) ``from a.b import _x``: importing a private name of another module;
(c) networkx's internals (``_pred``, ``_succ``, ``_node``, ``_adj``) anywhere: its public views
    (``g.pred``, ``g.succ``, ``g.nodes``, ``g.adj``) say the same;
(d) a layer importing a higher one. The order is ``errors``/``_tf_internal``/``util`` <
    ``ir`` < ``frontend`` (and ``examples``) < ``passes`` < ``core`` < ``plan`` < ``run`` <
    ``show`` < ``cli`` < ``tools``. At module level never; inside a function (a lazy import)
    only from ``LAZY_UPWARD`` below, each with its reason;
(e) private TensorFlow / Keras modules (``tensorflow.python``, ``keras.src``) imported
    anywhere but ``_tf_internal.py``;
(f) a shim (``gradsplit_compiler/cluster.py``, ``costs.py`` ...) that does more than
    re-export its module;
(g) a module of the package or of ``passes`` without ``__all__``, or whose ``__all__``
    names something it does not define.

Each allow-list entry has a one-line reason, and an entry nothing needs any more fails the
test (``stale allow-list entries``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "gradsplit_compiler"
SCANNED = [ROOT / PACKAGE, ROOT / "passes", ROOT / "tools"]

# Layer ranks: a module may import its own rank or lower ones.
RANKS = {
    "errors": 0, "_tf_internal": 0, "util": 0,
    "ir": 1,
    "frontend": 2, "examples": 2, "zoo": 2,
    "passes": 3,
    "core": 4,
    "plan": 5,
    "run": 6,
    "show": 7, "keras": 7,
    "cli": 8,
    "tools": 9,
}
# Old import paths kept as re-exports: shim module -> the module it re-exports.
SHIMS = {
    "cluster": "gradsplit_compiler.run.cluster",
    "costs": "gradsplit_compiler.plan.costs",
    "export": "gradsplit_compiler.core.export",
    "render": "gradsplit_compiler.show.render",
    "schedules": "gradsplit_compiler.run.schedules",
}
NETWORKX_INTERNALS = {"_pred", "_succ", "_node", "_adj"}
PRIVATE_MODULES = ("tensorflow.python", "keras.src")
# Underscored names that are public API of the standard library.
PUBLIC_UNDERSCORED = {
    "_replace", "_asdict", "_fields", "_make",  # collections.namedtuple
    "_exit",  # os._exit: documented, for a child process that must not run atexit hooks
}

# (file, attribute) -> reason: (a) cross-module private attribute access.
# ("file", "*"): any attribute in that file.
PRIVATE_ACCESS: dict[tuple[str, str], str] = {
    ("gradsplit_compiler/_tf_internal.py", "*"): "the one module for private TF/Keras APIs",
}

# (file, imported name) -> reason: (b) private names imported from another module.
PRIVATE_IMPORTS: dict[tuple[str, str], str] = {
}

# (file, imported module) -> reason: (d) lazy imports of a higher layer.
LAZY_UPWARD: dict[tuple[str, str], str] = {
    ("gradsplit_compiler/ir/edit.py", "gradsplit_compiler.frontend.keras_layers"):
        "edit.layer_outputs finds Keras layers for a pass; only the frontend knows Keras' "
        "layer graph",
    ("gradsplit_compiler/core/split.py", "gradsplit_compiler.plan.costs"):
        "Split.summary() is the user's door to the cost model, which reads Splits",
    ("gradsplit_compiler/run/pipeline.py", "gradsplit_compiler.show.timeline"):
        "Pipeline.plot_timeline / write_chrome_trace, documented methods, hand the recorded "
        "events to show's drawing on call",
    ("gradsplit_compiler/run/grid.py", "gradsplit_compiler.show.timeline"):
        "GridPipeline.plot_timeline / write_chrome_trace, as Pipeline's",
}

# file -> reason: (e) private TensorFlow / Keras modules outside _tf_internal.py.
PRIVATE_MODULE_IMPORTS: dict[tuple[str, str], str] = {
    ("gradsplit_compiler/_tf_internal.py", "*"): "the one module for private TF/Keras APIs",
}


# -- reading the source ------------------------------------------------------------------------


def _files() -> list[Path]:
    return sorted(p for d in SCANNED for p in d.rglob("*.py") if "__pycache__" not in p.parts)


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _layer(module: str) -> str | None:
    """The layer of a dotted module name of this project; ``None`` for anything else (and
    for the package's facade, ``gradsplit_compiler`` itself)."""
    parts = module.split(".")
    if parts[0] in ("passes", "tools"):
        return parts[0]
    if parts[0] != PACKAGE or len(parts) < 2:
        return None
    if parts[1] in SHIMS:
        return _layer(SHIMS[parts[1]])
    return parts[1] if parts[1] in RANKS else None


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


_TREES: dict[Path, ast.Module] = {}


def _tree(path: Path) -> ast.Module:
    if path not in _TREES:
        _TREES[path] = ast.parse(path.read_text(), filename=str(path))
    return _TREES[path]


def _defined_names(tree: ast.Module) -> set[str]:
    """Every name the module defines: functions, classes, assigned names and attributes,
    class fields, parameters."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            found.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            found.add(node.attr)
        elif isinstance(node, ast.arg):
            found.add(node.arg)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            found.update((a.asname or a.name).split(".")[0] for a in node.names)
    return found


def _attribute_reads(tree: ast.Module):
    """``(line, receiver, attribute)`` for ``x.attr`` and ``getattr/hasattr/setattr(x,
    "attr")``; ``receiver`` is the receiver's name when it is a plain name."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            receiver = node.value.id if isinstance(node.value, ast.Name) else None
            yield node.lineno, receiver, node.attr
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "hasattr", "setattr") and len(node.args) >= 2
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
            receiver = node.args[0].id if isinstance(node.args[0], ast.Name) else None
            yield node.lineno, receiver, node.args[1].value


def _imports(tree: ast.Module, module: str):
    """``(line, imported module, imported names, lazy)`` for every import; ``lazy`` when it
    runs inside a function. Relative imports are resolved against ``module``."""
    def visit(node, lazy):
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                               ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield child.lineno, alias.name, [], lazy
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    package = module.split(".")
                    package = package[: len(package) - child.level + (
                        1 if _is_package(module) else 0)]
                    base = ".".join(package + ([base] if base else []))
                names = [a.name for a in child.names]
                yield child.lineno, base, names, lazy
            yield from visit(child, inner)

    yield from visit(tree, False)


def _is_package(module: str) -> bool:
    return (ROOT / Path(*module.split(".")) / "__init__.py").exists()


def _targets(base: str, names: list[str]) -> list[str]:
    """The modules an import reaches: ``from pkg import sub`` reaches ``pkg.sub``."""
    found = []
    for name in names:
        candidate = f"{base}.{name}"
        path = ROOT / Path(*candidate.split("."))
        if path.with_suffix(".py").exists() or (path / "__init__.py").exists():
            found.append(candidate)
    return found or [base]


# -- the checks ----------------------------------------------------------------------------------


def _violations() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {k: [] for k in "abcdef"}
    used_allowances: set = set()
    for path in _files():
        rel, module = _rel(path), _module_name(path)
        tree = _tree(path)
        defined = _defined_names(tree)

        for line, receiver, attr in _attribute_reads(tree):
            if attr in NETWORKX_INTERNALS:
                found["c"].append(f"{rel}:{line}: networkx internal .{attr}")
                continue
            if not _is_private(attr) or receiver in ("self", "cls") or attr in defined:
                continue
            if attr in PUBLIC_UNDERSCORED:
                continue
            key = (rel, "*") if (rel, "*") in PRIVATE_ACCESS else (rel, attr)
            if key in PRIVATE_ACCESS:
                used_allowances.add(("a", key))
                continue
            found["a"].append(f"{rel}:{line}: {receiver or '<expr>'}.{attr}")

        layer = _layer(module) if module != PACKAGE else None
        for line, base, names, lazy in _imports(tree, module):
            if base.startswith(PRIVATE_MODULES):
                key = (rel, "*") if (rel, "*") in PRIVATE_MODULE_IMPORTS else (rel, base)
                if key in PRIVATE_MODULE_IMPORTS:
                    used_allowances.add(("e", key))
                else:
                    found["e"].append(f"{rel}:{line}: import of {base}")
            if base.startswith((PACKAGE, "passes", "tools")) or base == PACKAGE:
                for name in names:
                    # _tf_internal is the one private module others are meant to import
                    if _is_private(name) and name != "_tf_internal" and not (
                            path.name == "__init__.py" and base.startswith(module)):
                        key = (rel, name)
                        if key in PRIVATE_IMPORTS:
                            used_allowances.add(("b", key))
                        else:
                            found["b"].append(f"{rel}:{line}: from {base} import {name}")
            if layer is None:
                continue
            for target in _targets(base, names):
                target_layer = _layer(target)
                if target == PACKAGE and base == PACKAGE and set(names) <= {
                        "__version__", "TENSORFLOW_PROBLEM"}:
                    continue  # values the facade sets on import, not its lazy names
                if target == PACKAGE and layer != "tools":
                    found["d"].append(f"{rel}:{line}: imports the package facade "
                                      f"{PACKAGE} (which loads every layer)")
                    continue
                if target == PACKAGE or target_layer is None or RANKS[target_layer] <= RANKS[layer]:
                    continue
                key = (rel, target)
                if lazy and key in LAZY_UPWARD:
                    used_allowances.add(("d", key))
                    continue
                how = "inside a function" if lazy else "at module level"
                found["d"].append(f"{rel}:{line}: {layer} imports {target} ({target_layer}) "
                                  f"{how}")

        if path.parent == ROOT / PACKAGE and path.stem in SHIMS:
            found["f"] += [f"{rel}: {p}" for p in _shim_problems(tree, SHIMS[path.stem])]

    stale = [
        f"{kind}: {key}" for kind, table in (("a", PRIVATE_ACCESS), ("b", PRIVATE_IMPORTS),
                                              ("d", LAZY_UPWARD), ("e", PRIVATE_MODULE_IMPORTS))
        for key in table if (kind, key) not in used_allowances
    ]
    found["stale allow-list entries"] = stale
    return found


def _shim_problems(tree: ast.Module, target: str) -> list[str]:
    problems = []
    body = list(tree.body)
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    for stmt in body:
        ok = isinstance(stmt, ast.ImportFrom) and stmt.module == target and (
            [a.name for a in stmt.names] in (["*"], ["__all__"]))
        if not ok:
            problems.append(f"line {stmt.lineno} is not a re-export of {target}")
    return problems


_FOUND: dict[str, list[str]] | None = None


def _found() -> dict[str, list[str]]:
    global _FOUND
    if _FOUND is None:
        _FOUND = _violations()
    return _FOUND


@pytest.mark.parametrize("kind, what", [
    ("a", "cross-module private attribute access"),
    ("b", "private names imported from another module"),
    ("c", "networkx internals"),
    ("d", "a layer importing a higher one"),
    ("e", "private TensorFlow / Keras modules outside _tf_internal.py"),
    ("f", "shims that do more than re-export"),
    ("stale allow-list entries", "allow-list entries nothing needs any more"),
])
def test_boundary(kind, what):
    found = _found()[kind]
    assert not found, f"{what}:\n  " + "\n  ".join(found)


def test_the_layers_known_to_the_test_are_the_package_folders():
    folders = {p.name for p in (ROOT / PACKAGE).iterdir()
               if p.is_dir() and (p / "__init__.py").exists()}
    assert folders <= set(RANKS), folders - set(RANKS)
    assert {p.stem for p in (ROOT / PACKAGE).glob("*.py")} <= (
        set(RANKS) | set(SHIMS) | {"__init__"})


def test_the_checks_catch_what_they_are_for(tmp_path):
    source = (
        "from gradsplit_compiler.core.split import _collector_paused\n"
        "def f(g, x):\n"
        "    x._secret\n"
        "    getattr(x, '_hidden')\n"
        "    return g._pred\n"
    )
    tree = ast.parse(source)
    reads = {attr for _, _, attr in _attribute_reads(tree)}
    assert {"_secret", "_hidden", "_pred"} <= reads
    assert "_secret" not in _defined_names(tree)
    imports = list(_imports(tree, "gradsplit_compiler.ir.graph"))
    assert imports == [(1, "gradsplit_compiler.core.split", ["_collector_paused"], False)]
    assert _layer("gradsplit_compiler.core.split") == "core"
    assert _layer("gradsplit_compiler.costs") == "plan"
    lazy = list(_imports(ast.parse("def f():\n    import passes.partition\n"), "x"))
    assert lazy == [(2, "passes.partition", [], True)]


# file -> reason, for a module of the package or of ``passes`` that may go without
# ``__all__`` (none may).
ALL_MISSING_OK: dict[str, str] = {}


def _module_paths() -> list[Path]:
    return sorted(p for p in [*(ROOT / PACKAGE).rglob("*.py"), *(ROOT / "passes").rglob("*.py")]
                  if "__pycache__" not in p.parts)


def _top_level_names(tree: ast.Module) -> set[str]:
    """Names bound at module level: definitions, assignments (also inside a top-level
    ``try``/``if``), imports."""
    found = set()
    for stmt in tree.body:
        for node in [stmt, *(ast.walk(stmt) if isinstance(stmt, (ast.Try, ast.If)) else [])]:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                found.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                found.update(n.id for t in targets for n in ast.walk(t)
                             if isinstance(n, ast.Name))
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                found.update((a.asname or a.name).split(".")[0] for a in node.names)
    return found


def _literal_all(tree: ast.Module) -> list[str] | None:
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else (
            [node.target] if isinstance(node, ast.AnnAssign) and node.value else [])
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
            try:
                return list(ast.literal_eval(node.value))
            except ValueError:  # built from other names (ir's lazy names)
                return None
    return None


def test_every_module_declares_all():
    missing = [_rel(path) for path in _module_paths()
               if _rel(path) not in ALL_MISSING_OK and "__all__" not in _top_level_names(
                   _tree(path))]
    assert not missing, "modules without __all__:\n  " + "\n  ".join(missing)


def test_every_name_in_all_is_defined():
    stale = []
    for path in _module_paths():
        tree = _tree(path)
        names = _top_level_names(tree)
        if "__getattr__" in names:  # a lazy module: its names load on first use
            continue
        stale += [f"{_rel(path)}: {n}" for n in _literal_all(tree) or [] if n not in names]
    assert not stale, "__all__ names nothing defines:\n  " + "\n  ".join(stale)
