"""Benchmark of automatic cut selection: writes docs/autosplit.md.

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

import networkx as nx
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import node_def_pb2

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import gradsplit_compiler as gsc  # noqa: E402
from gradsplit_compiler import zoo  # noqa: E402
from gradsplit_compiler.ir.program import Program  # noqa: E402
from gradsplit_compiler.plan import autosplit, costs  # noqa: E402


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


# -- models ---------------------------------------------------------------------------------------


def resnet50(resolution: int, classes: int = 10):
    """``zoo.resnet50`` (weights=None) in float32, training mode, cross-entropy: ``(loss,
    input_signature, make_args(batch))``."""
    case = zoo.resnet50(tf.float32, resolution=resolution, classes=classes)
    return case.fn, case.input_signature, lambda batch: case.args(0, batch)


def mlp(width: int = 1024, depth: int = 8):
    """``zoo.dense_chain``: ReLU layers without biases, ``mean(h * h)``, weights times 0.03."""
    case = zoo.dense_chain(depth, width, activation="relu", loss="mean_square", scale=0.03,
                           dtype=tf.float32)
    return case.fn, case.input_signature, lambda batch: case.args(1, batch)


def transformer(blocks: int = 4, seq: int = 64, dim: int = 128, heads: int = 4):
    """``zoo.transformer``: Keras MultiHeadAttention blocks (einsum) with layer norm and a
    ReLU dense MLP, ``mean(out ** 2)``."""
    case = zoo.transformer(tf.float32, blocks=blocks, seq=seq, dim=dim, heads=heads,
                           activation="relu", loss="mean_square")
    return case.fn, case.input_signature, lambda batch: case.args(2, batch)


def analysed(fn, signature):
    """The program after the passes that do not depend on cuts (what auto_split plans on)."""
    import passes
    from gradsplit_compiler.frontend.capture import capture

    return passes.run(capture(fn, signature), "analysis")


def carried_bytes(split, batch: int) -> list[int]:
    """Bytes crossing each cut of ``split`` (its ``boundaries``, arguments aside)."""
    return [sum(costs.tensor_bytes(split.spec(n).dtype, split.spec(n).shape, batch)
                for n in boundary if n not in split.arg_names)
            for boundary in split.boundaries]


# -- 1. partition quality on ResNet50 -------------------------------------------------------------


def quality(resolution: int, batch: int, stages: int = 4) -> dict:
    fn, signature, _ = resnet50(resolution)
    program = analysed(fn, signature)
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    auto = autosplit.plan_partition(program, stages, batch_size=batch)
    plan_time = (time.perf_counter() - start_wall, time.process_time() - start_cpu)
    plans = {"auto_split": auto}
    for by in ("ops", "params"):
        plans[f"equal {by}"] = autosplit.baseline_plan(program, stages, by, batch_size=batch)
    for by in ("ops", "params"):
        plans[f"auto_split at equal-{by} bottleneck"] = autosplit.plan_partition(
            program, stages, batch_size=batch,
            max_stage_cost=plans[f"equal {by}"].bottleneck)
    plans["auto_split, XLA_CPU model"] = autosplit.plan_partition(
        program, stages, batch_size=batch, model=costs.XLA_CPU)
    rows = []
    for name, plan in plans.items():
        log(f"  resnet50@{resolution} {name}: building the split")
        split = gsc.split(fn, signature, plan.cuts)
        carried = carried_bytes(split, batch)
        summary = split.summary(batch_size=batch)
        plan.compare(split)
        # balance under the default model, whatever model chose the cuts
        default_costs = [r["cost"] for r in summary]
        rows.append({
            "method": name,
            "imbalance": max(default_costs) / (sum(default_costs) / stages),
            "plan_imbalance": plan.imbalance,
            "cut_bytes": carried,
            "plan_bytes": plan.cut_bytes,
            "entering": sum(r["boundary_bytes"] for r in summary),
            "tensors": [len([n for n in b if n not in split.arg_names])
                        for b in split.boundaries],
            "mismatches": len(plan.mismatches),
            "memory": [r["variable_bytes"] + r["residual_bytes"] for r in summary],
        })
    frontier = []
    for eps in (0.0, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0):
        plan = autosplit.plan_partition(program, stages, batch_size=batch, eps=eps)
        frontier.append((eps, plan.imbalance, plan.total_bytes, max(plan.cut_bytes)))
    memory = autosplit.plan_partition(program, stages, batch_size=batch, memory_limit=1e15)
    return {"resolution": resolution, "batch": batch, "rows": rows, "frontier": frontier,
            "plan_time": plan_time, "ops": program.graph.number_of_nodes(),
            "lower_bound": auto.lower_bound / (auto.total_cost / stages),
            "estimated_memory": memory.stage_memory}


# -- 2. partitioner runtime -----------------------------------------------------------------------


def runtime(sizes, stage_counts, repeats: int) -> list[dict]:
    rows = []
    for n in sizes:
        program = synthetic_program(n)
        outputs = {o.rpartition(":")[0] for o in program.output_names}
        for k in stage_counts:
            if n != max(sizes) and k != 4:
                continue
            for polish in (False, True):
                best = None
                for _ in range(repeats):
                    wall, cpu = time.perf_counter(), time.process_time()
                    seconds = costs.op_costs(program.graph, outputs, 32)
                    cost_wall, cost_cpu = time.perf_counter() - wall, time.process_time() - cpu
                    wall, cpu = time.perf_counter(), time.process_time()
                    plan = autosplit.plan_partition(program, k, batch_size=32, polish=polish,
                                                    op_seconds=seconds)
                    result = {"ops": program.graph.number_of_nodes(),
                              "edges": program.graph.number_of_edges(), "stages": k,
                              "polish": polish, "cost_wall": cost_wall, "cost_cpu": cost_cpu,
                              "wall": time.perf_counter() - wall,
                              "cpu": time.process_time() - cpu,
                              "phases": dict(plan.timings), "imbalance": plan.imbalance,
                              "groups": len(plan.groups)}
                    if best is None or result["wall"] < best["wall"]:
                        best = result
                rows.append(best)
                log(f"  {n} ops, {k} stages, polish={polish}: {best['wall']:.3f} s")
    return rows


# -- 3. the cost model against measured time ------------------------------------------------------


def calibration(quick: bool, repeats: int) -> dict:
    cases = [("MLP 8x1024, batch 256", mlp(), 256, 4),
             ("Transformer 4 blocks, batch 16", transformer(), 16, 4),
             ("ResNet50 224x224, batch 8", resnet50(224), 8, 4),
             ("ResNet50 64x64, batch 32", resnet50(64), 32, 4)]
    if quick:
        cases = [("MLP 4x256, batch 64", mlp(256, 4), 64, 2)]
    measured = {}
    for name, (fn, signature, make_args), batch, stages in cases:
        log(f"  calibrating {name}")
        split = gsc.auto_split(fn, signature, stages, batch_size=batch)
        rows = costs.calibrate(split, make_args(batch), repeats=repeats,
                               model=costs.XLA_CPU)
        measured[name] = rows
    table = {}
    for name, rows in measured.items():
        others = [r for n, rs in measured.items() if n != name for r in rs]
        fitted = costs.fit(others, costs.XLA_CPU) if others else costs.XLA_CPU
        table[name] = {
            "measured": [r["measured"] for r in rows],
            "default": [_estimate(r, costs.DEFAULT_MODEL) for r in rows],
            "xla_cpu": [_estimate(r, costs.XLA_CPU) for r in rows],
            "held_out_fit": [_estimate(r, fitted) for r in rows],
        }
    return table


def _estimate(row: dict, model: costs.CostModel) -> float:
    """A calibrate row's estimate under another model (its parts were made under XLA_CPU).
    Without a slow-convolution rate, those convolutions run at the model's FLOP rate."""
    base = costs.XLA_CPU
    parts = row["parts"]
    slow_rate = model.slow_conv_flops_per_second or model.flops_per_second
    return (parts["compute"] * base.flops_per_second / model.flops_per_second
            + parts["slow_conv"] * base.slow_conv_flops_per_second / slow_rate
            + parts["memory"] * base.bytes_per_second / model.bytes_per_second
            + parts["overhead"] * model.op_seconds / base.op_seconds)


