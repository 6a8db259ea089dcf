"""Refresh the derived dtypes and static shapes of every node.

Guarantees afterwards: every node's ``outputs`` attribute lists ``(dtype, shape)`` for each
of its outputs, a known ``tf.DType`` and a ``tf.TensorShape``, as TensorFlow's shape
inference gives them on the current graph (inlined bodies included, with the arguments'
shapes from the input signature); every output index a data edge reads is listed. The graph
itself is unchanged. Nodes whose dtypes are already all known are left as they are (an op
TensorFlow registers without outputs, ``NoOp`` or ``AssignVariableOp``, is known by its empty
list), so the pass costs one C++ import only when an earlier pass added nodes.

``check`` (the pass's ``ensures``) tests the list, the types and the indices read, one look
at each node and edge. Not tested: that the values are what inference would give (that is
the C++ import the pass avoids repeating), that an op nothing reads lists all its outputs
(that needs TensorFlow's op registry), and that the graph is unchanged.

Example
-------
>>> import tensorflow as tf
>>> from gradsplit_compiler.frontend.capture import capture
>>> from passes.refresh_shapes import check, refresh_shapes
>>> program = refresh_shapes(capture(tf.function(lambda x: tf.tanh(x)),
...                                  [tf.TensorSpec([None, 3])]))
>>> check(program)
[]
"""

from __future__ import annotations

import tensorflow as tf

from gradsplit_compiler import _tf_internal, ir
from gradsplit_compiler.ir.program import Program

__all__ = ["check", "refresh_shapes"]

def refresh_shapes(program: Program, nodes=None) -> Program:
    """Infer the dtypes and shapes of the nodes without (``nodes``, an iterable of op
    names, adds those; ``True`` infers every node's again, after an edit that changes what
    later ops see)."""
    g = program.graph
    if nodes is True:
        wanted = set(g.nodes)
    else:
        wanted = set(nodes or ())
    no_outputs: dict[str, bool] = {}
    stale = [n for n, attrs in g.nodes(data=True)
             if n in wanted or not _known(attrs.get("outputs"), attrs.get("op"), no_outputs)]
    if not stale:
        return program
    scratch = tf.Graph()
    with scratch.as_default():
        tf.graph_util.import_graph_def(ir.from_networkx(g), name="")
    for node in stale:
        op = scratch.get_operation_by_name(node)
        g.nodes[node]["outputs"] = [(t.dtype, t.shape) for t in op.outputs]
    return program


def _known(outputs, op: str | None, no_outputs: dict[str, bool]) -> bool:
    """Whether ``outputs`` lists every output with its dtype; an empty list is known only
    for an op type registered without outputs (``no_outputs`` caches the answer per type)."""
    if outputs is None or any(dtype is None for dtype, _ in outputs):
        return False
    if outputs:
        return True
    if op not in no_outputs:
        registered = _tf_internal.op_def(op) if op else None
        no_outputs[op] = registered is not None and not registered.output_arg
    return no_outputs[op]


def check(program: Program) -> list[str]:
    """What the docstring guarantees, as violations (empty when it holds); see the module
    docstring for what is tested and what is not."""
    g = program.graph
    problems = []
    listed: dict[str, int] = {}
    dtype_type, shape_type = tf.DType, tf.TensorShape
    for node, attrs in ir.node_attributes(g).items():
        outputs = attrs.get("outputs")
        if not isinstance(outputs, list):
            problems.append(f"node {node!r} has no outputs list (dtypes and shapes)")
            continue
        listed[node] = len(outputs)
        for i, (dtype, shape) in enumerate(outputs):
            if not isinstance(dtype, dtype_type):
                problems.append(f"output {i} of node {node!r} has no known dtype ({dtype!r})")
            if not isinstance(shape, shape_type):
                problems.append(f"output {i} of node {node!r} has no TensorShape ({shape!r})")
    for src, consumers in ir.successor_edges(g).items():
        if src not in listed:
            continue
        for dst, keyed in consumers.items():
            for a in keyed.values():
                if not a["control"] and a["src_output"] >= listed[src]:
                    problems.append(
                        f"node {dst!r} reads output {a['src_output']} of node {src!r}, which "
                        f"lists {listed[src]} outputs"
                    )
    return problems


refresh_shapes.ensures = check
refresh_shapes.preserves_edges = True  # sets attributes only: see passes/manager.py
