"""Inline nested function calls.

Guarantees afterwards: the top-level graph has no ``PartitionedCall`` or
``StatefulPartitionedCall`` op. Each call's body is spliced in under the call's name
(``call/inner_op``), reading the call's inputs directly; consumers of the call's outputs
read the body's return tensors; control edges into the call reach every body op without
inputs, and control edges out of it leave from the body's control returns (its stateful
ops), so every side effect still runs exactly once and in order. ``If``/``While`` stay
functional: a cut may sit between them, never inside a body. Nested calls are inlined
until none remain, so a cut can name a tensor of a nested ``tf.function`` by its inlined
name, and gradients never fall back to ``SymbolicGradient``.

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
"""

from __future__ import annotations

import networkx as nx
import tensorflow as tf
from tensorflow.core.framework import node_def_pb2

from gradsplit_compiler import _tf_internal, ir
from gradsplit_compiler.errors import GradSplitError
from gradsplit_compiler.ir.program import Program

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
                    raise GradSplitError(
                        f"{g.nodes[node]['op']} {node!r} calls a tf.function "
                        f"({nd.attr['f'].func.name!r}) inside its body; its gradient would "
                        "need SymbolicGradient, which TensorFlow cannot run under XLA or "
                        "rebuild here. Call the inner function's Python body directly inside "
                        "the tf.cond / tf.while_loop (without tf.function)."
                    )
                stack.extend(ir.called_functions(nd, functions))


def _shapes(nd) -> list:
    if "_output_shapes" in nd.attr:
        return [(None, tf.TensorShape(s)) for s in nd.attr["_output_shapes"].list.shape]
    return []


def _free_prefix(g: nx.MultiDiGraph, call: str) -> str:
    prefix, n = call + "/", 1
    while any(node.startswith(prefix) for node in g.nodes):
        prefix, n = f"{call}_inlined{n}/", n + 1
    return prefix
