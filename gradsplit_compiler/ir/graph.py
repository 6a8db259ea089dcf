"""The IR: a TensorFlow GraphDef as a ``networkx.MultiDiGraph``, lossless both ways.

One node per TF op, keyed by op name, holding

- ``node_def``: the op's ``NodeDef`` with its ``input`` list cleared (the edges hold it);
- ``op``: the op type; ``outputs``: a list of ``(tf.DType | None, tf.TensorShape)`` per
  output, derived, cheap to query, filled when a ``tf.Graph`` or shapes are at hand;
- after capture, ``variable`` on the placeholder of a captured variable (its name); after
  partition, ``stage`` (``None`` for inputs and dead ops) and ``stages`` (where copies run).

One edge per use. A data edge ``u -> v`` carries ``src_output`` (the producer's output
index) and ``dst_input`` (the consumer's input index) and is keyed ``dst_input`` so that
parallel edges survive; a control edge carries ``control=True`` and its position among
the consumer's control inputs and is keyed ``"^" + str(position)``.

The graph-level dict holds the function ``library``, the ``versions`` and the original
node order is the networkx node order.

Examples
--------
>>> import tensorflow as tf
>>> import gradsplit_compiler as gsc
>>> gd = tf.function(lambda x: tf.tanh(x) * 2).get_concrete_function(
...     tf.TensorSpec([None, 3])).graph.as_graph_def()
>>> gsc.from_networkx(gsc.to_networkx(gd)) == gd
True
"""

from __future__ import annotations

from operator import itemgetter

import networkx as nx
import tensorflow as tf
from tensorflow.core.framework import graph_pb2, node_def_pb2

from gradsplit_compiler.ir import GRAPH_NAMES
from gradsplit_compiler.ir.names import parse_tensor_name

__all__ = list(GRAPH_NAMES)  # parse_tensor_name, tensor_name: ir.names


def _input_string(op: str, index: int) -> str:
    return op if index == 0 else f"{op}:{index}"


def to_networkx(graph_def: graph_pb2.GraphDef, graph: tf.Graph | None = None, *,
                consume: bool = False, shapes: bool = True) -> nx.MultiDiGraph:
    """Convert a ``GraphDef`` to the IR. ``graph``, when given, supplies dtypes and shapes.

    Parameters
    ----------
    graph_def : GraphDef
        Any GraphDef TensorFlow produced.
    graph : tf.Graph, optional
        The graph ``graph_def`` was exported from; its ops give each node's output dtypes
        and static shapes. Without it, shapes come from the ``_output_shapes`` attribute
        when present and dtypes are left unknown.
    consume : bool
        ``graph_def`` is the caller's to give away (exported for this call alone): its
        node defs become the nodes' (their inputs cleared) instead of being copied.
    shapes : bool
        With ``graph``: record each output's static shape (else ``None``: a graph read only
        for its dtypes and edges saves asking TensorFlow for every shape).

    Returns
    -------
    networkx.MultiDiGraph
    """
    g = nx.MultiDiGraph()
    library = graph_pb2.GraphDef().library
    library.CopyFrom(graph_def.library)
    g.graph["library"] = library
    versions = graph_pb2.GraphDef().versions
    versions.CopyFrom(graph_def.versions)
    g.graph["versions"] = versions
    g.graph["has_versions"] = graph_def.HasField("versions")
    g.graph["has_library"] = graph_def.HasField("library")

    ops = {op.name: op for op in graph.get_operations()} if graph is not None else {}
    nodes = []
    edges = []
    for nd in graph_def.node:
        name = nd.name
        inputs = nd.input
        if consume:
            stored = nd
        else:
            stored = node_def_pb2.NodeDef()
            stored.CopyFrom(nd)
            del stored.input[:]
        nodes.append((name, {"node_def": stored, "op": nd.op,
                             "outputs": _outputs_of(nd, ops.get(name), shapes)}))
        data_index = 0
        control_index = 0
        for inp in inputs:
            if inp.startswith("^"):
                edges.append((inp[1:], name, f"^{control_index}",
                              {"control": True, "position": control_index}))
                control_index += 1
                continue
            src, index = (inp, 0) if ":" not in inp else parse_tensor_name(inp)
            edges.append((src, name, data_index,
                          {"control": False, "src_output": index, "dst_input": data_index}))
            data_index += 1
        if consume:
            del inputs[:]
    g.add_nodes_from(nodes)
    if not set(map(itemgetter(0), edges)) <= set(map(itemgetter(0), nodes)):
        for src, dst, _, a in edges:
            if src not in g:
                inp = "^" + src if a["control"] else _input_string(src, a["src_output"])
                raise ValueError(f"GraphDef node {dst!r} reads {inp!r}, which is not a node")
    # ``add_edge`` itself: ``add_edges_from`` calls it too, then copies each edge's
    # attributes in again through a view (``g[u][v][key].update``).
    add_edge = g.add_edge
    for src, dst, key, a in edges:
        add_edge(src, dst, key, **a)
    return g


