"""The cost model: what each op of a program costs, forward plus backward, from static shapes.

Three quantities per op, all from the op type and the static shapes the IR keeps on every node
(``outputs``); a ``None`` dimension stands for ``batch_size`` (1 when it is not given, so the
numbers are then per example):

- **time** (seconds, forward + backward): matrix products and convolutions (``MatMul``,
  ``BatchMatMul*``, ``Conv2D``, ``Conv3D``, ``Conv2DBackpropInput``, ``DepthwiseConv2dNative``,
  ``Einsum`` with its equation parsed) are costed by FLOPs (2 per multiply-add); every other
  op by the bytes it reads and writes. Forward time is the roofline
  ``max(flops / F, bytes / B)`` for the first kind and ``bytes / B`` for the rest. The
  backward costs ``backward_flops`` (2: one product for the input cotangent, one for the
  weight gradient) times the forward FLOPs, and ``backward_bytes`` (1.5: an elementwise op's
  backward reads its cotangent and one saved value and writes one cotangent, three tensors
  against the forward's two) times the forward bytes. Ops off the gradient path (shape
  arithmetic, batch-norm statistics updates) have no backward. Views (``Reshape``,
  ``Identity``, ``Squeeze`` ...), constants and variable reads cost nothing; every other op
  adds ``op_seconds`` forward and again backward.
- **residuals**: the forward tensors the op's backward keeps (TensorFlow's gradient functions:
  a ``MatMul`` keeps its inputs, a ``Relu`` or ``Tanh`` its output, an ``AddV2`` nothing).
- **variable bytes**: what the variables a stage reads take.

``F`` (180 GFLOP/s) and ``B`` (16 GB/s, an effective rate: XLA fuses the elementwise chains
whose every input and output the model counts) were fitted to XLA on a 2-core x86 CPU.
``XLA_CPU`` adds one measured quirk of XLA's CPU backend: a convolution whose kernel is
larger than its input (ResNet50's 3x3 kernels on 2x2 maps at 64x64 inputs) runs as a
generic loop, at about 2.5 GFLOP/s. ``calibrate(split, args)`` times each stage's compiled
forward + backward and sets it beside the estimate; ``fit`` rescales the rates to a machine
from such measurements.

Example
-------
>>> import numpy as np, tensorflow as tf
>>> import gradsplit_compiler as gsc
>>> W = tf.Variable(np.ones((64, 32), np.float32))
>>> @tf.function
... def loss(x):
...     return tf.reduce_sum(tf.tanh(gsc.mark(x @ W, "h")))
>>> s = gsc.split(loss, [tf.TensorSpec([None, 64])], ["h"])
>>> [row["boundary_bytes"] for row in s.summary(batch_size=8)]  # 8 x 32 float32 cross
[0, 1024]
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import networkx as nx
import numpy as np

from gradsplit_compiler import _tf_internal, ir
from gradsplit_compiler.util import collector_paused

__all__ = [
    "CostModel",
    "DEFAULT_MODEL",
    "XLA_CPU",
    "OpCost",
    "PARTS",
    "calibrate",
    "einsum_flops",
    "fit",
    "gradient_ops",
    "is_float",
    "op_cost",
    "op_costs",
    "residual_tensors",
    "stage_nodes",
    "summarize",
    "tensor_bytes",
    "variable_bytes",
]


@dataclass(frozen=True)
class CostModel:
    """Machine constants of the cost model (see the module docstring)."""

    flops_per_second: float = 1.8e11
    bytes_per_second: float = 1.6e10
    # XLA on CPU compiles a convolution whose kernel is larger than its input (a 3x3 kernel
    # on the 2x2 maps of ResNet50 at 64x64 inputs) to a generic loop: 1-7 GFLOP/s measured
    # here. ``None``: no such case (the portable default); ``XLA_CPU`` sets it.
    slow_conv_flops_per_second: float | None = None
    # per op that does work, forward and backward each: launch and loop overhead
    op_seconds: float = 1e-6
    backward_flops: float = 2.0
    backward_bytes: float = 1.5
    # What a boundary tensor costs to send to the next stage's device (and its cotangent
    # back): used only by the pipeline-time objective of ``auto_split(microbatches=...)``.
    link_bytes_per_second: float = 5e9


PARTS = ("compute", "slow_conv", "memory", "overhead")


DEFAULT_MODEL = CostModel()
XLA_CPU = CostModel(slow_conv_flops_per_second=2.5e9)

# Ops costed by FLOPs.
MATMUL_OPS = {"MatMul", "BatchMatMul", "BatchMatMulV2", "BatchMatMulV3"}
CONV_OPS = {"Conv2D", "Conv3D", "Conv2DBackpropInput", "DepthwiseConv2dNative", "Conv"}
COMPUTE_OPS = MATMUL_OPS | CONV_OPS | {"Einsum"}

# Ops that move no data of their own (views, metadata, constants, reads) under XLA.
FREE_OPS = {
    "Const", "Placeholder", "NoOp", "Identity", "IdentityN", "Reshape", "Squeeze",
    "ExpandDims", "StopGradient", "PreventGradient", "Shape", "ShapeN", "Size", "Rank",
    "ReadVariableOp", "VarHandleOp", "VariableShape", "BroadcastGradientArgs", "ZerosLike",
    "OnesLike", "EnsureShape", "CheckNumerics", "Snapshot",
}

# What TensorFlow's gradient function of an op keeps from its forward: "in" (all float
# inputs), "out" (its float outputs), "none" (shapes only) or indices of outputs. An op type
# not listed keeps its inputs.
RESIDUAL_RULES: dict[str, Any] = {
    **dict.fromkeys(
        ["Relu", "Relu6", "Elu", "Selu", "Tanh", "Sigmoid", "Exp", "Sqrt", "Rsqrt",
         "Softmax", "LogSoftmax", "Reciprocal", "Inv"], "out"),
    **dict.fromkeys(
        ["AddV2", "Add", "Sub", "BiasAdd", "Neg", "Identity", "Reshape", "Squeeze",
         "ExpandDims", "Transpose", "ConcatV2", "Pad", "PadV2", "MirrorPad", "Slice",
         "StridedSlice", "Sum", "Mean", "Cast", "AvgPool", "AvgPool3D", "StopGradient",
         "Pack", "Unpack", "Split", "SplitV", "Tile", "BroadcastTo", "AddN", "Fill",
         "ZerosLike", "OnesLike", "GatherV2", "ResourceGather", "Roll", "ReverseV2",
         "Const", "ReadVariableOp", "AssignVariableOp", "AssignAddVariableOp",
         "AssignSubVariableOp", "NoOp", "Shape"], "none"),
    "SoftmaxCrossEntropyWithLogits": (1,),
    "SparseSoftmaxCrossEntropyWithLogits": (1,),
    "MaxPool": "inout",
    "MaxPool3D": "inout",
    "FusedBatchNormV3": "inout",
}


@dataclass(frozen=True)
class OpCost:
    """One op's forward FLOPs and bytes, whether it has a backward, and whether XLA runs
    its convolution as a generic loop (``slow``)."""

    flops: float
    nbytes: float
    backward: bool
    slow: bool = False
    free: bool = False  # a view, constant or read: no work at all

    def seconds(self, model: CostModel = DEFAULT_MODEL) -> float:
        """Forward plus backward time under ``model``."""
        return sum(self.parts(model))

    def parts(self, model: CostModel = DEFAULT_MODEL) -> tuple[float, float, float, float]:
        """Forward plus backward seconds in the four columns ``fit`` scales: ``PARTS``.

        A FLOP-costed op is compute-bound or memory-bound (the roofline), not both.
        """
        if self.free:
            return 0.0, 0.0, 0.0, 0.0
        back = 1.0 if self.backward else 0.0
        overhead = model.op_seconds * (1 + back)
        if self.flops:
            factor = 1 + back * model.backward_flops
            if self.slow and model.slow_conv_flops_per_second:
                return 0.0, self.flops / model.slow_conv_flops_per_second * factor, 0.0, overhead
            compute = self.flops / model.flops_per_second
            memory = self.nbytes / model.bytes_per_second
            if compute >= memory:
                return compute * factor, 0.0, 0.0, overhead
            return 0.0, 0.0, memory * factor, overhead
        memory = self.nbytes / model.bytes_per_second * (1 + back * model.backward_bytes)
        return 0.0, 0.0, memory, overhead


# -- shapes and bytes --------------------------------------------------------------------------


def _dims(shape: Any, batch: int) -> list[int] | None:
    """Static dims with ``None`` -> ``batch``; ``None`` for an unknown rank."""
    if shape is None:
        return None
    if isinstance(shape, (list, tuple)):
        dims = list(shape)
    else:
        try:
            dims = shape.as_list()
        except ValueError:  # unknown rank
            return None
    return [batch if d is None else d for d in dims]


def _elements(shape: Any, batch: int) -> int:
    dims = _dims(shape, batch)
    return 0 if dims is None else math.prod(dims)


def tensor_bytes(dtype: Any, shape: Any, batch_size: int | None = None) -> int:
    """Bytes of a tensor of static ``shape`` (``None`` dims -> ``batch_size``, default 1).

    Resource and variant handles, and tensors of unknown rank, count 0.
    """
    size = _dtype_size(dtype)
    if not size:
        return 0
    batch = batch_size or 1
    # TensorShape keeps its dims as a tuple; reading it (and remembering the answer) is what
    # makes costing a 100,000-op program take a fraction of a second.
    dims = _shape_dims(shape)
    if dims is not None:
        key = (dims, batch)
        found = _ELEMENTS.get(key)
        if found is None:
            found = math.prod(batch if d is None else d for d in dims)
            if len(_ELEMENTS) < 1 << 16:
                _ELEMENTS[key] = found
        return found * size
    return _elements(shape, batch) * size


_shape_dims = _tf_internal.shape_dims
_ELEMENTS: dict[tuple, int] = {}
_DTYPE_SIZES: dict[int, tuple[Any, int]] = {}


def variable_bytes(variable: Any) -> int:
    """Bytes a variable (``tf.Variable``, or anything with a static ``shape`` and a
    ``dtype``) holds; 0 for an unknown size."""
    return int(variable.shape.num_elements() or 0) * variable.dtype.size


def _dtype_size(dtype: Any) -> int:
    if dtype is None:
        return 4  # unknown dtype: assume a 32-bit value
    # Keyed by id: hashing a tf.DType goes through pybind (300 ns); the entry keeps the
    # dtype alive, so its id cannot be reused.
    entry = _DTYPE_SIZES.get(id(dtype))
    if entry is None or entry[0] is not dtype:
        try:
            size = 0 if dtype.name in ("resource", "variant") else int(dtype.size)
        except (AttributeError, TypeError):
            size = 0
        entry = _DTYPE_SIZES[id(dtype)] = (dtype, size)
    return entry[1]


def _outputs(g: nx.MultiDiGraph, node: str) -> list:
    return g.nodes[node].get("outputs") or []


def _output(g: nx.MultiDiGraph, node: str, index: int) -> tuple[Any, Any]:
    outs = _outputs(g, node)
    return outs[index] if index < len(outs) else (None, None)


def _input_specs(g: nx.MultiDiGraph, node: str) -> list[tuple[Any, Any]]:
    return [_output(g, src, idx) for src, idx in ir.data_inputs(g, node)]


# -- FLOPs -------------------------------------------------------------------------------------


def _attr(g: nx.MultiDiGraph, node: str, key: str, default: Any = None) -> Any:
    nd = g.nodes[node].get("node_def")
    if nd is None or key not in nd.attr:
        return default
    value = nd.attr[key]
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else default


def _flops(g: nx.MultiDiGraph, node: str, op: str, batch: int,
           inputs: list[tuple[Any, Any]]) -> float:
    out = _dims(_output(g, node, 0)[1], batch)
    if out is None:
        return 0.0
    n_out = math.prod(out)
    shapes = [_dims(s, batch) for _, s in inputs]
    if op == "MatMul":
        a = shapes[0] if shapes else None
        if a is None or not out or out[0] == 0:
            return 0.0
        return 2.0 * n_out * (math.prod(a) / out[0])  # a is [m, k] or [k, m]
    if op in MATMUL_OPS:
        x = shapes[0] if shapes else None
        if not x or len(x) < 2:
            return 0.0
        k = x[-2] if _attr(g, node, "adj_x", False) else x[-1]
        return 2.0 * n_out * k
    if op in ("Conv2D", "Conv3D", "Conv"):
        f = shapes[1] if len(shapes) > 1 else None
        return 2.0 * n_out * math.prod(f[:-1]) if f else 0.0
    if op == "DepthwiseConv2dNative":
        f = shapes[1] if len(shapes) > 1 else None
        return 2.0 * n_out * math.prod(f[:2]) if f else 0.0
    if op == "Conv2DBackpropInput":  # a transposed convolution
        f = shapes[1] if len(shapes) > 1 else None
        dy = shapes[2] if len(shapes) > 2 else None
        return 2.0 * math.prod(dy) * math.prod(f[:-1]) if f and dy else 0.0
    if op == "Einsum":
        equation = _attr(g, node, "equation", b"")
        equation = equation.decode() if isinstance(equation, bytes) else str(equation)
        return einsum_flops(equation, shapes)
    return 0.0


def einsum_flops(equation: str, shapes: Sequence[Sequence[int] | None]) -> float:
    """FLOPs of ``tf.einsum(equation, ...)`` on operands of ``shapes``.

    One multiply-add (2 FLOPs) per point of the joint index space of all labels for two
    operands; one read per element for one operand (a transpose or a reduction).

    >>> einsum_flops("bij,bjk->bik", [[8, 4, 5], [8, 5, 6]])
    1920.0
    >>> einsum_flops("...ij,jk", [[2, 3, 4], [4, 5]])
    240.0
    """
    equation = equation.replace(" ", "")
    lhs = equation.split("->")[0]
    operands = lhs.split(",")
    if any(s is None for s in shapes) or len(operands) != len(shapes):
        return 0.0
    sizes: dict[str, int] = {}
    ellipsis: list[int] = []
    for term, shape in zip(operands, shapes):
        labels = term.replace("...", "")
        n_ell = len(shape) - len(labels)
        if "..." in term:
            before = term.index("...")
            ell = list(shape[before:before + n_ell])
            rest = list(shape[:before]) + list(shape[before + n_ell:])
            # broadcast the ellipsis dims, aligned on the right
            if len(ell) > len(ellipsis):
                ellipsis = [1] * (len(ell) - len(ellipsis)) + ellipsis
            for i, d in enumerate(ell):
                j = len(ellipsis) - len(ell) + i
                ellipsis[j] = max(ellipsis[j], d)
        else:
            rest = list(shape)
        for label, d in zip(labels, rest):
            sizes[label] = max(sizes.get(label, 1), d)
    points = math.prod(sizes.values()) * math.prod(ellipsis)
    return float(points) if len(shapes) == 1 else 2.0 * points * (len(shapes) - 1)


# -- per-op costs ------------------------------------------------------------------------------


def op_cost(g: nx.MultiDiGraph, node: str, batch_size: int | None = None,
            backward: bool = True) -> OpCost:
    """Forward FLOPs and bytes of ``node``; ``backward`` says whether it has a backward."""
    op = g.nodes[node]["op"]
    if op in FREE_OPS:
        return OpCost(0.0, 0.0, False, free=True)
    batch = batch_size or 1
    inputs = _input_specs(g, node)
    nbytes = sum(tensor_bytes(d, s, batch) for d, s in inputs)
    nbytes += sum(tensor_bytes(d, s, batch) for d, s in _outputs(g, node))
    flops = _flops(g, node, op, batch, inputs) if op in COMPUTE_OPS else 0.0
    slow = op in ("Conv2D", "Conv3D", "DepthwiseConv2dNative") and _kernel_exceeds_input(
        g, node, inputs, batch)
    return OpCost(flops, float(nbytes), backward, slow)


def _kernel_exceeds_input(g: nx.MultiDiGraph, node: str, inputs: list, batch: int) -> bool:
    """Whether a spatial dimension of the convolution's kernel exceeds its input's."""
    if len(inputs) < 2:
        return False
    x, f = _dims(inputs[0][1], batch), _dims(inputs[1][1], batch)
    if not x or not f:
        return False
    fmt = _attr(g, node, "data_format", b"NHWC")
    fmt = fmt.decode() if isinstance(fmt, bytes) else str(fmt)
    spatial = x[2:] if fmt.startswith("NC") else x[1:-1]
    return any(s < k for s, k in zip(spatial, f[: len(spatial)]))


def gradient_ops(g: nx.MultiDiGraph, output_ops: Iterable[str]) -> set[str]:
    """Ops with a backward: floating-point ops that the outputs depend on through data."""
    return _gradient_ops(ir.predecessor_edges(g), ir.node_attributes(g), output_ops)


def _gradient_ops(pred: dict, attrs: dict, output_ops: Iterable[str]) -> set[str]:
    # plain dicts (``ir.predecessor_edges``, ``ir.node_attributes``): networkx's views cost
    # an object per lookup, which dominates on programs of 100,000 ops.
    seen = {o for o in output_ops if o in attrs}
    stack = list(seen)
    while stack:
        v = stack.pop()
        for u, keyed in pred[v].items():
            if u in seen:
                continue
            for a in keyed.values():
                if not a["control"]:
                    seen.add(u)
                    stack.append(u)
                    break
    found = set()
    for n in seen:
        for d, _ in attrs[n].get("outputs") or ():
            if is_float(d):
                found.add(n)
                break
    return found


def is_float(dtype: Any) -> bool:
    """Whether ``dtype`` (a ``tf.DType`` or ``None``) is floating point or complex: a
    tensor a gradient flows through. Remembered per dtype object (hashing a ``tf.DType``
    goes through pybind)."""
    if dtype is None:
        return False
    entry = _FLOAT.get(id(dtype))  # by id, as in _dtype_size
    if entry is None or entry[0] is not dtype:
        entry = _FLOAT[id(dtype)] = (dtype, bool(dtype.is_floating or dtype.is_complex))
    return entry[1]


_FLOAT: dict[int, tuple[Any, bool]] = {}


def op_costs(g: nx.MultiDiGraph, output_ops: Iterable[str], batch_size: int | None = None,
             model: CostModel = DEFAULT_MODEL, nodes: Iterable[str] | None = None,
             forward: bool = False) -> dict[str, float]:
    """Forward plus backward seconds of every op (or of ``nodes``) under ``model``;
    ``forward=True``: the forward's seconds alone (what running it again costs).

    The same numbers as ``op_cost(...).seconds(model)``, each tensor's bytes computed once.
    """
    with collector_paused():  # on 100,000 ops one collection costs more than the pass
        return _op_costs(g, output_ops, batch_size, model, nodes, forward)


def _op_costs(g: nx.MultiDiGraph, output_ops: Iterable[str], batch_size: int | None,
              model: CostModel, nodes: Iterable[str] | None,
              forward: bool = False) -> dict[str, float]:
    pred, attrs = ir.predecessor_edges(g), ir.node_attributes(g)
    with_backward = set() if forward else _gradient_ops(pred, attrs, output_ops)
    batch = batch_size or 1
    out_bytes: dict[str, list[int]] = {}

    def bytes_of(n: str) -> list[int]:
        found = out_bytes.get(n)
        if found is None:
            found = [tensor_bytes(d, sh, batch) for d, sh in attrs[n].get("outputs") or []]
            out_bytes[n] = found
        return found

    result = {}
    for n in (attrs if nodes is None else nodes):
        op = attrs[n]["op"]
        if op in FREE_OPS:
            result[n] = 0.0
        elif op in COMPUTE_OPS:
            result[n] = op_cost(g, n, batch_size, n in with_backward).seconds(model)
        else:
            nbytes = sum(bytes_of(n))
            for u, keyed in pred[n].items():
                produced = None
                for a in keyed.values():
                    if not a["control"]:
                        produced = produced or bytes_of(u)
                        if a["src_output"] < len(produced):
                            nbytes += produced[a["src_output"]]
            result[n] = OpCost(0.0, float(nbytes), n in with_backward).seconds(model)
    return result


def residual_tensors(g: nx.MultiDiGraph, node: str) -> list[str]:
    """Names of the forward tensors the backward of ``node`` keeps (an estimate; see
    ``RESIDUAL_RULES``)."""
    op = g.nodes[node]["op"]
    rule = RESIDUAL_RULES.get(op, "in")
    if rule == "none" or op in FREE_OPS:
        return []
    found = []
    if rule in ("in", "inout"):
        for src, idx in ir.data_inputs(g, node):
            if is_float(_output(g, src, idx)[0]):
                found.append(ir.tensor_name(src, idx))
    if rule in ("out", "inout"):
        found += [ir.tensor_name(node, i) for i, (d, _) in enumerate(_outputs(g, node))
                  if is_float(d)]
    elif isinstance(rule, tuple):
        found += [ir.tensor_name(node, i) for i in rule]
    return found


# -- summaries ---------------------------------------------------------------------------------


def _name_bytes(g: nx.MultiDiGraph, name: str, batch: int) -> int:
    op, index = ir.parse_tensor_name(name)
    if op not in g:
        return 0
    return tensor_bytes(*_output(g, op, index), batch)


def _spec_bytes(spec: Any, batch: int) -> int:
    return tensor_bytes(spec.dtype, spec.shape, batch)


def stage_nodes(split: Any, k: int) -> list[str]:
    """The op names stage ``k`` of ``split`` runs (replicated constants and reads included)."""
    g = split.graph
    return [n for n in g.nodes if k in g.nodes[n].get("stages", ())]


def _is_variable_read(split: Any, name: str) -> bool:
    g = split.graph
    op, _ = ir.parse_tensor_name(name)
    if op not in g or g.nodes[op]["op"] != "ReadVariableOp":
        return False
    preds = [u for u, _, a in g.in_edges(op, data=True) if not a["control"]]
    return len(preds) == 1 and preds[0] in split.program.variable_placeholders


def summarize(split: Any, batch_size: int | None = None,
              model: CostModel = DEFAULT_MODEL) -> list[dict]:
    """One dict per stage of ``split`` (manual or automatic):

    ``index``; ``ops`` (how many ops it runs); ``cost`` (estimated forward + backward
    seconds); ``variable_bytes`` (the variables it reads); ``boundary_tensors`` and
    ``boundary_bytes`` (how many tensors, and how many bytes, enter it from earlier stages;
    arguments of ``fn`` are fed by the caller and not counted); ``residual_bytes`` (the
    forward values its backward keeps, from ``stage.residual_specs``, variable reads left
    out: they are the variables' own memory); ``weight_input_bytes`` (what a schedule that
    splits the backward keeps from a stage's ``B`` until its ``W``: the residuals and
    cotangents ``W`` reads and the values ``B`` carries to it, ``stage.weight_input_specs``);
    ``remat_residual_bytes`` (what the stage keeps per micro-batch under ``remat=``: its
    inputs).

    ``None`` dimensions count ``batch_size`` (1 when not given: per-example bytes).
    """
    g = split.graph
    batch = batch_size or 1
    outputs = {ir.parse_tensor_name(n)[0] for n in split.output_names}
    with_backward = gradient_ops(g, outputs)
    args = set(split.arg_names)
    rows = []
    for stage in split.stages:
        nodes = stage_nodes(split, stage.index)
        cost = sum(op_cost(g, n, batch, n in with_backward).seconds(model) for n in nodes)
        crossing = [n for n in stage.inputs if n not in args]
        residual = [
            _spec_bytes(spec, batch)
            for name, spec in zip(stage.residuals, stage.residual_specs)
            if not _is_variable_read(split, name)
        ]
        rows.append({
            "index": stage.index,
            "ops": stage.num_ops,
            "cost": cost,
            "variable_bytes": sum(variable_bytes(v) for v in stage.variables),
            "boundary_tensors": len(crossing),
            "boundary_bytes": sum(_name_bytes(g, n, batch) for n in crossing),
            "residual_bytes": sum(residual),
            "weight_input_bytes": sum(_spec_bytes(spec, batch)
                                      for spec in stage.weight_input_specs),
            "remat_residual_bytes": sum(_spec_bytes(spec, batch)
                                        for spec in stage.input_specs),
        })
    return rows


# -- calibration -------------------------------------------------------------------------------


def calibrate(split: Any, args: Sequence, *, repeats: int = 10, warmup: int = 2,
              model: CostModel = DEFAULT_MODEL, jit_compile: bool = True) -> list[dict]:
    """Measured against estimated time of each stage's forward + backward.

    Each stage's forward and backward are compiled on their own (``stage.compiled``, XLA by
    default) and run on the values the earlier stages produce from ``args``. The stages take
    turns within each of ``repeats`` rounds, so a slow spell of the machine costs them all
    alike, and each stage's time is its fastest round. The estimate uses the batch size of
    ``args`` (the leading dimension of the first one).

    Returns one dict per stage: ``index``, ``measured`` and ``estimated`` (seconds),
    ``rel_error`` (``estimated / measured - 1``) and ``parts``, the estimate in the four
    columns of ``PARTS``.
    """
    import tensorflow as tf

    tensors = [tf.convert_to_tensor(a) for a in tf.nest.flatten(list(args))]
    batch = int(tensors[0].shape[0]) if tensors and tensors[0].shape.rank else 1
    g = split.graph
    outputs = {ir.parse_tensor_name(n)[0] for n in split.output_names}
    with_backward = gradient_ops(g, outputs)
    env = dict(zip(split.arg_names, tensors))
    steps = []
    for stage in split.stages:
        forward, backward = stage.compiled(jit_compile)
        inputs = [env[n] for n in stage.inputs]
        outs, _ = forward(*inputs)
        env.update(zip(stage.outputs, outs))
        cotangents = [tf.ones_like(o) if o.dtype.is_floating else tf.zeros_like(o)
                      for o in outs]

        def step(forward=forward, backward=backward, inputs=inputs, cotangents=cotangents):
            _, res = forward(*inputs)
            in_cots, var_grads = backward(res, cotangents)
            _block(in_cots, var_grads)

        for _ in range(warmup):
            step()
        steps.append(step)
    times = [[] for _ in steps]
    for _ in range(repeats):
        for step, spent in zip(steps, times):
            start = time.perf_counter()
            step()
            spent.append(time.perf_counter() - start)
    rows = []
    for stage, spent in zip(split.stages, times):
        parts = np.zeros(len(PARTS))
        for n in stage_nodes(split, stage.index):
            parts += op_cost(g, n, batch, n in with_backward).parts(model)
        estimated = float(parts.sum())
        measured = min(spent)
        rows.append({
            "index": stage.index,
            "measured": measured,
            "estimated": estimated,
            "rel_error": estimated / measured - 1.0,
            "parts": dict(zip(PARTS, parts.tolist())),
        })
    return rows


def _block(*values: Any) -> None:
    import tensorflow as tf

    for v in tf.nest.flatten(values):
        if v is not None and hasattr(v, "numpy"):
            v.numpy()
            return  # one value is enough: the step's outputs come out of one program


def fit(rows: Sequence[dict], model: CostModel = DEFAULT_MODEL) -> CostModel:
    """``model`` with its rates rescaled to fit measured stage times (``calibrate`` rows,
    from one or more splits): non-negative least squares on the relative error, one scale
    for the FLOP rate, the slow-convolution rate and the byte rate. The per-op overhead is
    kept (too small to tell from noise on programs big enough to time); a rate the rows
    never use keeps its constant."""
    columns = [p for p in PARTS if p != "overhead"]
    a = np.array([[r["parts"][p] for p in columns] for r in rows], float)
    y = np.array([r["measured"] - r["parts"]["overhead"] for r in rows], float)
    measured = np.array([r["measured"] for r in rows], float)
    # relative error: every stage weighs the same
    scale = dict(zip(columns, _nnls(a / measured[:, None], y / measured)))

    def rescaled(rate: float, s: float) -> float:  # time x s = work / (rate / s)
        return rate / s if s > 0 else rate

    return replace(
        model,
        flops_per_second=rescaled(model.flops_per_second, scale["compute"]),
        slow_conv_flops_per_second=rescaled(model.slow_conv_flops_per_second,
                                            scale["slow_conv"])
        if model.slow_conv_flops_per_second else None,
        bytes_per_second=rescaled(model.bytes_per_second, scale["memory"]),
    )


def _nnls(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative least squares for a few columns, by trying every active set."""
    n = a.shape[1]
    used = [j for j in range(n) if np.any(a[:, j] > 0)]
    best, best_err = np.zeros(n), float(np.sum(y * y))
    for mask in range(1, 1 << len(used)):
        cols = [used[i] for i in range(len(used)) if mask >> i & 1]
        x, *_ = np.linalg.lstsq(a[:, cols], y, rcond=None)
        if np.all(x >= 0):
            err = float(np.sum((a[:, cols] @ x - y) ** 2))
            if err < best_err:
                best_err, best = err, np.zeros(n)
                best[cols] = x
    return best
