"""A small pass manager: run ``Program -> Program`` passes, check the graph after each.

After torch.fx's ``PassManager``: a failing pass is reported by name together with the
passes that ran before it, and the invariants of the IR are checked after every pass so a
broken graph is caught where it was broken, not three passes later.

A pass may carry an ``ensures`` attribute (torch.fx's ``PassBase.ensures``): a function of
the program returning the violations of what the pass guarantees (an empty list when it
holds). A pass may assume the guarantees of the passes before it and must keep them, so
after each pass the manager checks the guarantees of every pass that has run so far, its
own included, and names both the pass that broke one and the pass whose guarantee it was.
The order of the passes, in phases, is declared in ``passes/__init__.py``.

A pass of ``passes/`` that never adds or removes a node or an edge says so with a
``preserves_edges = True`` attribute (LLVM's "preserves the CFG"): after it the manager skips
the structural half of the IR check (no cycle, data inputs numbered 0..n-1), which held
before the pass and which only a change of nodes or edges can break; on a 100,000-op program
each cycle test is a topological sort of the whole graph. The rest of the check still runs.
A pass of the caller's own gets the whole check whatever it declares.

A pass of the caller's own (any pass not defined in ``passes/``) is checked harder: after
it, ``gradsplit_compiler.ir.edit.problems`` must find nothing TensorFlow would refuse
(dangling inputs, cycles, unknown ops, missing attributes, dtype mismatches...), and every
failure it causes is a ``UserPassError``, a ``GradSplitError`` naming the pass and the
node, raised before anything is imported into TensorFlow's runtime.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import networkx as nx

from gradsplit_compiler import ir
from gradsplit_compiler.errors import GradSplitError
from gradsplit_compiler.ir import edit
from gradsplit_compiler.ir.program import Program
from gradsplit_compiler.util import phase

__all__ = ["Pass", "PassError", "UserPassError", "check_program", "is_users", "pass_name",
           "run_passes"]

Pass = Callable[[Program], Program]
# What a pass guarantees afterwards, as a function: the violations, empty when it holds.
Check = Callable[[Program], list]


class PassError(RuntimeError):
    """A pass failed, left the graph invalid or broke a guarantee: a bug in that pass (of
    gradsplit_compiler, or of the caller when it passes its own), not in the caller's input."""


class UserPassError(PassError, GradSplitError):
    """A pass of the caller's own failed or left a graph TensorFlow cannot run: the caller's
    error, so a ``GradSplitError``, naming the pass and the node."""


def is_users(p: Pass) -> bool:
    """Whether ``p`` is a pass of the caller's own (not one of the pass modules of
    ``passes/``)."""
    module = getattr(p, "__module__", "") or ""
    return not module.startswith("passes.")


def pass_name(p: Pass) -> str:
    module = getattr(p, "__module__", "") or ""
    return module.rsplit(".", 1)[-1] if module.startswith("passes.") else p.__name__


def run_passes(program: Program, passes: Sequence[Pass], *,
               established: Sequence[Pass] = ()) -> Program:
    """Run ``passes`` in order, checking the IR and the guarantees in force after each.

    ``established`` are passes that ran on ``program`` before (an earlier phase): their
    guarantees are in force from the start and checked after every pass too.
    """
    in_force: list[tuple[str, Check]] = []
    for p in established:
        _establish(in_force, p)
    for owner, ensures in in_force:
        problems = ensures(program)
        if problems:
            raise PassError(
                f"The program does not meet the guarantee of the {owner!r} pass, which ran "
                "before these passes: " + "; ".join(problems[:5])
            )
    done: list[str] = []
    for p in passes:
        name = pass_name(p)
        users = is_users(p)
        error = UserPassError if users else PassError
        try:
            with phase(f"pass {name}"):
                result = p(program)
        except GradSplitError as exc:
            if not users:
                raise
            raise UserPassError(f"The {name!r} pass (after {done}) failed: {exc}") from None
        except Exception as exc:
            raise error(
                f"An error occurred when running the {name!r} pass after the following "
                f"passes: {done}: {type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(result, Program):
            raise error(f"The {name!r} pass returned {type(result).__name__}, not the "
                        "Program; a pass returns the program it was given (or a new one).")
        program = result
        with phase("checks"):
            problems = check_program(
                program, structure=users or not getattr(p, "preserves_edges", False))
        if problems:
            raise error(
                f"The graph is invalid after the {name!r} pass (after {done}): "
                + "; ".join(problems[:5])
            )
        if users:
            broken = edit.problems(program)
            if broken:
                raise UserPassError(
                    f"The {name!r} pass (after {done}) left a graph TensorFlow cannot run: "
                    + "; ".join(f"node {node!r} {what}" for node, what in broken[:5])
                    + ". Nothing was run; fix the pass (gradsplit_compiler.ir.edit builds "
                    "nodes checked against TensorFlow's op registry)."
                )
        _establish(in_force, p)
        for owner, ensures in in_force:
            with phase("checks"):
                problems = ensures(program)
            if problems:
                what = ("did not meet its guarantee" if owner == name
                        else f"broke the guarantee of the {owner!r} pass")
                raise error(
                    f"The {name!r} pass {what} (after {done}): "
                    + "; ".join(problems[:5])
                )
        done.append(name)
    return program


def _establish(in_force: list[tuple[str, Check]], p: Pass) -> None:
    ensures = getattr(p, "ensures", None)
    if ensures is not None and all(e is not ensures for _, e in in_force):
        in_force.append((pass_name(p), ensures))


def check_program(program: Program, structure: bool = True) -> list[str]:
    """The IR's invariants; returns a list of violations (empty when the graph is sound).

    ``structure=False`` leaves out what only adding or removing nodes and edges can break
    (a cycle, data inputs not numbered 0..n-1): after a pass that ``preserves_edges``."""
    g = program.graph
    problems: list[str] = []
    if structure:
        if ir.topological_order(g) is None:
            problems.append(f"the graph has a cycle: {nx.find_cycle(g)[:4]}")
        for node, preds in ir.predecessor_edges(g).items():
            indices = sorted(a["dst_input"] for keyed in preds.values()
                             for a in keyed.values() if not a["control"])
            if indices != list(range(len(indices))):
                problems.append(f"node {node!r} has data inputs {indices}, not 0..n-1")
    for name in list(program.arg_names) + list(program.output_names):
        if name.rpartition(":")[0] not in g:
            problems.append(f"tensor {name!r} has no producer in the graph")
    for cut in program.cuts:
        for name in cut:
            if name.rpartition(":")[0] not in g:
                problems.append(f"cut tensor {name!r} has no producer in the graph")
    attrs = ir.node_attributes(g)
    if any("stage" in a for a in attrs.values()):
        for u, consumers in ir.successor_edges(g).items():
            su = attrs[u].get("stage")
            if su is None or attrs[u].get("replicated"):
                continue
            for v, keyed in consumers.items():
                sv = attrs[v].get("stage")
                if sv is None or su <= sv:
                    continue
                for a in keyed.values():
                    if not a["control"]:
                        problems.append(
                            f"data edge {u!r} (stage {su}) -> {v!r} (stage {sv}) runs "
                            "backwards"
                        )
    return problems