def _outputs_of(nd: node_def_pb2.NodeDef, op: tf.Operation | None,
                shapes: bool = True) -> list:
    """``(dtype, shape)`` of each output of ``nd``: from ``op`` (its operation in the graph
    it was exported from) when there is one, else shapes from ``_output_shapes``."""
    if op is not None:
        if not shapes:
            return [(t.dtype, None) for t in op.outputs]
        return [(t.dtype, t.shape) for t in op.outputs]
    if "_output_shapes" in nd.attr:
        return [(None, tf.TensorShape(s)) for s in nd.attr["_output_shapes"].list.shape]
    return []


def from_networkx(graph: nx.MultiDiGraph) -> graph_pb2.GraphDef:
    """Convert the IR back to a ``GraphDef``: nodes in graph order, inputs from the edges.

    ``from_networkx(to_networkx(gd)) == gd`` for every GraphDef TensorFlow produced.
    """
    gd = graph_pb2.GraphDef()
    if graph.graph.get("has_versions", True) and "versions" in graph.graph:
        gd.versions.CopyFrom(graph.graph["versions"])
    if graph.graph.get("has_library", True) and "library" in graph.graph:
        gd.library.CopyFrom(graph.graph["library"])
    pred = predecessor_edges(graph)
    for name, attrs in graph.nodes(data=True):
        nd = gd.node.add()
        nd.CopyFrom(attrs["node_def"])
        nd.input.extend(inputs_from_edges(pred[name].items()))
    return gd


def node_inputs(graph: nx.MultiDiGraph, name: str) -> list[str]:
    """The ``NodeDef.input`` strings of node ``name``: data inputs in order, then control."""
    return inputs_from_edges(graph.pred[name].items())


def inputs_from_edges(in_edges) -> list[str]:
    """``node_inputs`` from a node's entry of ``predecessor_edges`` (``.items()`` of it):
    the form for loops over every node, without a networkx view per node."""
    data, control = [], []
    for src, edges in in_edges:
        for attrs in edges.values():
            if attrs["control"]:
                control.append((attrs.get("position", 1 << 30), src))
            else:
                data.append((attrs["dst_input"], _input_string(src, attrs["src_output"])))
    data.sort()
    control.sort()
    return [s for _, s in data] + ["^" + s for _, s in control]


def add_control_edge(graph: nx.MultiDiGraph, src: str, dst: str) -> None:
    """Add ``^src`` as the last control input of ``dst`` (no-op if already there)."""
    positions = [a.get("position", 0) for _, _, a in graph.in_edges(dst, data=True) if a["control"]]
    if any(a["control"] for a in (graph.get_edge_data(src, dst) or {}).values()):
        return
    position = max(positions, default=-1) + 1
    graph.add_edge(src, dst, key=f"^{position}", control=True, position=position)


def add_data_edge(graph: nx.MultiDiGraph, src: str, src_output: int, dst: str,
                  dst_input: int) -> None:
    graph.add_edge(src, dst, key=dst_input, control=False, src_output=src_output,
                   dst_input=dst_input)


def data_inputs(graph: nx.MultiDiGraph, name: str) -> list[tuple[str, int]]:
    """The ``(producer, output index)`` of each data input of ``name``, in input order."""
    edges = [
        (a["dst_input"], src, a["src_output"])
        for src, _, a in graph.in_edges(name, data=True)
        if not a["control"]
    ]
    return [(src, idx) for _, src, idx in sorted(edges)]


def data_consumers(graph: nx.MultiDiGraph, name: str) -> list[tuple[str, int, int]]:
    """``(consumer, producer output index, consumer input index)`` for each data use."""
    return [
        (dst, a["src_output"], a["dst_input"])
        for _, dst, a in graph.out_edges(name, data=True)
        if not a["control"]
    ]


