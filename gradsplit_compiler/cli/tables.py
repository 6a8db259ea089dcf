"""The tables ``gradsplit inspect`` and ``gradsplit split`` print.

``cuttable_tensors(program)`` lists the tensors one can cut at: the floating-point tensors of
the top-level graph (after ``inline_calls`` and ``refresh_shapes``) computed from the
arguments, each with its op, dtype, static shape, the Keras layer it belongs to and its bytes
per example. ``stage_table(split)`` and ``cut_table(split)`` describe a split: per stage its
ops, variables, inputs, outputs and residuals (the per-stage numbers of
``plan.costs.summarize``, with what the table adds); per cut the tensors that cross it.

Bytes per example: when the arguments share a leading (batch) dimension, a tensor whose
first dimension is that batch dimension costs ``product(other dims) * dtype size`` per
example (``"12 B/ex"``); any other tensor (a variable read, a reduction) is counted whole
(``"384 B"``). A tensor whose shape is not known statically shows ``?``.

Example
-------
>>> import tensorflow as tf
>>> from gradsplit_compiler.frontend.capture import capture
>>> from gradsplit_compiler.cli.tables import cuttable_tensors
>>> program = capture(tf.function(lambda x: tf.reduce_sum(tf.tanh(x))),
...                   [tf.TensorSpec([None, 4])])
>>> [row.name for row in cuttable_tensors(program).rows]  # doctest: +SKIP
['Tanh:0', 'Sum:0', 'Identity:0']
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from gradsplit_compiler.ir.names import mark_name_of, parse_tensor_name
from gradsplit_compiler.plan import costs
from gradsplit_compiler.util import human_bytes

__all__ = ["SplitSummary", "TensorListing", "TensorRow", "batch_dimension", "cut_table",
           "cuttable_tensors", "format_bytes", "format_shape", "format_table", "split_summary",
           "stage_table", "tensor_labels", "tensor_table"]

# Ops whose tensors are never worth a cut even when computed from the arguments.
_NOT_CUTTABLE_OPS = {"Placeholder", "Const", "NoOp"}


@dataclass
class TensorRow:
    """One tensor of ``gradsplit inspect``."""

    name: str
    op: str
    dtype: str
    shape: str
    layer: str = ""
    layer_output: bool = False
    nbytes: int | None = None
    per_example: bool = False

    @property
    def bytes_text(self) -> str:
        return format_bytes(self.nbytes, self.per_example)


@dataclass
class TensorListing:
    rows: list[TensorRow]
    # float tensors left out because no argument flows into them (constants, variable reads)
    hidden: int = 0
    layers: list[str] = field(default_factory=list)


def format_bytes(nbytes: int | None, per_example: bool) -> str:
    """A table's bytes cell: ``human_bytes``, ``/ex`` when per example, ``?`` when unknown."""
    if nbytes is None:
        return "?"
    return f"{human_bytes(nbytes)}/ex" if per_example else human_bytes(nbytes)


def batch_dimension(arg_specs: Sequence[Any]) -> tuple[bool, int | None]:
    """``(has_batch, size)``: whether all arguments share a leading dimension, and its size."""
    firsts = set()
    for spec in arg_specs:
        if spec.shape.rank is None or spec.shape.rank == 0:
            return False, None
        firsts.add(spec.shape[0])
    if len(firsts) != 1:
        return False, None
    return True, firsts.pop()


def _bytes(dtype: Any, shape: Any, batch: tuple[bool, int | None]) -> tuple[int | None, bool]:
    """``(bytes, per_example)`` of a tensor of ``dtype`` and static ``shape`` as a table
    shows it: per example when its leading dimension is the batch, ``None`` when a dimension
    counted is unknown. The bytes are ``costs.tensor_bytes`` of the dimensions counted."""
    if dtype is None or shape is None or shape.rank is None:
        return None, False
    dims = shape.as_list()
    has_batch, size = batch
    per_example = has_batch and len(dims) >= 1 and dims[0] == size
    counted = dims[1:] if per_example else dims
    if any(d is None for d in counted):
        return None, per_example
    return costs.tensor_bytes(dtype, counted), per_example


def format_shape(shape: Any) -> str:
    if shape is None or shape.rank is None:
        return "?"
    return "[" + ",".join("None" if d is None else str(d) for d in shape.as_list()) + "]"


