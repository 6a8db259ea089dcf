"""Resolve the caller's cut names to graph tensors.

Guarantees afterwards: ``program.cuts`` holds, per entry of ``program.cut_specs``, a
non-empty list of distinct ``"op:index"`` names of floating-point (or complex) tensors of
the top-level graph; no tensor is named by two cuts. A name may be a graph tensor
(``"op:1"``, or ``"op"`` for output 0), a ``gsc.mark`` name, or a Keras layer name (its
output). Every refusal is a ``GradSplitError`` in the caller's terms: unknown names (with
up to five close names), names that could mean more than one tensor (with the candidates),
tensors of integer, boolean or resource dtype, tensors inside a ``tf.cond``/``tf.while_loop``
body, and repeated cuts.

``check`` (the pass's ``ensures``) tests the first sentence in full (one look at each cut
tensor); that each tensor is the one its name means is not tested (that is the pass).

Example
-------
>>> import tensorflow as tf
>>> import gradsplit_compiler as gsc
>>> from gradsplit_compiler.frontend.capture import capture
>>> from passes.resolve_cuts import resolve_cuts
>>> f = tf.function(lambda x: tf.reduce_sum(gsc.mark(tf.tanh(x), "y")))
>>> program = capture(f, [tf.TensorSpec([None])])
>>> program.cut_specs = ["y"]
>>> resolve_cuts(program).cuts
[['gsc.mark.y.:0']]
>>> from passes.resolve_cuts import check
>>> check(program)
[]
"""

from __future__ import annotations

from collections import defaultdict

import networkx as nx

from gradsplit_compiler import ir
from gradsplit_compiler.errors import GradSplitError, unknown_name_message
from gradsplit_compiler.frontend import keras_layers
from gradsplit_compiler.frontend.mark import mark_name_of
from gradsplit_compiler.ir.program import Program

__all__ = ["check", "resolve_cuts"]

def resolve_cuts(program: Program) -> Program:
    if not isinstance(program.cut_specs, (list, tuple)):
        raise GradSplitError(
            f"cuts must be a list with one entry per cut, e.g. ['y'] (an empty list: one "
            f"stage, the whole program); got {program.cut_specs!r}."
        )
    g = program.graph
    marks = _marks(g)
    wanted = {n for e in program.cut_specs for n in (e if isinstance(e, (list, tuple)) else [e])
              if isinstance(n, str)}
    if program.keras_models and not program.keras_layers and (
        wanted & keras_layers.layer_names(program.keras_models) or not all(
            isinstance(n, str) and (n in marks or _graph_tensor(g, n)) for n in wanted
        )
    ):
        # Mapping layers to tensors costs a scratch import: only when a name needs it.
        program.keras_layers = keras_layers.layer_outputs(g, program.keras_models)
    cuts: list[list[str]] = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(program.cut_specs):
        if not isinstance(entry, (str, list, tuple)):
            raise GradSplitError(
                f"cut {i} is {entry!r:.60}, a {type(entry).__name__}; name a cut with a "
                "string ('op:index', "
                "a gsc.mark name or a Keras layer name) or a list of strings."
            )
        names = list(entry) if isinstance(entry, (list, tuple)) else [entry]
        if not names:
            raise GradSplitError(f"cut {i} is an empty list; name at least one tensor.")
        tensors = []
        for name in names:
            if not isinstance(name, str):
                raise GradSplitError(
                    f"cut {i} entry {name!r} is a {type(name).__name__}; name tensors with "
                    "strings ('op:index', a gsc.mark name or a Keras layer name)."
                )
            tensor = _resolve(program, marks, name)
            _check_dtype(program, name, tensor)
            if tensor in seen or tensor in tensors:
                first = seen.get(tensor, i)
                raise GradSplitError(
                    f"cut {i} names {name!r} ({tensor}), which cut {first} already names; "
                    "each tensor may be cut once. Remove the repeated entry."
                )
            tensors.append(tensor)
        for t in tensors:
            seen[t] = i
        cuts.append(tensors)
    program.cuts = cuts
    return program


def _marks(g: nx.MultiDiGraph) -> dict[str, list[str]]:
    found: dict[str, list[str]] = defaultdict(list)
    for node in g.nodes:
        name = mark_name_of(node)
        if name is not None and g.nodes[node]["op"] == "Identity":
            found[name].append(ir.tensor_name(node, 0))
    return found


def _graph_tensor(g: nx.MultiDiGraph, name: str) -> str | None:
    op, index = ir.parse_tensor_name(name)
    if op not in g:
        return None
    outputs = g.nodes[op].get("outputs") or []
    if outputs and index >= len(outputs):
        return None
    return ir.tensor_name(op, index)


