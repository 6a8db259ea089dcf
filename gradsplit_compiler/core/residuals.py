"""Cut a stage's gradient graph into its forward and its backward; find the residuals.

Input: the graph of one stage traced together with its vector-Jacobian product (the
stage's ops, then ``tf.gradients(outputs, inputs + variables, grad_ys=cotangents)``).

Guarantees about the result:

- ``backward`` holds every op the gradients need that depends on a cotangent, plus the
  constants and shape arithmetic (``Shape``, ``Size``, integer ops on them) those ops read:
  they are recomputed in the backward because XLA needs shapes as compile-time constants
  and they cost nothing. Reads of variables the program never writes are repeated in the
  backward too (``rereadable``), so weights are not copied out of the forward program, and
  so are reshapes and casts of such values (``VIEW_OPS``: a reshaped weight, a float count).
  Every other value the backward reads is a residual: the forward
  is never run again, except for a ``variant`` value that cannot ``travel`` between
  programs (the callback says which can), whose producers are recomputed from plain
  tensors.
- ``forward`` holds the stage's own ops and the parts of the gradient formulas that do
  not depend on a cotangent, so the backward is only what must wait for the cotangent; it
  is closed under predecessors. (Most of TensorFlow's gradient functions already make
  their formulas wait for the cotangent with a control dependency, ``cos(x)`` of ``sin``'s
  among them: those stay in the backward, reading ``x``.)
- ``residuals`` are the tensors, produced by the forward or fed into it, that the backward
  reads, in graph order; placeholders of cotangents and captured variables are not among
  them (the backward reads those directly).

Example
-------
>>> import tensorflow as tf
>>> from gradsplit_compiler import ir
>>> from gradsplit_compiler.core.residuals import cut_forward_backward
>>> def vjp(x, c):
...     y = tf.tanh(x, name="tanh")
...     return tf.gradients(y, x, grad_ys=c, name="vjp")[0]
>>> g = tf.function(vjp).get_concrete_function(tf.TensorSpec([3], name="x"),
...                                            tf.TensorSpec([3], name="c")).graph
>>> h = ir.to_networkx(g.as_graph_def(), g)
>>> grad = g.outputs[0].op.inputs[0].op.name
>>> cut = cut_forward_backward(h, {grad}, cotangents={"c"}, inputs={"x"}, captures=set(),
...                            stage_ops={"tanh"}, travels=lambda name: False)
>>> cut.residuals, cut.backward
(['tanh:0'], ['vjp/grad_ys_0', 'vjp/tanh_grad/TanhGrad'])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import networkx as nx
import tensorflow as tf

from gradsplit_compiler import ir

__all__ = ["INTEGER_DTYPES", "SHAPE_OPS", "VIEW_OPS", "ForwardBackward", "cut_forward_backward"]

SHAPE_OPS = {"Shape", "ShapeN", "Size", "Rank", "VariableShape", "BroadcastGradientArgs"}
INTEGER_DTYPES = {tf.int32, tf.int64, tf.bool, tf.int16, tf.int8, tf.uint8}
# Ops that only re-view or convert their input: of recomputed values (a weight read again, a
# count), recomputed too, so a reshaped weight or a float count is not a residual that the
# forward program must copy out (XLA returns a parameter or a constant only by copying it).
VIEW_OPS = {"Reshape", "ExpandDims", "Squeeze", "Identity", "Cast"}


@dataclass
class ForwardBackward:
    forward: list[str]  # op names, graph order
    backward: list[str]
    residuals: list[str]  # tensor names, graph order


def cut_forward_backward(h: nx.MultiDiGraph, gradients: set[str], cotangents: set[str],
                         inputs: set[str], captures: set[str], stage_ops: set[str],
                         travels: Callable[[str], object],
                         rereadable: set[str] = frozenset()) -> ForwardBackward:
    """Split ``h`` (a stage and its VJP) into forward and backward ops and residuals.

    Parameters
    ----------
    h : networkx.MultiDiGraph
        The stage traced with its gradient (see ``ir``).
    gradients : set of str
        Ops producing the gradients the backward returns.
    cotangents : set of str
        The cotangent placeholders.
    inputs : set of str
        The placeholders of the stage's inputs (a residual may be an input).
    captures : set of str
        The placeholders of captured variables and tensors (each piece captures them).
    stage_ops : set of str
        The stage's own ops (always forward).
    travels : callable
        ``travels(tensor_name)`` is true when a ``variant`` residual can cross from one
        program to another (a fixed-size loop accumulator, sent as a dense tensor).
    rereadable : set of str
        Capture placeholders of variables the program never writes: the backward reads
        such a variable itself (a ``ReadVariableOp`` on the captured handle) instead of
        receiving its value as a residual, so a weight is not copied out of the forward
        program. The value is the same unless the caller assigns the variable between a
        stage's forward and its backward.
    """
    placeholders = inputs | cotangents | captures
    attrs = ir.node_attributes(h)
    data_in = _data_inputs_of(h)
    needed = ir.ancestors(h, gradients)
    from_cotangent = ir.descendants(h, cotangents)
    recompute = _recomputable(attrs, data_in, needed - from_cotangent - placeholders,
                              rereadable)
    core = (needed & from_cotangent) - placeholders
    core |= _variant_producers(attrs, data_in, core, needed - placeholders, travels)
    forward_extra = needed - core - recompute - placeholders
    # Recompute only what the backward reaches through recomputable ops, not through
    # forward values (those arrive as residuals).
    backward = ir.ancestors(h, core, within=core | recompute)
    # A tensor the backward reads only for its shape does not travel: its Shape op runs in
    # the forward and the (tiny) shape travels instead; XLA specialises a program on the
    # values of shape arguments, so they still count as compile-time constants.
    shape_only = _shape_only_readers(h, attrs, data_in, backward)
    backward -= shape_only
    forward_needed = ir.ancestors(h, forward_extra | shape_only,
                                  within=forward_extra | recompute | shape_only)
    forward = ir.ancestors(h, stage_ops | forward_needed) - placeholders

    order = {n: i for i, n in enumerate(attrs)}
    backward_nodes = sorted(backward, key=order.__getitem__)
    read: set[tuple[str, int]] = set()
    for node in backward_nodes:
        for src, index in data_in[node]:
            if not (src in backward or src in cotangents or src in captures):
                read.add((src, index))
    residuals = [ir.tensor_name(src, index)
                 for src, index in sorted(read, key=lambda t: (order[t[0]], t[1]))]
    return ForwardBackward(
        forward=sorted(forward, key=order.__getitem__),
        backward=backward_nodes,
        residuals=residuals,
    )


def _data_inputs_of(h: nx.MultiDiGraph) -> dict[str, list[tuple[str, int]]]:
    """``ir.data_inputs`` of every node of ``h``, in one pass over plain dicts."""
    found = {}
    for node, preds in ir.predecessor_edges(h).items():
        edges = sorted((a["dst_input"], src, a["src_output"]) for src, keyed in preds.items()
                       for a in keyed.values() if not a["control"])
        found[node] = [(src, index) for _, src, index in edges]
    return found


def _variant_producers(attrs: dict, data_in: dict, backward: set[str], candidates: set[str],
                       travels) -> set[str]:
    """Forward ops whose ``variant`` outputs the backward reads and that cannot travel as
    tensors, and what they need to be recomputed from plain tensors."""
    added: set[str] = set()
    frontier = set(backward)
    while frontier:
        new = set()
        for node in frontier:
            for src, idx in data_in[node]:
                if src in backward or src in added or src not in candidates:
                    continue
                outputs = attrs[src].get("outputs") or []
                if (idx < len(outputs) and outputs[idx][0] == tf.variant
                        and not travels(ir.tensor_name(src, idx))):
                    new.add(src)
        added |= new
        frontier = new
    return added


def _recomputable(attrs: dict, data_in: dict, candidates: set[str],
                  rereadable: set[str] = frozenset()) -> set[str]:
    """Constants and shape arithmetic: cheap, and XLA needs them as compile-time constants;
    reads of variables nobody writes (the backward reads the variable itself); and views
    and casts of what is chosen (``VIEW_OPS``)."""
    chosen: set[str] = set()
    for node in _data_order(data_in, candidates):
        op = attrs[node]["op"]
        preds = [src for src, _ in data_in[node]]
        outputs = attrs[node].get("outputs") or []
        if op == "Const" and not preds:
            chosen.add(node)
        elif op in SHAPE_OPS:
            chosen.add(node)
        elif op == "ReadVariableOp" and preds and all(p in rereadable for p in preds):
            chosen.add(node)
        elif outputs and all(d in INTEGER_DTYPES for d, _ in outputs) and preds and all(
            p in chosen for p in preds
        ):
            chosen.add(node)
        elif op in VIEW_OPS and preds and all(p in chosen for p in preds):
            chosen.add(node)
    return chosen


def _data_order(data_in: dict, nodes: set[str]) -> list[str]:
    """``nodes`` ordered so that each comes after its data inputs among them (their data
    edges alone: a subgraph of the stage's graph would carry its control edges)."""
    return ir.order_among(nodes, ((src, node) for node in nodes for src, _ in data_in[node]
                                  if src in nodes))


def _shape_only_readers(h: nx.MultiDiGraph, attrs: dict, data_in: dict,
                        backward: set[str]) -> set[str]:
    """``Shape``/``Size``/``Rank`` ops of the backward whose input the backward reads for
    nothing else, and that do not wait for a cotangent."""
    readers: dict[tuple[str, int], set[str]] = {}
    for node in backward:
        for src, index in data_in[node]:
            if src not in backward:
                readers.setdefault((src, index), set()).add(node)
    moved = set()
    for nodes in readers.values():
        if all(attrs[n]["op"] in ("Shape", "Size", "Rank") for n in nodes) and not any(
            a["control"] for n in nodes for _, _, a in h.in_edges(n, data=True)
        ):
            moved |= nodes
    return moved
