"""A small pass manager: run ``Program -> Program`` passes, check the graph after each.

After torch.fx's ``PassManager``: a failing pass is reported by name together with the
passes that ran before it, and the invariants of the IR are checked after every pass so a
broken graph is caught where it was broken, not three passes later.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import networkx as nx

from gradsplit_compiler.errors import GradSplitError
from gradsplit_compiler.ir.program import Program

Pass = Callable[[Program], Program]


class PassError(RuntimeError):
    """A pass failed or left the graph invalid: a bug in gradsplit_compiler, not the caller's."""


def pass_name(p: Pass) -> str:
    module = getattr(p, "__module__", "") or ""
    return module.rsplit(".", 1)[-1] if module.startswith("passes") else p.__name__


def run_passes(program: Program, passes: Sequence[Pass]) -> Program:
    done: list[str] = []
    for p in passes:
        name = pass_name(p)
        try:
            program = p(program)
        except GradSplitError:
            raise
        except Exception as exc:
            raise PassError(
                f"An error occurred when running the {name!r} pass after the following "
                f"passes: {done}: {type(exc).__name__}: {exc}"
            ) from exc
        problems = check_program(program)
        if problems:
            raise PassError(
                f"The graph is invalid after the {name!r} pass (after {done}): "
                + "; ".join(problems[:5])
            )
        done.append(name)
    return program


def check_program(program: Program) -> list[str]:
    """The IR's invariants; returns a list of violations (empty when the graph is sound)."""
    g = program.graph
    problems: list[str] = []
    if not nx.is_directed_acyclic_graph(g):
        problems.append(f"the graph has a cycle: {nx.find_cycle(g)[:4]}")
    for node in g.nodes:
        indices = sorted(
            a["dst_input"] for _, _, a in g.in_edges(node, data=True) if not a["control"]
        )
        if indices != list(range(len(indices))):
            problems.append(f"node {node!r} has data inputs {indices}, not 0..n-1")
    for name in list(program.arg_names) + list(program.output_names):
        if name.rpartition(":")[0] not in g:
            problems.append(f"tensor {name!r} has no producer in the graph")
    for cut in program.cuts:
        for name in cut:
            if name.rpartition(":")[0] not in g:
                problems.append(f"cut tensor {name!r} has no producer in the graph")
    stage = nx.get_node_attributes(g, "stage")
    if stage:
        for u, v, a in g.edges(data=True):
            su, sv = stage.get(u), stage.get(v)
            if a["control"] or su is None or sv is None:
                continue
            if su > sv and not g.nodes[u].get("replicated"):
                problems.append(
                    f"data edge {u!r} (stage {su}) -> {v!r} (stage {sv}) runs backwards"
                )
    return problems