def errors(estimated, measured) -> tuple[float, float]:
    """(mean |relative error|, mean |error of each stage's share|): the second is what a
    partition depends on, since only the ratio of stage costs moves a cut."""
    est, mea = np.array(estimated), np.array(measured)
    rel = np.abs(est / mea - 1)
    share = np.abs(est / est.sum() / (mea / mea.sum()) - 1)
    return float(rel.mean()), float(share.mean())


# -- 4. objectives --------------------------------------------------------------------------------


def objectives(resolution: int, batch: int, stages: int = 4) -> dict:
    fn, signature, _ = resnet50(resolution)
    program = analysed(fn, signature)
    rows = []
    for m in (None, 1, 4, 32):
        plan = autosplit.plan_partition(program, stages, batch_size=batch, microbatches=m)
        rows.append(("microbatches", m, plan.imbalance, plan.total_bytes, plan.pipeline_time))
    smallest = None
    try:
        autosplit.plan_partition(program, stages, batch_size=batch, memory_limit=1.0)
    except gsc.GradSplitError as exc:
        smallest = int(str(exc).rsplit("(", 1)[1].split()[0])
    limits = []
    for factor in (1.0, 1.1, 1.5):
        plan = autosplit.plan_partition(program, stages, batch_size=batch,
                                        memory_limit=smallest * factor)
        limits.append((factor, smallest * factor, plan.imbalance, plan.stage_memory))
    return {"rows": rows, "smallest": smallest, "limits": limits, "resolution": resolution,
            "batch": batch}