def ancestors(graph: nx.MultiDiGraph, nodes, within: set | None = None,
              data_only: bool = False) -> set[str]:
    """``nodes`` and every node they depend on, in one sweep over all sources.

    ``networkx.ancestors`` answers one source at a time, which is quadratic when a pass
    asks for the ancestors of hundreds of stateful ops; this is the multi-source form.
    ``within`` restricts the walk to a set of nodes; ``data_only`` ignores control edges.
    """
    return _reach(predecessor_edges(graph), nodes, within, data_only)


def descendants(graph: nx.MultiDiGraph, nodes, within: set | None = None,
                data_only: bool = False) -> set[str]:
    """``nodes`` and every node that depends on them (the multi-source form)."""
    return _reach(successor_edges(graph), nodes, within, data_only)


def _reach(adjacency: dict, nodes, within, data_only) -> set[str]:
    # ``adjacency`` is plain dicts (``predecessor_edges``/``successor_edges``), so each step
    # is one set operation on a dict's keys rather than a loop over networkx views.
    found = set(nodes) if within is None else {n for n in nodes if n in within}
    stack = list(found)
    while stack:
        neighbours = adjacency[stack.pop()]
        if data_only:
            new = {other for other, edges in neighbours.items()
                   if other not in found and not all(a["control"] for a in edges.values())}
            if within is not None:
                new &= within
        elif within is None:
            new = neighbours.keys() - found
        else:
            new = (neighbours.keys() & within) - found
        if new:
            found |= new
            stack.extend(new)
    return found


# -- the whole graph at once, as plain dicts ------------------------------------------------------
# For passes over every node of programs of 100,000 ops: networkx's views (``graph.nodes[n]``,
# ``graph.pred[n]``) build a wrapper object per lookup, which then costs more than the work.
# These hand out networkx's own dicts through its public API, in one call each; read them,
# never change them (change the graph through networkx).


def node_attributes(graph: nx.MultiDiGraph) -> dict[str, dict]:
    """``{op name: its attribute dict}`` in node order (``graph.nodes(data=True)``)."""
    return dict(iter(graph.nodes(data=True)))


def successor_edges(graph: nx.MultiDiGraph) -> dict[str, dict[str, dict]]:
    """``{u: {v: {key: edge attributes}}}`` over the edges leaving each node, in node order
    (``graph.adjacency()``)."""
    return dict(graph.adjacency())


def predecessor_edges(graph: nx.MultiDiGraph) -> dict[str, dict[str, dict]]:
    """``{v: {u: {key: edge attributes}}}`` over the edges entering each node, in node order
    (``graph.reverse(copy=False).adjacency()``: the reverse view costs nothing)."""
    return dict(graph.reverse(copy=False).adjacency())


def topological_order(graph: nx.MultiDiGraph) -> list[str] | None:
    """The nodes, each after every node it depends on (``networkx.topological_sort``), or
    ``None`` when ``graph`` has a cycle (the IR check's cycle test)."""
    try:
        return list(nx.topological_sort(graph))
    except nx.NetworkXUnfeasible:
        return None


def order_among(nodes, edges) -> list[str]:
    """``nodes``, each after those of them it depends on through ``edges`` (``(src, dst)``
    pairs between them): ``networkx.topological_sort`` of a ``DiGraph`` of these alone, for
    a few nodes of a large graph (a subgraph view of the whole graph costs more than
    sorting it whole). Raises networkx's ``NetworkXUnfeasible`` on a cycle."""
    among = nx.DiGraph()
    among.add_nodes_from(nodes)
    among.add_edges_from(edges)
    return list(nx.topological_sort(among))


# Ops whose bodies (tf.cond branches, tf.while_loop cond and body) are library functions.
CONTROL_FLOW_OPS = ("If", "StatelessIf", "While", "StatelessWhile", "Case", "StatelessCase")


def called_functions(node_def: node_def_pb2.NodeDef, functions) -> list[str]:
    """The names in ``functions`` (the library, by name) that ``node_def``'s attributes
    name: a single function (``then_branch``, ``body``, ``f``, ...) or a list of them
    (``branches``), in attribute order."""
    names = []
    for value in node_def.attr.values():
        if value.HasField("func") and value.func.name in functions:
            names.append(value.func.name)
        names.extend(f.name for f in value.list.func if f.name in functions)
    return names
