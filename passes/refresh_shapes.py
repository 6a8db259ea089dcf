"""Refresh the derived dtypes and static shapes of every node.

Guarantees afterwards: every node's ``outputs`` attribute lists ``(dtype, shape)`` for each
of its outputs, as TensorFlow's shape inference gives them on the current graph (inlined
bodies included, with the arguments' shapes from the input signature). The graph itself is
unchanged. Nodes whose dtypes are already all known are left as they are, so the pass costs
one C++ import only when an earlier pass added nodes.
"""

from __future__ import annotations

import tensorflow as tf

from gradsplit_compiler import ir
from gradsplit_compiler.ir.program import Program


def refresh_shapes(program: Program) -> Program:
    g = program.graph
    stale = [n for n in g.nodes if not _known(g.nodes[n].get("outputs"))]
    if not stale:
        return program
    scratch = tf.Graph()
    with scratch.as_default():
        tf.graph_util.import_graph_def(ir.from_networkx(g), name="")
    for node in stale:
        op = scratch.get_operation_by_name(node)
        g.nodes[node]["outputs"] = [(t.dtype, t.shape) for t in op.outputs]
    return program


def _known(outputs) -> bool:
    return outputs is not None and all(dtype is not None for dtype, _ in outputs) and (
        outputs != []
    )
