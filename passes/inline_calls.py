"""Inline nested function calls.

Guarantees afterwards: the top-level graph has no ``PartitionedCall`` or
``StatefulPartitionedCall`` op, and no ``SymbolicGradient``. Each call's body is spliced in
under the call's name (``call/inner_op``), reading the call's inputs directly; consumers of
the call's outputs read the body's return tensors; control edges into the call reach every
body op without inputs, and control edges out of it leave from the body's control returns
(its stateful ops), so every side effect still runs exactly once and in order. ``If``/``While``
stay functional: a cut may sit between them, never inside a body; no body of theirs calls a
``tf.function`` (that was refused). Nested calls are inlined until none remain, so a cut can
name a tensor of a nested ``tf.function`` by its inlined name, and gradients never fall back
to ``SymbolicGradient``.

``check`` (the pass's ``ensures``) tests the first and the last two sentences in full; how
each body was spliced is not tested (that needs the call ops, which are gone).

Example
-------
>>> import tensorflow as tf
>>> from gradsplit_compiler.frontend.capture import capture
>>> from passes.inline_calls import inline_calls
>>> inner = tf.function(lambda x: tf.tanh(x))
>>> program = inline_calls(capture(tf.function(lambda x: inner(x) * 2),
...                                [tf.TensorSpec([None])]))
>>> any(program.graph.nodes[n]["op"].endswith("PartitionedCall") for n in program.graph)
False
>>> from passes.inline_calls import check
>>> check(program)
[]
"""

from __future__ import annotations

import networkx as nx
import tensorflow as tf
from tensorflow.core.framework import node_def_pb2

from gradsplit_compiler import _tf_internal, ir
from gradsplit_compiler.errors import GradSplitError
from gradsplit_compiler.ir.program import Program

__all__ = ["CALL_OPS", "check", "inline_calls"]

CALL_OPS = ("PartitionedCall", "StatefulPartitionedCall")


def inline_calls(program: Program) -> Program:
    g = program.graph
    functions = {f.signature.name: f for f in g.graph["library"].function}
    _refuse_calls_in_bodies(g, functions)
    renames: dict[str, str] = {}
    while True:
        calls = [n for n in g.nodes if g.nodes[n]["op"] in CALL_OPS]
        if not calls:
            break
        for call in calls:
            fname = g.nodes[call]["node_def"].attr["f"].func.name
            renames.update(_inline_one(g, call, functions[fname]))
    if renames:
        program.output_names = [renames.get(n, n) for n in program.output_names]
        program.output_structure = tf.nest.map_structure(
            lambda n: renames.get(n, n), program.output_structure
        )
    return program


def _inline_one(g: nx.MultiDiGraph, call: str, fdef) -> dict[str, str]:
    """Splice ``fdef``'s body in place of node ``call``; returns renamed output tensors."""
    call_def = g.nodes[call]["node_def"]
    body, flat_names = _tf_internal.function_body_graph_def(fdef)
    arg_names = [a.name for a in fdef.signature.input_arg]
    call_inputs = ir.data_inputs(g, call)
    arg_source = {name: call_inputs[i] for i, name in enumerate(arg_names)}
    prefix = _free_prefix(g, call)

    def body_tensor(flat: str) -> tuple[str, int]:
        op, index = ir.parse_tensor_name(flat)
        if op in arg_source:
            return arg_source[op]
        return prefix + op, index

    new_nodes = [nd for nd in body.node if nd.name not in arg_source]
    for nd in new_nodes:
        stored = node_def_pb2.NodeDef()
        stored.CopyFrom(nd)
        del stored.input[:]
        stored.name = prefix + nd.name
        if not stored.device:
            stored.device = call_def.device
        g.add_node(stored.name, node_def=stored, op=nd.op, outputs=_shapes(nd))
    control_sources = [u for u, _, a in g.in_edges(call, data=True) if a["control"]]
    for nd in new_nodes:
        data_index = 0
        for inp in nd.input:
            if inp.startswith("^"):
                ir.add_control_edge(g, prefix + inp[1:], prefix + nd.name)
                continue
            src, index = body_tensor(inp)
            ir.add_data_edge(g, src, index, prefix + nd.name, data_index)
            data_index += 1
        if data_index == 0:
            for src in control_sources:
                ir.add_control_edge(g, src, prefix + nd.name)

    returns = [
        body_tensor(flat_names.get(fdef.ret[a.name], fdef.ret[a.name]))
        for a in fdef.signature.output_arg
    ]
    control_returns = [prefix + op for op in fdef.control_ret.values()]
    renames = {}
    for _, dst, _key, a in list(g.out_edges(call, keys=True, data=True)):
        if a["control"]:
            for src in control_returns:
                ir.add_control_edge(g, src, dst)
            continue
        src, index = returns[a["src_output"]]
        ir.add_data_edge(g, src, index, dst, a["dst_input"])
    for i, (src, index) in enumerate(returns):
        renames[ir.tensor_name(call, i)] = ir.tensor_name(src, index)
    g.remove_node(call)
    return renames