# -- 5. verify ------------------------------------------------------------------------------------


def verification() -> list[tuple[str, int, float, bool]]:
    """``auto_split`` on three float64 programs, checked by ``gsc.verify`` without XLA: zoo
    programs, weights (then inputs) of the chains from one stream."""
    rng = np.random.default_rng(0)
    chain = {"activation": "tanh", "loss": "mean_square", "scale": 0.5, "dtype": tf.float64,
             "batch": 5, "seed": rng}
    cases = [("MLP, 6 layers", zoo.dense_chain(6, 8, **chain), 3),
             ("skip connection over every cut", zoo.dense_chain(5, 8, skip=True, **chain), 3),
             ("small Keras ResNet, batch norm in training",
              zoo.keras_small_resnet(tf.float64, batch=4, loss="mean_square"), 3)]
    rows = []
    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})
    for name, case, stages in cases:
        split = gsc.auto_split(case.fn, case.input_signature, stages, batch_size=case.batch)
        report = gsc.verify(split, *case.args(rng), jit_compile=False)
        above = [r["rel_error"] for r in report.rows
                 if r["max_abs_error"] > report.rounding_floor]
        rows.append((name, stages, report.max_rel_error, bool(report.ok),
                     max(above, default=0.0), report.max_abs_error, report.rounding_floor))
    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": False})
    return rows


# -- the report -----------------------------------------------------------------------------------


def machine() -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench import cpu_name  # one reading of the machine for both benchmarks

    cpu = cpu_name()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}, {os.cpu_count()} cores (load average {load:.1f} when the report was "
            f"written); Python {platform.python_version()}, TensorFlow {tf.__version__}, "
            f"networkx {nx.__version__}, numpy {np.__version__}")


def mb(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f}"