def cuttable_tensors(program: Any, *, include_all: bool = False) -> TensorListing:
    """The tensors of ``program`` one can cut at, in data-flow order.

    ``program`` is a ``Program`` after ``inline_calls`` and ``refresh_shapes`` (or a
    ``Split``: both have ``graph``, ``arg_names`` and ``arg_specs``). Floating-point tensors
    of the top-level graph that an argument flows into are listed; with ``include_all``,
    those no argument reaches (constants, variable reads) too.
    """
    g = program.graph
    batch = batch_dimension(program.arg_specs)
    arg_ops = {parse_tensor_name(n)[0] for n in program.arg_names}
    reached = set().union(*(nx.descendants(g, a) for a in arg_ops)) if arg_ops else set()
    models = list(getattr(program, "keras_models", None) or [])
    layer_of_op, layer_of_tensor = _layers(g, models)
    rows, hidden = [], 0
    for op in nx.lexicographical_topological_sort(g, key=_order_key(g)):
        attrs = g.nodes[op]
        if attrs["op"] in _NOT_CUTTABLE_OPS or op in arg_ops:
            continue
        for index, (dtype, shape) in enumerate(attrs.get("outputs") or []):
            if dtype is None or not dtype.is_floating:
                continue
            if op not in reached and not include_all:
                hidden += 1
                continue
            name = f"{op}:{index}"
            nbytes, per_example = _bytes(dtype, shape, batch)
            layer = layer_of_tensor.get(name) or layer_of_op.get(op, "")
            rows.append(TensorRow(name=name, op=attrs["op"], dtype=dtype.name,
                                  shape=format_shape(shape), layer=layer,
                                  layer_output=name in layer_of_tensor, nbytes=nbytes,
                                  per_example=per_example))
    layers = list(dict.fromkeys(r.layer for r in rows if r.layer))  # data-flow order
    return TensorListing(rows=rows, hidden=hidden, layers=layers)


def _order_key(g: nx.MultiDiGraph):
    position = {n: i for i, n in enumerate(g.nodes)}
    return lambda n: f"{position[n]:09d}"


def _layers(g: nx.MultiDiGraph, models: list) -> tuple[dict[str, str], dict[str, str]]:
    """``(layer of each op, layer of each layer-output tensor)`` for Keras ``models``."""
    if not models:
        return {}, {}
    from gradsplit_compiler.frontend.keras_layers import keras_layer_calls
    from gradsplit_compiler.ir import from_networkx

    graph_def = from_networkx(g)
    scopes: dict[str, str] = {}
    outputs: dict[str, str] = {}
    for model in models:
        for call in keras_layer_calls(graph_def, model):
            if call["scope"]:
                scopes.setdefault(call["scope"], call["name"])
            if call["parent"] is not None or not call["scope"]:
                for t in call["outputs"]:
                    outputs.setdefault(t, call["name"])
    layer_of_op = {}
    for op in g.nodes:
        parts = op.split("/")
        for depth in range(len(parts) - 1, 0, -1):
            layer = scopes.get("/".join(parts[:depth]))
            if layer is not None:
                layer_of_op[op] = layer
                break
    return layer_of_op, outputs


def tensor_table(rows: Sequence[TensorRow]) -> str:
    """The ``gradsplit inspect`` table: one tensor per line, layer outputs marked."""
    body = [[r.name, r.op, r.dtype, r.shape,
             f"{r.layer} (output)" if r.layer_output else r.layer, r.bytes_text]
            for r in rows]
    return format_table(["tensor", "op", "dtype", "shape", "layer", "bytes"], body,
                        right={5})


# -- a split -------------------------------------------------------------------------------


@dataclass
class SplitSummary:
    """Numbers of a split, per stage and per cut, as the tables print them."""

    stages: list[dict]
    cuts: list[dict]


def split_summary(split: Any, labels: dict[str, str]) -> SplitSummary:
    """What the tables print of ``split``: per stage, ``costs.summarize``'s row (``index``,
    ``ops``, ``variable_bytes``, ...) with its variables, parameters, inputs, outputs and
    residual bytes as the table shows them; per cut, the tensors crossing it with their
    bytes. ``labels`` maps tensor names to short names."""
    batch = batch_dimension(split.arg_specs)
    stages = []
    for stage, row in zip(split.stages, costs.summarize(split)):
        per_example, fixed, unknown = _sum_bytes(
            [(s.dtype, s.shape) for s in stage.residual_specs], batch)
        stages.append({
            **row, "variables": len(stage.variables),
            "params": sum(v.shape.num_elements() or 0 for v in stage.variables),
            "inputs": [labels.get(n, n) for n in stage.inputs],
            "outputs": [labels.get(n, n) for n in stage.outputs],
            "residuals": len(stage.residual_specs), "residual_bytes_per_example": per_example,
            "residual_bytes_fixed": fixed, "residual_bytes_unknown": unknown,
        })
    cuts = []
    for k, boundary in enumerate(split.boundaries):
        tensors = []
        for name in boundary:
            spec = split.spec(name)
            nbytes, per_ex = _bytes(spec.dtype, spec.shape, batch)
            tensors.append({"name": name, "label": labels.get(name, ""),
                            "shape": format_shape(spec.shape), "dtype": spec.dtype.name,
                            "bytes": nbytes, "per_example": per_ex})
        per_example, fixed, unknown = _sum_bytes(
            [(split.spec(n).dtype, split.spec(n).shape) for n in boundary], batch)
        cuts.append({"index": k, "tensors": tensors, "bytes_per_example": per_example,
                     "bytes_fixed": fixed, "bytes_unknown": unknown})
    return SplitSummary(stages=stages, cuts=cuts)