def _refuse_calls_in_bodies(g: nx.MultiDiGraph, functions: dict) -> None:
    """A tf.function called inside a tf.cond / tf.while_loop body stays a call op in that
    body, whose gradient TensorFlow can only build as ``SymbolicGradient`` (no kernel, no
    XLA): refuse it by name instead of failing at run time."""
    for node, inner in _calls_in_bodies(g, functions):
        raise GradSplitError(
            f"{g.nodes[node]['op']} {node!r} calls a tf.function "
            f"({inner!r}) inside its body; its gradient would "
            "need SymbolicGradient, which TensorFlow cannot run under XLA or "
            "rebuild here. Call the inner function's Python body directly inside "
            "the tf.cond / tf.while_loop (without tf.function)."
        )


def _calls_in_bodies(g: nx.MultiDiGraph, functions: dict):
    """``(control-flow node, called function)`` for each call op inside a body, at any depth."""
    for node in g.nodes:
        if g.nodes[node]["op"] not in ir.CONTROL_FLOW_OPS:
            continue
        stack = ir.called_functions(g.nodes[node]["node_def"], functions)
        seen: set[str] = set()
        while stack:
            fname = stack.pop()
            if fname in seen:
                continue
            seen.add(fname)
            for nd in functions[fname].node_def:
                if nd.op in CALL_OPS:
                    yield node, nd.attr["f"].func.name
                stack.extend(ir.called_functions(nd, functions))


def check(program: Program) -> list[str]:
    """What the docstring guarantees, as violations (empty when it holds).

    Tested in full: no call op and no ``SymbolicGradient`` in the top-level graph (one look
    at each node), and no call inside an ``If``/``While``/``Case`` body (the bodies are
    walked only when the graph has such an op). Not tested: how each body was spliced
    (names under the call's, control edges moved); the IR check (every output tensor has a
    producer, no cycle) covers what a wrong splice most often breaks.
    """
    g = program.graph
    problems = []
    has_control_flow = False
    for node, attrs in g.nodes(data=True):
        op = attrs["op"]
        if op in CALL_OPS or op == "SymbolicGradient":
            problems.append(f"node {node!r} is a {op} op")
        elif op in ir.CONTROL_FLOW_OPS:
            has_control_flow = True
    if has_control_flow:
        functions = {f.signature.name: f for f in g.graph["library"].function}
        problems += [
            f"{g.nodes[node]['op']} {node!r} calls the tf.function {inner!r} inside its body"
            for node, inner in _calls_in_bodies(g, functions)
        ]
    return problems


inline_calls.ensures = check


def _shapes(nd) -> list:
    if "_output_shapes" in nd.attr:
        return [(None, tf.TensorShape(s)) for s in nd.attr["_output_shapes"].list.shape]
    return []


def _free_prefix(g: nx.MultiDiGraph, call: str) -> str:
    prefix, n = call + "/", 1
    while any(node.startswith(prefix) for node in g.nodes):
        prefix, n = f"{call}_inlined{n}/", n + 1
    return prefix
