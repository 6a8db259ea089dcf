"""The IR layer: TensorFlow GraphDefs as networkx graphs, tensor names, the ``Program``.

Every other layer reads this one; it reads only ``gradsplit_compiler.errors`` and
``gradsplit_compiler._tf_internal``. ``gradsplit_compiler.ir.graph`` documents the graph's
node, edge and graph attributes; ``gradsplit_compiler.ir.program`` the ``Program`` that
passes receive and return; ``gradsplit_compiler.ir.names`` the names of tensors and marks;
``gradsplit_compiler.ir.edit`` the helpers a pass uses to find, build, rewire and check
nodes.

The names of ``ir.graph`` are loaded on first use: ``ir.graph`` imports TensorFlow, and
``ir.names`` (which drawing and ``gradsplit --help`` read) must not.
"""

from __future__ import annotations

from typing import Any

from gradsplit_compiler.ir.names import parse_tensor_name, tensor_name

# The names of ir.graph, imported on first use (ir.graph's own __all__ is this tuple).
GRAPH_NAMES = (
    "CONTROL_FLOW_OPS",
    "add_control_edge",
    "add_data_edge",
    "ancestors",
    "called_functions",
    "data_consumers",
    "data_inputs",
    "descendants",
    "from_networkx",
    "inputs_from_edges",
    "node_attributes",
    "node_inputs",
    "order_among",
    "predecessor_edges",
    "successor_edges",
    "to_networkx",
    "topological_order",
)
__all__ = ["parse_tensor_name", "tensor_name", *GRAPH_NAMES]
_GRAPH = frozenset(GRAPH_NAMES)


def __getattr__(name: str) -> Any:
    if name in _GRAPH:
        from gradsplit_compiler.ir import graph

        value = getattr(graph, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_GRAPH))
