"""Editing a ``Program``'s graph: what a pass author needs, on networkx and TensorFlow's op
registry.

- **Find**: ``find_nodes`` (by op type, name scope, name), ``layer_outputs`` (Keras layers
  by a regular expression over their names, as the tensors they output).
- **Build**: ``add_node`` makes a node from an op type, its inputs (graph tensors) and
  attributes through TensorFlow's own op constructors (``tf.raw_ops``), so the attributes
  are checked against the op registry, type attributes are inferred from the inputs, and the
  node's output dtypes and static shapes are TensorFlow's; ``add_constant`` a ``Const``.
- **Rewire**: ``insert_after`` (a new op reading a tensor, whose consumers then read the new
  op), ``replace_uses`` (every use of a tensor -> another tensor), ``replace_node`` and
  ``replace_subgraph`` (uses of the old nodes' outputs -> new tensors, old nodes removed),
  ``mark`` (a ``gsc.mark`` a cut may name), ``offer_cut`` (a candidate for ``auto_split``).
- **Check**: ``problems`` lists what keeps TensorFlow from running the graph: dangling
  inputs, cycles, unknown ops, missing or unknown attributes, wrong input counts and dtypes
  (the op registry), then anything else TensorFlow's importer refuses. The pass manager
  calls it after every pass of the caller's own; ``gsc.to_function`` before importing.

Shapes: a node made here has TensorFlow's dtypes and shapes for the inputs it was given;
when an edit changes what later ops see, ``passes.refresh_shapes.refresh_shapes(program,
nodes=...)`` infers theirs again (``nodes=True``: all).

Example
-------
Square -> Mul(x, x), by hand:

>>> import tensorflow as tf
>>> import gradsplit_compiler as gsc
>>> from gradsplit_compiler.ir import edit
>>> program = gsc.capture(lambda x: tf.reduce_sum(tf.square(x)), [tf.TensorSpec([None])])
>>> [square] = edit.find_nodes(program, op="Square")
>>> x = edit.data_input(program, square, 0)
>>> product = edit.add_node(program, "Mul", [x, x])
>>> edit.replace_node(program, square, [product])
>>> edit.find_nodes(program, op="Square"), edit.problems(program)
([], [])
>>> float(gsc.to_function(program)(tf.constant([1.0, 2.0])))
5.0
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import networkx as nx
import tensorflow as tf
from tensorflow.core.framework import types_pb2

from gradsplit_compiler import _tf_internal
from gradsplit_compiler.errors import GradSplitError, close_names
from gradsplit_compiler.ir import graph as irg
from gradsplit_compiler.ir.names import mark_op_name, parse_tensor_name, tensor_name
from gradsplit_compiler.ir.program import Program

__all__ = [
    "add_constant",
    "add_node",
    "data_input",
    "find_nodes",
    "insert_after",
    "layer_outputs",
    "mark",
    "offer_cut",
    "problems",
    "remove_nodes",
    "replace_node",
    "replace_subgraph",
    "replace_uses",
]


# -- finding -------------------------------------------------------------------------------------


def find_nodes(program: Program, *, op: str | Iterable[str] | None = None,
               scope: str | None = None, name: str | None = None) -> list[str]:
    """Op names of the nodes that match every criterion given, in graph order.

    ``op``: an op type or several; ``scope``: a regular expression matched
    (``re.fullmatch``) against some prefix of the op's name scope, ``"dense_1"`` finds
    ``"model/dense_1/MatMul"``; ``name``: a regular expression searched in the op name.
    """
    types = {op} if isinstance(op, str) else (set(op) if op is not None else None)
    scope_re = re.compile(scope) if scope is not None else None
    name_re = re.compile(name) if name is not None else None
    found = []
    for node, attrs in program.graph.nodes(data=True):
        if types is not None and attrs.get("op") not in types:
            continue
        if name_re is not None and not name_re.search(node):
            continue
        if scope_re is not None:
            parts = node.split("/")[:-1]
            if not any(scope_re.fullmatch("/".join(parts[i:j]))
                       for i in range(len(parts)) for j in range(i + 1, len(parts) + 1)):
                continue
        found.append(node)
    return found


def layer_outputs(program: Program, pattern: str) -> dict[str, list[str]]:
    """``{layer name: its output tensors}`` for the Keras layers of the models ``fn`` calls
    whose name matches ``pattern`` (``re.fullmatch``), in data-flow order."""
    # The one place that knows Keras' layer graph is the frontend (a lazy import: ir sits
    # below it, and only this helper needs it).
    from gradsplit_compiler.frontend import keras_layers

    if not program.keras_models:
        raise GradSplitError(
            "layer_outputs needs a program traced from a keras.Model (or a function calling "
            "one); this program calls none. Find nodes by name scope instead: "
            "find_nodes(program, scope=...)."
        )
    if not program.keras_layers:
        program.keras_layers = keras_layers.layer_outputs(program.graph, program.keras_models)
    regex = re.compile(pattern)
    found = {layer: list(tensors) for layer, tensors in program.keras_layers.items()
             if regex.fullmatch(layer)}
    order = {n: i for i, n in enumerate(program.graph)}
    return dict(sorted(found.items(), key=lambda kv: min(
        order.get(parse_tensor_name(t)[0], 0) for t in kv[1]) if kv[1] else 0))


def data_input(program: Program, node: str, index: int) -> str:
    """The tensor (``"op:index"``) node ``node`` reads as its data input ``index``."""
    inputs = irg.data_inputs(program.graph, _node(program, node))
    if not 0 <= index < len(inputs):
        raise GradSplitError(f"node {node!r} has {len(inputs)} data inputs; there is no "
                             f"input {index}.")
    return tensor_name(*inputs[index])


# -- building ------------------------------------------------------------------------------------


def add_node(program: Program, op_type: str, inputs: Sequence | Mapping = (), *,
             name: str | None = None, **attrs: Any) -> str:
    """Add a node of ``op_type`` reading graph tensors; returns its first output's name.

    ``inputs`` lists one graph tensor per input argument of the op (a list of tensors for a
    list argument, as ``AddN``'s), or maps argument names to them; ``attrs`` are the op's
    attributes by name, as ``tf.raw_ops.<op_type>`` takes them (type attributes are
    inferred from the inputs). The op is made by TensorFlow's constructor in a scratch
    graph, so an unknown op, a missing or unknown attribute or an input of the wrong dtype
    is refused here, as a ``GradSplitError`` naming it. ``name`` defaults to
    ``"<op_type>"`` made unique.
    """
    op_def = _tf_internal.op_def(op_type)
    constructor = getattr(tf.raw_ops, op_type, None)
    if op_def is None or constructor is None:
        close = close_names(op_type, [n for n in dir(tf.raw_ops) if not n.startswith("_")])
        hint = f" Close op types: {', '.join(close)}." if close else ""
        raise GradSplitError(
            f"{op_type!r} is not an op type TensorFlow registers (tf.raw_ops has no such "
            f"op).{hint}"
        )
    arg_names = [a.name for a in op_def.input_arg]
    if isinstance(inputs, Mapping):
        given = dict(inputs)
    else:
        inputs = list(inputs)
        if len(inputs) != len(arg_names):
            raise GradSplitError(
                f"a {op_type} node takes {len(arg_names)} inputs ({', '.join(arg_names)}); "
                f"got {len(inputs)}."
            )
        given = dict(zip(arg_names, inputs))
    unknown = set(given) - set(arg_names)
    if unknown:
        raise GradSplitError(f"a {op_type} node has no input named {sorted(unknown)}; its "
                             f"inputs are {arg_names}.")
    op_name = _fresh_name(program, name or op_type)
    scratch = tf.Graph()
    sources: dict[str, str] = {}  # scratch placeholder op -> program tensor
    with scratch.as_default():
        def stand_in(t):
            if not isinstance(t, str):
                raise GradSplitError(
                    f"inputs of add_node are graph tensor names ('op:index'); got {t!r:.60} "
                    "(make a constant with add_constant)."
                )
            if program.tensor_dtype(_tensor(program, t)) is None:
                raise GradSplitError(f"tensor {t!r} has no known dtype; run refresh_shapes "
                                     "first.")
            spec = program.tensor_spec(_tensor(program, t))
            ph = tf.compat.v1.placeholder(spec.dtype, spec.shape)
            sources[ph.op.name] = _tensor(program, t)
            return ph

        kwargs = {arg: ([stand_in(t) for t in value] if isinstance(value, (list, tuple))
                        else stand_in(value)) for arg, value in given.items()}
        try:
            result = constructor(**kwargs, **attrs, name=op_name)
        except (TypeError, ValueError) as exc:
            raise GradSplitError(f"cannot make a {op_type} node: {_first_line(exc)}") from None
    made = result.op if hasattr(result, "op") else (
        result[0].op if isinstance(result, (list, tuple)) and result else
        scratch.get_operation_by_name(op_name))
    _add_made(program, made, sources)
    return tensor_name(made.name, 0)


def add_constant(program: Program, value: Any, dtype: tf.DType | None = None, *,
                 name: str = "Const") -> str:
    """Add a ``Const`` node holding ``value``; returns its tensor name."""
    scratch = tf.Graph()
    with scratch.as_default():
        try:
            t = tf.constant(value, dtype=dtype, name=_fresh_name(program, name))
        except (TypeError, ValueError) as exc:
            raise GradSplitError(f"cannot make a constant of {value!r:.60}: "
                                 f"{_first_line(exc)}") from None
    _add_made(program, t.op, {})
    return t.name


def _add_made(program: Program, op: tf.Operation, sources: dict[str, str]) -> None:
    g = program.graph
    node_def = op.node_def
    del node_def.input[:]
    g.add_node(op.name, node_def=node_def, op=op.type,
               outputs=[(t.dtype, t.shape) for t in op.outputs])
    for i, t in enumerate(op.inputs):
        src, index = parse_tensor_name(sources[t.op.name])
        irg.add_data_edge(g, src, index, op.name, i)


def insert_after(program: Program, tensor: str, op_type: str, extra_inputs: Sequence = (),
                 *, name: str | None = None, **attrs: Any) -> str:
    """Add a node of ``op_type`` reading ``tensor`` (then ``extra_inputs``), and make every
    other reader of ``tensor`` (and the program's outputs) read the new node's output 0
    instead; returns that tensor's name. A cut resolved at ``tensor`` stays there."""
    tensor = _tensor(program, tensor)
    new = add_node(program, op_type, [tensor, *extra_inputs], name=name, **attrs)
    replace_uses(program, tensor, new, keep=[parse_tensor_name(new)[0]])
    return new


def mark(program: Program, tensor: str, mark_name: str) -> str:
    """Insert a ``gsc.mark`` named ``mark_name`` after ``tensor`` (an ``Identity`` whose
    name ``gsc.split`` recognises), so that a cut may name it; returns the mark's tensor."""
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", mark_name or ""):
        raise GradSplitError(f"mark name {mark_name!r} must be a non-empty string of "
                             "letters, digits, '_', '.' and '-'.")
    op_name = mark_op_name(mark_name)
    if op_name in program.graph:
        raise GradSplitError(f"the program already has a gsc.mark named {mark_name!r}; give "
                             "each mark a name of its own.")
    return insert_after(program, tensor, "Identity", name=op_name)


def offer_cut(program: Program, tensor: str) -> None:
    """Offer ``gsc.auto_split`` to cut right after the op making ``tensor`` (the node
    attribute ``cut_candidate``); once one op is offered, ``auto_split`` cuts only after
    offered ones."""
    op, _ = parse_tensor_name(_tensor(program, tensor))
    program.graph.nodes[op]["cut_candidate"] = True


# -- rewiring ------------------------------------------------------------------------------------


def replace_uses(program: Program, old: str, new: str, *, keep: Iterable[str] = ()) -> None:
    """Every data edge reading tensor ``old`` (but those into the nodes of ``keep``) reads
    tensor ``new`` instead; so do the program's outputs."""
    g = program.graph
    old, new = _tensor(program, old), _tensor(program, new)
    old_op, old_index = parse_tensor_name(old)
    new_op, new_index = parse_tensor_name(new)
    keep = set(keep)
    moves = [(dst, key, a) for _, dst, key, a in g.out_edges(old_op, keys=True, data=True)
             if not a["control"] and a["src_output"] == old_index and dst not in keep]
    for dst, key, a in moves:
        g.remove_edge(old_op, dst, key)
        irg.add_data_edge(g, new_op, new_index, dst, a["dst_input"])
    if old in program.output_names:
        program.output_names = [new if n == old else n for n in program.output_names]
        program.output_structure = tf.nest.map_structure(
            lambda n: new if n == old else n, program.output_structure)


def replace_node(program: Program, node: str, outputs: Sequence[str]) -> None:
    """Replace node ``node`` by tensors already in the graph: its output ``i`` by
    ``outputs[i]`` for every reader; then remove it. Ops that ran after it (its control
    successors) run after the producers of ``outputs``."""
    replace_subgraph(program, [node], {tensor_name(node, i): t for i, t in enumerate(outputs)})


def replace_subgraph(program: Program, nodes: Iterable[str], outputs: Mapping[str, str]
                     ) -> None:
    """Replace the subgraph ``nodes`` by tensors already in the graph: each tensor of
    ``outputs`` (an output of the subgraph) by its value for every reader outside it; then
    remove ``nodes``. Refused when a reader outside ``nodes`` reads an output not replaced."""
    g = program.graph
    nodes = [_node(program, n) for n in nodes]
    members = set(nodes)
    replacement = {_tensor(program, k): _tensor(program, v) for k, v in outputs.items()}
    for old, new in replacement.items():
        if parse_tensor_name(new)[0] in members:
            raise GradSplitError(f"tensor {old!r} is to be replaced by {new!r}, which is "
                                 "made inside the subgraph being removed.")
    for node in nodes:
        for dst, out, _ in irg.data_consumers(g, node):
            name = tensor_name(node, out)
            if dst not in members and name not in replacement:
                raise GradSplitError(
                    f"node {dst!r} reads {name}, an output of the subgraph being replaced, "
                    "and outputs= gives no tensor in its place."
                )
    for old, new in replacement.items():
        replace_uses(program, old, new, keep=members)
    after = {dst for node in nodes for _, dst, a in g.out_edges(node, data=True)
             if a["control"] and dst not in members}
    for dst in after:
        for new in replacement.values():
            irg.add_control_edge(g, parse_tensor_name(new)[0], dst)
    remove_nodes(program, nodes)


def remove_nodes(program: Program, nodes: Iterable[str]) -> None:
    """Remove ``nodes`` and their edges; a node whose control input disappears keeps its
    other control inputs in order."""
    g = program.graph
    nodes = set(nodes)
    touched = {dst for n in nodes if n in g for dst in g.successors(n)} - nodes
    g.remove_nodes_from(nodes)
    for dst in touched:  # control positions stay 0..k-1
        control = sorted(((a["position"], src, key) for src, _, key, a in
                          g.in_edges(dst, keys=True, data=True) if a["control"]),
                         key=lambda x: x[0])
        for _, src, key in control:
            g.remove_edge(src, dst, key)
        for position, (_, src, _) in enumerate(control):
            g.add_edge(src, dst, key=f"^{position}", control=True, position=position)


# -- checking ------------------------------------------------------------------------------------


def problems(program: Program) -> list[tuple[str, str]]:
    """``(node, what is wrong)`` for each reason TensorFlow could not run the graph; empty
    when it can. Checked in order, each only when the ones before found nothing: nodes that
    exist only as an edge's end (a dangling input) and cycles; each node's op type (the op
    registry or the function library), attributes (every attribute without a default is
    set, and no unknown one), data input count and dtypes (from the op's definition and the
    producers' recorded dtypes), and input indices; last, TensorFlow's importer on the whole
    graph (shapes that cannot fit, and whatever else it checks), its message attributed to
    the node it names."""
    g = program.graph
    found: list[tuple[str, str]] = []
    for node, attrs in g.nodes(data=True):
        if "node_def" not in attrs or "op" not in attrs:
            readers = sorted(dst for _, dst in g.out_edges(node))
            found.append((readers[0] if readers else node,
                          f"reads {node!r}, which is not a node of the graph (a dangling "
                          "input)"))
    if found:
        return found
    if not nx.is_directed_acyclic_graph(g):
        cycle = [u for u, _, _ in nx.find_cycle(g)]
        found.append((cycle[0], f"is on a cycle ({' -> '.join(cycle[:5])}); a graph must be "
                                "acyclic"))
        return found
    functions = {f.signature.name for f in program.library.function}
    for node, attrs in g.nodes(data=True):
        found += [(node, what) for what in _node_problems(g, node, attrs, functions)]
    if found:
        return found
    return _importer_problems(g)


def _node_problems(g: nx.MultiDiGraph, node: str, attrs: dict, functions: set) -> list[str]:
    op_type = attrs["op"]
    node_def = attrs["node_def"]
    if node_def.op != op_type or node_def.name != node:
        return [f"has op {op_type!r} and name {node!r} in the graph but {node_def.op!r} and "
                f"{node_def.name!r} in its NodeDef; keep them equal"]
    indices = sorted(a["dst_input"] for _, _, a in g.in_edges(node, data=True)
                     if not a["control"])
    if indices != list(range(len(indices))):
        return [f"has data inputs {indices}, not 0..n-1"]
    if op_type in functions:
        return []
    op_def = _tf_internal.op_def(op_type)
    if op_def is None:
        close = close_names(op_type, [n for n in dir(tf.raw_ops) if not n.startswith("_")])
        hint = f" (close op types: {', '.join(close)})" if close else ""
        return [f"has op type {op_type!r}, which neither TensorFlow's op registry nor the "
                f"function library holds{hint}"]
    result = []
    declared = {a.name: a for a in op_def.attr}
    for name, attr in declared.items():
        if name not in node_def.attr and not attr.HasField("default_value"):
            result.append(f"({op_type}) has no attribute {name!r}, which the op requires")
    for name in node_def.attr:
        if name not in declared and not name.startswith("_"):
            result.append(f"({op_type}) has an attribute {name!r} the op does not define")
    if result:
        return result
    expected = _input_dtypes(op_def, node_def)
    inputs = irg.data_inputs(g, node)
    if expected is not None and len(expected) != len(inputs):
        return [f"({op_type}) has {len(inputs)} data inputs; the op takes {len(expected)}"]
    for i, (src, index) in enumerate(inputs):
        outputs = g.nodes[src].get("outputs") or []
        if outputs and index >= len(outputs):
            result.append(f"reads output {index} of {src!r}, which has {len(outputs)} "
                          "outputs")
            continue
        if expected is None or not outputs:
            continue
        dtype = outputs[index][0]
        want = expected[i]
        if dtype is not None and want is not None and dtype.as_datatype_enum != want:
            result.append(
                f"({op_type}) input {i} must be {tf.as_dtype(want).name}; it reads "
                f"{tensor_name(src, index)}, of dtype {dtype.name} (a dtype mismatch)")
    return result


def _input_dtypes(op_def, node_def) -> list | None:
    """The ``DataType`` enum each data input must have (``None`` where the op accepts any),
    from the op definition and the node's attributes; ``None`` when they do not say."""
    attr = node_def.attr
    found: list = []
    for arg in op_def.input_arg:
        ref = arg.is_ref
        if arg.number_attr:
            if arg.number_attr not in attr:
                return None
            count = attr[arg.number_attr].i
            dtype = arg.type if arg.type else (
                attr[arg.type_attr].type if arg.type_attr in attr else None)
            found += [dtype] * count
        elif arg.type_list_attr:
            if arg.type_list_attr not in attr:
                return None
            found += list(attr[arg.type_list_attr].list.type)
        elif arg.type:
            found.append(arg.type)
        elif arg.type_attr:
            found.append(attr[arg.type_attr].type if arg.type_attr in attr else None)
        else:
            found.append(None)
        if ref:
            return None
    return [None if d in (None, types_pb2.DT_INVALID) else d for d in found]


_NODE_IN_MESSAGE = re.compile(r"(?:node|Node) '?\{?\{?(?:node )?([^\s'}:;,]+)")


def _importer_problems(g: nx.MultiDiGraph) -> list[tuple[str, str]]:
    scratch = tf.Graph()
    try:
        with scratch.as_default():
            tf.graph_util.import_graph_def(irg.from_networkx(g), name="")
    except (ValueError, tf.errors.OpError) as exc:
        text = _first_line(exc)
        named = [m for m in _NODE_IN_MESSAGE.findall(text) if m in g]
        return [(named[0] if named else "?", f"is refused by TensorFlow: {text}")]
    return []


# -- helpers -------------------------------------------------------------------------------------


def _first_line(exc: Exception) -> str:
    text = getattr(exc, "message", None) or str(exc)
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return (lines[0] if lines else type(exc).__name__).rstrip(".")


def _node(program: Program, node: str) -> str:
    if node not in program.graph:
        raise GradSplitError(f"{node!r} is not a node of the program; find nodes with "
                             "find_nodes(program, op=..., scope=...).")
    return node


def _tensor(program: Program, tensor: str) -> str:
    op, index = parse_tensor_name(tensor)
    _node(program, op)
    outputs = program.graph.nodes[op].get("outputs") or []
    if outputs and index >= len(outputs):
        raise GradSplitError(f"node {op!r} has {len(outputs)} outputs; there is no tensor "
                             f"{tensor!r}.")
    return tensor_name(op, index)


def _fresh_name(program: Program, base: str) -> str:
    if base not in program.graph:
        return base
    k = 1
    while f"{base}_{k}" in program.graph:
        k += 1
    return f"{base}_{k}"