def _sum_bytes(specs, batch) -> tuple[int, int, int]:
    per_example = fixed = unknown = 0
    for dtype, shape in specs:
        nbytes, per_ex = _bytes(dtype, shape, batch)
        if nbytes is None:
            unknown += 1
        elif per_ex:
            per_example += nbytes
        else:
            fixed += nbytes
    return per_example, fixed, unknown


def _bytes_sum_text(per_example: int, fixed: int, unknown: int) -> str:
    parts = []
    if per_example or not (fixed or unknown):
        parts.append(format_bytes(per_example, True))
    if fixed:
        parts.append(format_bytes(fixed, False))
    if unknown:
        parts.append(f"{unknown} of unknown size")
    return " + ".join(parts)


def stage_table(summary: SplitSummary, width: int = 28) -> str:
    """One line per stage: ops, variables, parameters, inputs, outputs, residuals."""
    body = []
    for s in summary.stages:
        body.append([
            str(s["index"]), str(s["ops"]), str(s["variables"]),
            f"{s['params']} ({human_bytes(s['variable_bytes'])})",
            _names(s["inputs"], width), _names(s["outputs"], width),
            str(s["residuals"]),
            _bytes_sum_text(s["residual_bytes_per_example"], s["residual_bytes_fixed"],
                            s["residual_bytes_unknown"]),
        ])
    return format_table(["stage", "ops", "variables", "parameters", "inputs", "outputs",
                         "residuals", "residual bytes"], body, right={1, 2, 3, 6})


def cut_table(summary: SplitSummary) -> str:
    """Per cut, the tensors that cross it: name, short name, shape, dtype, bytes."""
    lines = []
    for cut in summary.cuts:
        total = _bytes_sum_text(cut["bytes_per_example"], cut["bytes_fixed"],
                                cut["bytes_unknown"])
        lines.append(f"cut {cut['index']}: {len(cut['tensors'])} tensor"
                     f"{'s' if len(cut['tensors']) != 1 else ''} cross it, {total}")
        body = [["  " + t["name"], t["label"], t["shape"], t["dtype"],
                 format_bytes(t["bytes"], t["per_example"])] for t in cut["tensors"]]
        lines.append(format_table(["  tensor", "is", "shape", "dtype", "bytes"], body,
                                  right={4}))
    return "\n".join(lines)


def _names(names: Sequence[str], width: int) -> str:
    text = ", ".join(names)
    if len(text) <= width:
        return text
    shown = []
    for n in names:
        if len(", ".join(shown + [n])) > width - 10:
            break
        shown.append(n)
    rest = len(names) - len(shown)
    return (", ".join(shown) + (", " if shown else "") + f"+{rest} more")


def tensor_labels(split: Any, arg_labels: Sequence[str],
                  layer_outputs: dict[str, list[str]] | None = None) -> dict[str, str]:
    """Short names of the tensors of ``split``: argument names, ``output``, Keras layer
    names (for a layer's only output), ``gsc.mark`` names."""
    labels: dict[str, str] = {}
    for name, label in zip(split.arg_names, arg_labels):
        labels[name] = label
    for k, name in enumerate(split.output_names):
        labels[name] = "output" if len(split.output_names) == 1 else f"output {k}"
    for layer, tensors in (layer_outputs or {}).items():
        for i, t in enumerate(tensors):
            labels.setdefault(t, layer if len(tensors) == 1 else f"{layer}[{i}]")
    for boundary in [*split.boundaries, *(s.inputs for s in split.stages),
                     *(s.outputs for s in split.stages)]:
        for t in boundary:
            if t not in labels:
                op, index = parse_tensor_name(t)
                marked = mark_name_of(op)
                if marked is not None:
                    labels[t] = marked
    return labels


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]],
                 right: Collection[int] = ()) -> str:
    """Columns padded to their widest cell; columns in ``right`` aligned right."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        padded = [c.rjust(w) if i in right else c.ljust(w)
                  for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(padded).rstrip()

    return "\n".join([line(headers)] + [line(r) for r in rows])
