"""Benchmark of automatic cut selection (issue 6): writes docs/autosplit.md.

    .venv/bin/python tools/bench_autosplit.py            # everything, ~15 minutes on 2 cores
    .venv/bin/python tools/bench_autosplit.py --quick    # smaller models, fewer repeats

Four sections:

1. Partition quality on ResNet50 (weights=None, 64x64 and 224x224 inputs, 4 stages): the
   most expensive stage against a quarter of the total (cost model) and the bytes crossing
   the cuts, for ``auto_split`` and for cuts at equal op counts and at equal parameter
   counts; bytes are read back from each ``Split.summary()``.
2. Partitioner runtime on synthetic networkx programs of up to 100,000 ops (built directly,
   not through TensorFlow), phase by phase.
3. The cost model against measured time: each stage's forward + backward compiled with
   XLA (``costs.calibrate``), with the default constants and fitted on other programs.
4. The pipeline-time objective (``microbatches``) and ``memory_limit`` at work.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import networkx as nx  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow.core.framework import node_def_pb2  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import gradsplit_compiler as gsc  # noqa: E402
from gradsplit_compiler import autosplit, costs  # noqa: E402
from gradsplit_compiler.program import Program  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- a synthetic program, built straight into the IR ---------------------------------------------


class _Builder:
    """Adds ops to a ``networkx.MultiDiGraph`` with the attributes ``ir.to_networkx`` gives
    (``op``, ``node_def``, ``outputs``; data edges keyed by input index, control edges)."""

    def __init__(self) -> None:
        self.g = nx.MultiDiGraph()
        self.variable_placeholders: dict[str, int] = {}

    def op(self, name: str, op: str, inputs=(), outputs=(), control=(), **attrs) -> str:
        nd = node_def_pb2.NodeDef(name=name, op=op)
        for key, value in attrs.items():
            if isinstance(value, bool):
                nd.attr[key].b = value
            elif isinstance(value, str):
                nd.attr[key].s = value.encode()
        self.g.add_node(name, node_def=nd, op=op,
                        outputs=[(d, tf.TensorShape(s)) for d, s in outputs])
        for i, inp in enumerate(inputs):
            src, _, index = inp.partition(":")
            self.g.add_edge(src, name, key=i, control=False, src_output=int(index or 0),
                            dst_input=i)
        for j, src in enumerate(control):
            self.g.add_edge(src, name, key=f"^{j}", control=True, position=j)
        return name

    def variable(self, name: str, shape, written: bool = False) -> str:
        ph = self.op(f"{name}/resource", "Placeholder", outputs=[(tf.resource, [])])
        self.variable_placeholders[ph] = len(self.variable_placeholders)
        return self.op(f"{name}/read", "ReadVariableOp", [ph], [(tf.float32, shape)])

    def const(self, name: str, shape, dtype=tf.int32) -> str:
        return self.op(name, "Const", outputs=[(dtype, shape)])


def synthetic_program(num_ops: int, seed: int = 0, width: int = 256) -> Program:
    """A residual network of about ``num_ops`` ops: blocks of MatMul, BiasAdd, a batch-norm
    written out in elementwise ops with a moving-average update (a side effect), ReLU and a
    skip connection; widths change every few blocks, long skips join blocks far apart, and a
    shape computation feeds the loss. Built directly as the IR, without TensorFlow tracing."""
    rng = np.random.default_rng(seed)
    b = _Builder()
    x = b.op("x", "Placeholder", outputs=[(tf.float32, [None, width])])
    shape = b.op("x_shape", "Shape", [x], [(tf.int32, [2])])
    h, d = x, width
    updates: list[str] = []
    held: list[tuple[str, int]] = []
    block = 0
    while b.g.number_of_nodes() < num_ops - 12:
        p = f"block{block}"
        if block % 8 == 7:  # a width change
            d = int(rng.choice([128, 256, 512]))
        w = b.variable(f"{p}/W", [None if False else h_dim(b, h), d])
        mm = b.op(f"{p}/MatMul", "MatMul", [h, w], [(tf.float32, [None, d])])
        bias = b.variable(f"{p}/b", [d])
        z = b.op(f"{p}/BiasAdd", "BiasAdd", [mm, bias], [(tf.float32, [None, d])])
        axes = b.const(f"{p}/axes", [1])
        mean = b.op(f"{p}/mean", "Mean", [z, axes], [(tf.float32, [1, d])])
        sq = b.op(f"{p}/sqdiff", "SquaredDifference", [z, mean], [(tf.float32, [None, d])])
        var = b.op(f"{p}/var", "Mean", [sq, axes], [(tf.float32, [1, d])])
        eps = b.const(f"{p}/eps", [], tf.float32)
        rs = b.op(f"{p}/rsqrt", "Rsqrt", [b.op(f"{p}/add_eps", "AddV2", [var, eps],
                                                [(tf.float32, [1, d])])],
                  [(tf.float32, [1, d])])
        cen = b.op(f"{p}/center", "Sub", [z, mean], [(tf.float32, [None, d])])
        norm = b.op(f"{p}/norm", "Mul", [cen, rs], [(tf.float32, [None, d])])
        if block % 2 == 0:  # the moving mean: a side effect hanging off the block
            mm_read = b.variable(f"{p}/moving_mean", [1, d], written=True)
            momentum = b.const(f"{p}/momentum", [], tf.float32)
            decayed = b.op(f"{p}/decay", "Mul", [mm_read, momentum], [(tf.float32, [1, d])])
            new = b.op(f"{p}/update", "AddV2", [decayed, mean], [(tf.float32, [1, d])])
            ph = f"{p}/moving_mean/resource"
            updates.append(b.op(f"{p}/assign", "AssignVariableOp", [ph, new]))
        act = b.op(f"{p}/relu", "Relu", [norm], [(tf.float32, [None, d])])
        if h_dim(b, h) == d:
            act = b.op(f"{p}/skip", "AddV2", [act, h], [(tf.float32, [None, d])])
        if held and rng.random() < 0.05:  # a long skip joins an earlier block of this width
            same = [t for t, dim in held if dim == d]
            if same:
                act = b.op(f"{p}/long_skip", "AddV2", [act, same[0]],
                           [(tf.float32, [None, d])])
        if rng.random() < 0.1:
            held = (held + [(act, d)])[-4:]
        h = act
        block += 1
    rows = b.op("rows", "StridedSlice", [shape], [(tf.int32, [])])
    count = b.op("count", "Cast", [rows], [(tf.float32, [])])
    sq = b.op("loss/square", "Square", [h], [(tf.float32, [None, d])])
    axes = b.const("loss/axes", [2])
    total = b.op("loss/sum", "Sum", [sq, axes], [(tf.float32, [])])
    value = b.op("loss/value", "RealDiv", [total, count], [(tf.float32, [])])
    out = b.op("Identity", "Identity", [value], [(tf.float32, [])])
    done = b.op("NoOp", "NoOp", control=updates)
    return Program(
        graph=b.g, arg_names=[f"{x}:0"], arg_specs=[tf.TensorSpec([None, width])],
        output_names=[f"{out}:0"], output_structure=f"{out}:0", control_outputs=[done],
        variables=[], variable_placeholders=dict(b.variable_placeholders), other_captures={},
    )


def h_dim(b: _Builder, tensor: str) -> int:
    return b.g.nodes[tensor.partition(":")[0]]["outputs"][0][1][-1]