METHOD = """\
# Automatic cut selection

`gsc.auto_split(fn, input_signature, num_stages, *, batch_size=None, memory_limit=None,
microbatches=None)` chooses the cuts and returns the `Split` that `gsc.split` makes of them,
with `split.plan` saying what was intended. `split.summary(batch_size)` gives, for every
split (manual or automatic), one row per stage: `ops`, `cost`, `variable_bytes`,
`boundary_tensors`, `boundary_bytes` (what enters the stage from earlier ones, arguments
aside) and `residual_bytes`.

## The method (`gradsplit_compiler/plan/autosplit.py`)

1. **Cost** every op, forward + backward (`gradsplit_compiler/plan/costs.py`, below).
2. **Coarsen.** Constants and reads of variables nothing writes are folded into their users
   (split copies them into every stage that reads them, so they never cross a cut). Ops that
   only feed side effects (batch-norm statistics updates) join the op they hang off, shape
   arithmetic (no float output) joins its first user, exactly where `split` would place them:
   on every program here, `split` put every op in the planned stage. What is left is one
   group per op of the main computation, in the program's own topological order (Keras
   layers stay together). Boundaries in runs of groups that cost nothing collapse to the one
   with the fewest bytes; a group with no float tensor leaving it cannot end a stage (a cut
   can only name float tensors).
3. **Prefix sums**: `C[b]` (cost before boundary `b`) and `X[b]` (bytes crossing it: a tensor
   counts once for every boundary between its producer and its last reader, however many
   readers it has), by a difference array, O(|V| + |E|).
4. **Bottleneck**: binary search on a stage's cost cap; each probe is a greedy pass of K
   binary searches over `C`. Result: `B*`, the smallest feasible bottleneck over the order.
5. **Bytes**: dynamic program `G[k][i] = min_j G[k-1][j] + X[j]` over the `j` whose stage
   `[j, i)` costs at most `(1 + eps) B*` (`eps = 0.03`) and fits `memory_limit`. The feasible
   `j` form an interval, so each of the K rows is one vectorised range-minimum query (a
   sparse table): O(K n log n) in numpy. Ties go to cuts nearest an equal share.
6. **Polish**: around each cut, inside the window where both neighbouring stages stay under
   the cap, `networkx.minimum_cut` on a node-split network (a tensor's bytes sit on one edge
   from its producer, so it counts once; infinite reverse edges keep the first side closed
   under predecessors) finds the cheapest predecessor-closed set, which need not be a prefix
   of the order. Kept only when it lowers the objective.
7. **Name the cuts**: cut k is every float tensor made in stage k and read after it; `split`
   computes each boundary from them (skip connections relayed, arguments fed).

`microbatches=M` replaces the objective by the pipeline's time, `sum(t_k) + (M - 1) max(t_k)`
with `t_k` the stage's cost plus sending its inputs and their cotangents
(`link_bytes_per_second`); steps 5-6 run over a ladder of caps from `B*` to the whole program
and the fastest plan wins. `memory_limit` bounds each stage's variables plus its residuals
times the micro-batches in flight (1F1B: `min(K - k, M)`, 1 without `microbatches`), by two
pointers over the order; when no plan fits, `GradSplitError` names the smallest limit that
does.

## The cost model (`gradsplit_compiler/plan/costs.py`)

From op types and static shapes, `None` dimensions at `batch_size`:

- `MatMul`, `BatchMatMul*`, `Conv2D`/`Conv3D`, `Conv2DBackpropInput`,
  `DepthwiseConv2dNative`, `Einsum` (equation parsed, ellipsis broadcast): 2 FLOPs per
  multiply-add; time is the roofline `max(FLOPs / F, bytes / B)`. Backward: **2x** the
  forward FLOPs (one product for the input cotangent, one for the weight gradient).
- Every other op: the bytes it reads and writes, over `B`. Backward: **1.5x** (an
  elementwise op's backward reads the cotangent and one saved value and writes one
  cotangent: three tensors against the forward's two).
- Views (`Reshape`, `Identity`, `Squeeze`...), constants and variable reads: free. Ops off the
  gradient path (shape arithmetic, statistics updates): no backward. Each op with work:
  `op_seconds` (1 us) forward and backward.
- `F` = 180 GFLOP/s and `B` = 16 GB/s: XLA on this 2-core CPU (the model's bytes count every
  op's inputs and outputs, and XLA fuses elementwise chains, so `B` is an effective rate).
  `costs.XLA_CPU` adds one measured quirk: XLA's CPU backend runs a convolution whose kernel
  is larger than its input (ResNet50's 3x3 kernels on 2x2 maps at 64x64 inputs) as a generic
  loop at ~2.5 GFLOP/s, 50-70x slower than the same FLOPs elsewhere.
- Residuals (for `memory_limit`): what TensorFlow's gradient functions keep (a `MatMul` its
  inputs, a `Relu` or `Tanh` its output, an `AddV2` nothing).

`costs.calibrate(split, args)` times each stage's compiled forward + backward under XLA and
returns measured against estimated time per stage; `costs.fit(rows)` rescales the rates.

## Against the known methods

- Alpa's layer DP fills an (n+1)^2 table of input bytes and runs in O(L n^2); here the bytes
  come from one difference array and the DP is O(K n log n), so 100,000 ops take under a
  second of CPU where an n^2 table would not fit in memory.
- PiPPy's MILP counts a tensor once per consuming edge and stops at a 30 s limit; here a
  tensor counts once per cut it spans (the flow network is node-split for the same reason),
  and the answer is exact over the order.
- DeepSpeed balances parameter counts or layer counts; both are baselines below, and with
  `max_stage_cost` at their bottleneck this DP never crosses more bytes (their cuts are
  among the plans it searches).
- PipeDream's antichain DP is exponential in width; the polish gets some of its freedom (a
  cut need not be a prefix of one order) at the price of a few local max-flows.
- Memory is per stage and per schedule (1F1B in-flight micro-batches), and the estimate of
  residuals matches what the split's stages keep to within 0.5% on ResNet50.
- What comes out is checked by the compiler itself: `split` recomputes each boundary from
  the named tensors, and `split.plan.mismatches` lists any op it placed elsewhere (none on
  every program measured).

Limits: the polish is local (the window where both stages stay under the cap; ops before it
stay put), so a much better cut far off the order can be missed; the order is the program's
own, not searched; the cost model's bytes term counts every op's inputs and outputs and
leaves fusion to the fitted rate; a stage's transfer time (pipeline objective) is
bytes / bandwidth, with no latency term.
"""