def _resolve(program: Program, marks: dict[str, list[str]], name: str) -> str:
    g = program.graph
    meanings: dict[str, list[str]] = {}
    if name in marks:
        meanings["gsc.mark"] = marks[name]
    tensor = _graph_tensor(g, name)
    if tensor is not None:
        meanings["graph tensor"] = [tensor]
    if name in program.keras_layers:
        meanings["Keras layer"] = program.keras_layers[name]
    distinct = sorted({t for ts in meanings.values() for t in ts})
    if len(distinct) == 1:
        return distinct[0]
    if len(distinct) > 1:
        listing = "; ".join(f"{kind} -> {', '.join(ts)}" for kind, ts in meanings.items())
        raise GradSplitError(
            f"cut name {name!r} could mean more than one tensor: {listing}. Name the tensor "
            "itself ('op:index'), or give each gsc.mark a name of its own."
        )
    body = _find_in_bodies(g, name)
    if body is not None:
        op, kind = body
        raise GradSplitError(
            f"cut {name!r} is inside the body of {kind} {op!r} (a tf.cond or "
            "tf.while_loop); a cut may sit between control-flow ops, never inside a body. "
            f"Cut at an input or an output of {op!r} instead."
        )
    candidates = list(g.nodes) + list(marks) + list(program.keras_layers)
    raise GradSplitError(unknown_name_message("cut", name, candidates))


def _find_in_bodies(g: nx.MultiDiGraph, name: str) -> tuple[str, str] | None:
    functions = {f.signature.name: f for f in g.graph["library"].function}
    op_part = ir.parse_tensor_name(name)[0]
    for node in g.nodes:
        op_type = g.nodes[node]["op"]
        if op_type not in ir.CONTROL_FLOW_OPS:
            continue
        for fname in ir.called_functions(g.nodes[node]["node_def"], functions):
            body_nodes = _all_body_nodes(functions, fname)
            for body_node in body_nodes:
                marked = mark_name_of(body_node)
                if op_part in (body_node, f"{node}/{body_node}") or marked == name:
                    return node, op_type
    return None


def _all_body_nodes(functions, fname: str, seen: set[str] | None = None) -> list[str]:
    seen = seen if seen is not None else set()
    if fname in seen:
        return []
    seen.add(fname)
    nodes = []
    for nd in functions[fname].node_def:
        nodes.append(nd.name)
        for called in ir.called_functions(nd, functions):  # branches of a Case too
            nodes.extend(_all_body_nodes(functions, called, seen))
    return nodes


def _check_dtype(program: Program, name: str, tensor: str) -> None:
    dtype = program.tensor_dtype(tensor)
    if dtype is not None and not dtype.is_floating and not dtype.is_complex:
        raise GradSplitError(
            f"cut {name!r} is the tensor {tensor} of dtype {dtype.name}; a cut must carry a "
            "floating-point tensor so a cotangent can flow back through it. Cut at a float "
            "tensor that this value is computed from or feeds."
        )


def check(program: Program) -> list[str]:
    """What the docstring guarantees, as violations (empty when it holds)."""
    g = program.graph
    problems = []
    if len(program.cuts) != len(program.cut_specs):
        problems.append(
            f"there are {len(program.cuts)} resolved cuts for {len(program.cut_specs)} cut "
            "entries"
        )
    seen: dict[str, int] = {}
    for k, cut in enumerate(program.cuts):
        if not cut:
            problems.append(f"cut {k} names no tensor")
        for tensor in cut:
            op, _, index = str(tensor).rpartition(":")
            if not op or not index.isdigit() or op not in g:
                problems.append(f"cut {k} names {tensor!r}, not a tensor of the top-level graph")
                continue
            outputs = g.nodes[op].get("outputs") or []
            if int(index) >= len(outputs):
                problems.append(f"cut {k} names {tensor!r}, but node {op!r} lists "
                                f"{len(outputs)} outputs")
                continue
            dtype = outputs[int(index)][0]
            if dtype is None or not (dtype.is_floating or dtype.is_complex):
                problems.append(f"cut {k} names {tensor!r} of dtype "
                                f"{getattr(dtype, 'name', dtype)}, not floating-point")
            if tensor in seen:
                other = "twice" if seen[tensor] == k else f"as cut {seen[tensor]} does"
                problems.append(f"cut {k} names {tensor!r} {other}")
            seen.setdefault(tensor, k)
    return problems


resolve_cuts.ensures = check
resolve_cuts.preserves_edges = True  # sets attributes only: see passes/manager.py