def resnet_lower_bound(q, rows) -> str:
    """Why no ResNet50 split balanced within 5% crosses as few bytes as equal parameter
    counts, whatever the order or the cost model: a bound from block output sizes."""
    r, b = q["resolution"], q["batch"]
    c3, c4, c5 = (((r // s) ** 2) * ch * 4 * b for s, ch in ((8, 512), (16, 1024), (32, 2048)))
    params = sum(rows["equal params"]["cut_bytes"])
    verdict = "more than" if c3 + c4 + c5 > params else "not more than"
    return (
        f"- A bound at {r}x{r}, batch {b}, for any split into 4 stages within 5% (each stage "
        "then holds at least 1 - 3 x 1.05 / 4 = 21.25% of the cost), under any cost model "
        "that, like FLOPs, gives the stem less than 21% and conv5 less than 42.5% of the "
        "total: stage 1 must reach past the stem (conv1 is 3% of ResNet50's FLOPs), and "
        "every cut between the stem and the first conv4 block crosses at least "
        f"{mb(c3)} MB (a conv3 block output; inside a conv2 block the shortcut and a "
        "main-path tensor together are as large); stages 3 and 4 cannot both fit in conv5 "
        "(3 of 16 blocks), so cut 2 lies before it and crosses at least "
        f"{mb(c4)} MB (a conv4 block output); cut 3 crosses at least {mb(c5)} MB (a conv5 "
        f"block output). That is {mb(c3 + c4 + c5)} MB at the least, {verdict} equal "
        f"parameter counts' {mb(params)} MB: the two halves of the acceptance (within 5%, "
        "and no more bytes than that recipe) cannot both hold on ResNet50, for any cut "
        "selection. Against equal op counts the DP's exact optimum over the order (table "
        "below) is the answer at 5%.")


def acceptance(quality_rows, runtime_rows, verify_rows) -> list[str]:
    out = ["## Acceptance, in short", ""]
    for q in quality_rows:
        rows = {r["method"]: r for r in q["rows"]}
        auto = rows["auto_split"]
        total = sum(auto["cut_bytes"])
        parts = []
        for by in ("ops", "params"):
            base = rows[f"equal {by}"]
            matched = rows[f"auto_split at equal-{by} bottleneck"]
            parts.append(
                f"equal {by}: imbalance {base['imbalance']:.3f}, {mb(sum(base['cut_bytes']))} "
                f"MB ({'more' if sum(base['cut_bytes']) > total else 'fewer'} than "
                f"auto_split's {mb(total)}); auto_split held to that baseline's bottleneck: "
                f"{mb(sum(matched['cut_bytes']))} MB")
        out.append(
            f"- ResNet50 {q['resolution']}x{q['resolution']}, batch {q['batch']}: the most "
            f"expensive of the 4 `auto_split` stages is {auto['imbalance']:.3f}x a quarter "
            f"of the total ({'within' if auto['imbalance'] <= 1.05 else 'outside'} 5%); "
            + "; ".join(parts) + ".")
    if quality_rows:
        out += ["", "On bytes, against the two recipes: at the balance asked for (within 5%), "
                "`auto_split` crosses more bytes than either, and no cut of this order could "
                "do otherwise (nor did the min-cut polish find one off it): the "
                "bytes-against-balance tables below are the DP's exact optimum over the "
                "order for each cap, and the fewest bytes at or under 1.05x is what "
                "`auto_split` returns. Equal parameter counts buys its few bytes with a 3x "
                "bottleneck (the parameters sit in conv5, where the activations are small), "
                "equal op counts with a 1.5x one. Held to the same bottleneck as a recipe "
                "(`max_stage_cost`), `auto_split` crosses fewer bytes than it in every case, "
                "and the DP guarantees this: the recipe's cuts are one of the plans it "
                "searched.", ""]
        out += [resnet_lower_bound(q, {r["method"]: r for r in q["rows"]})
                for q in quality_rows] + [""]
    big = [r for r in runtime_rows if r["ops"] >= 100_000 and r["stages"] == 4]
    for r in big:
        out.append(
            f"- {r['ops']:,} ops, 4 stages, polish {'on' if r['polish'] else 'off'}: the "
            f"partition took {r['wall']:.2f} s ({r['cpu']:.2f} s CPU); the cost model over "
            f"every op {r['cost_wall']:.2f} s more.")
    if verify_rows:
        worst = max(r[4] for r in verify_rows)
        out.append(f"- `gsc.verify` (float64, no XLA) on an MLP, a skip connection and a "
                   f"small Keras ResNet: ok on all: {all(r[3] for r in verify_rows)}; largest "
                   f"relative gradient error above rounding {worst:.1e}.")
    out.append("")
    return out


def write_report(path: Path, command: str, quality_rows, runtime_rows, calibration_rows,
                 objective_rows, verify_rows=()) -> None:
    out = [METHOD, "# Results", "",
           f"Made by `{command}` on {time.strftime('%Y-%m-%d')}, {machine()}. Other work "
           "shared the machine: wall-clock times are noisy, CPU times less so.", "",
           "Costs are the cost model's estimate of forward + backward seconds; bytes are what "
           "crosses each cut at the stated batch, read back from each `Split` "
           "(`split.boundaries`, arguments of `fn` aside; a tensor counts once per cut it "
           "crosses, however many stages read it). Imbalance is the most expensive stage "
           "over a quarter of the total under the default model: 1.00 is perfect.", ""]
    out += acceptance(quality_rows, runtime_rows, verify_rows)
    for q in quality_rows:
        out += [f"## ResNet50 at {q['resolution']}x{q['resolution']}, batch {q['batch']}, "
                "4 stages", "",
                f"{q['ops']} ops after inlining. The smallest possible bottleneck (the binary "
                f"search) is {q['lower_bound']:.3f}x a quarter; `auto_split` takes up to "
                f"1.03x that to cut fewer bytes. Planning took {q['plan_time'][0]:.2f} s "
                f"({q['plan_time'][1]:.2f} s CPU). \"at equal-X bottleneck\": `auto_split` "
                "with `max_stage_cost` set to that baseline's most expensive stage. The "
                "XLA_CPU row's own model counts the slow convolutions; its imbalance here is "
                "under the default model (under its own, it is the second column).", "",
                "| method | imbalance | own model | MB per cut | total MB | max MB | "
                "tensors per cut | MB entering stages | ops split placed elsewhere |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in q["rows"]:
            out.append(
                f"| {r['method']} | {r['imbalance']:.3f} | {r['plan_imbalance']:.3f} | "
                f"{', '.join(mb(b) for b in r['cut_bytes'])} | {mb(sum(r['cut_bytes']))} | "
                f"{mb(max(r['cut_bytes']))} | {', '.join(map(str, r['tensors']))} | "
                f"{mb(r['entering'])} | {r['mismatches']} |")
        auto = q["rows"][0]
        out += ["", "Memory per stage of the `auto_split` stages, variables + residuals, "
                "as `memory_limit` estimates it (from op types) and as the split holds it "
                "(`summary()`: `variable_bytes + residual_bytes`): "
                f"{', '.join(mb(m) for m in q['estimated_memory'])} MB estimated, "
                f"{', '.join(mb(m) for m in auto['memory'])} MB held."]
        out += ["", "Bytes against balance (`eps`: how far above the smallest bottleneck a "
                "stage may go to cut fewer bytes; the DP's optimum over the order, then the "
                "polish):", "",
                "| eps | imbalance | total MB | max MB |", "|---|---|---|---|"]
        for eps, imbalance, total, biggest in q["frontier"]:
            out.append(f"| {eps:g} | {imbalance:.3f} | {mb(total)} | {mb(biggest)} |")
        out.append("")
    if runtime_rows:
        out += ["## Partitioner runtime", "",
                "Synthetic residual networks built straight into the IR "
                "(`synthetic_program`: MatMul, bias, an elementwise batch norm with a "
                "moving-average side effect, ReLU, skips, long skips, shape arithmetic). "
                "`partition` is `plan_partition` given the op costs (indexing, coarsening, "
                "prefix sums, bottleneck search, bytes DP, polish, naming the cuts); "
                "`cost model` is `costs.op_costs` over every op. Best of the repeats by wall "
                "clock; CPU time of this process in brackets.", "",
                "| ops | edges | stages | polish | partition s (CPU) | cost model s (CPU) | "
                "index+coarsen | bottleneck | bytes DP | polish | groups |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in runtime_rows:
            p = r["phases"]
            out.append(
                f"| {r['ops']} | {r['edges']} | {r['stages']} | {'yes' if r['polish'] else 'no'}"
                f" | {r['wall']:.3f} ({r['cpu']:.3f}) | {r['cost_wall']:.3f} "
                f"({r['cost_cpu']:.3f}) | {p['coarsen']:.3f} | {p['bottleneck']:.4f} | "
                f"{p['bytes DP']:.4f} | {p['polish']:.3f} | {r['groups']} |")
        out.append("")
    if calibration_rows:
        out += ["## The cost model against measured time", "",
                "Each stage's forward and backward compiled on their own with XLA "
                "(`costs.calibrate`), fastest of the repeats, on the stages `auto_split` "
                "chose. `default` is `costs.DEFAULT_MODEL`; `XLA_CPU` adds XLA's slow "
                "convolutions; `held-out fit` is `costs.fit` on the *other* programs' "
                "stages, applied to this one. Relative error: mean over stages of "
                "|estimated / measured - 1|. Share error: the same for each stage's share of "
                "the total, which is all a partition depends on. Other work shared the 2 "
                "cores (load average 4-6): absolute times moved by up to 2x between runs of "
                "this benchmark (an MLP stage: 0.019 s in one run, 0.046 s in another), the "
                "share error by a few points. The fit's held-out column absorbs that "
                "machine's speed on the day; the shares are what to read.", "",
                "| program | measured s per stage | default | XLA_CPU | held-out fit | "
                "rel. error default / XLA_CPU / fit | share error default / XLA_CPU / fit |",
                "|---|---|---|---|---|---|---|"]
        for name, t in calibration_rows.items():
            errs = [errors(t[key], t["measured"]) for key in ("default", "xla_cpu",
                                                              "held_out_fit")]
            out.append(
                f"| {name} | {', '.join(f'{v:.3f}' for v in t['measured'])} | "
                f"{', '.join(f'{v:.3f}' for v in t['default'])} | "
                f"{', '.join(f'{v:.3f}' for v in t['xla_cpu'])} | "
                f"{', '.join(f'{v:.3f}' for v in t['held_out_fit'])} | "
                f"{' / '.join(f'{e[0]:.0%}' for e in errs)} | "
                f"{' / '.join(f'{e[1]:.0%}' for e in errs)} |")
        out.append("")
    for o in objective_rows:
        out += [f"## Objectives on ResNet50 at {o['resolution']}x{o['resolution']}, batch "
                f"{o['batch']}", "",
                "`microbatches=M` minimises the pipeline's time, sum of stage times plus "
                "(M - 1) times the largest, a stage's time including sending its inputs and "
                "their cotangents (`link_bytes_per_second`, 5 GB/s by default).", "",
                "| microbatches | imbalance | total MB across cuts | pipeline time s |",
                "|---|---|---|---|"]
        for _, m, imbalance, total, pipeline in o["rows"]:
            out.append(f"| {m if m else '-'} | {imbalance:.3f} | {mb(total)} | "
                       f"{'-' if pipeline is None else f'{pipeline:.3f}'} |")
        out += ["", "With one micro-batch nothing overlaps: the pipeline's time is the sum "
                "of the stages plus the transfers, so the plan puts the cuts where the "
                "tensors are smallest (the last few ops) and balance plays no part. With "
                "more micro-batches the bottleneck dominates and the cuts move back to "
                "balance.", ""]
        out += ["", f"`memory_limit` (variables + residuals per stage): the smallest limit "
                f"under which 4 stages exist is {mb(o['smallest'])} MB.", "",
                "| limit | imbalance | estimated MB per stage |", "|---|---|---|"]
        for factor, limit, imbalance, memory in o["limits"]:
            out.append(f"| {factor:g}x smallest ({mb(limit)} MB) | {imbalance:.3f} | "
                       f"{', '.join(mb(m) for m in memory)} |")
        out.append("")
    if verify_rows:
        out += ["## verify", "", "`auto_split`, then `gsc.verify(split, x, jit_compile=False)` "
                "in float64 (the same checks run in `tests/plan/test_autosplit.py`).", "",
                "`max_rel_error` counts, relative to a floor, gradients that are zero in exact "
                "arithmetic (a convolution's bias before batch norm); the next column leaves "
                "out the gradients whose whole error is below the rounding floor (64 ulps of "
                "the largest gradient entry), as `verify` does for its verdict.", "",
                "| program | stages | ok | max_rel_error | rel. error above rounding | "
                "max_abs_error | rounding floor |", "|---|---|---|---|---|---|---|"]
        for name, stages, error, ok, above, abs_error, floor in verify_rows:
            out.append(f"| {name} | {stages} | {ok} | {error:.1e} | {above:.1e} | "
                       f"{abs_error:.1e} | {floor:.1e} |")
        out.append("")
    path.write_text("\n".join(out) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "autosplit.md")
    args = parser.parse_args(argv)
    command = "python tools/bench_autosplit.py" + (" --quick" if args.quick else "")
    log("1. quality")
    resolutions = [(64, 32)] if args.quick else [(64, 32), (224, 32)]
    quality_rows = [quality(r, b) for r, b in resolutions]
    log("2. runtime")
    sizes = [1_000, 10_000] if args.quick else [1_000, 10_000, 100_000]
    runtime_rows = runtime(sizes, [2, 4, 8, 16], repeats=1 if args.quick else 5)
    log("3. calibration")
    calibration_rows = calibration(args.quick, repeats=2 if args.quick else 7)
    log("4. objectives")
    objective_rows = [] if args.quick else [objectives(224, 32)]
    log("5. verify")
    verify_rows = verification()
    write_report(args.out, command, quality_rows, runtime_rows, calibration_rows,
                 objective_rows, verify_rows)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
