"""``gsc.auto_split``: choose the cuts for the user, balanced stages with the fewest bytes across.

The method, near-linear in the size of the graph:

1. **Cost** every op with ``costs`` (forward + backward seconds from op types and static
   shapes, ``None`` dimensions at ``batch_size``).
2. **Coarsen.** Constants and reads of variables nothing writes are copied into every stage
   that uses them (``split`` does that), so they are folded into their users: they cost
   nothing and never cross a cut. Ops that only feed side effects (batch-norm statistics
   updates) join the op they hang off, as ``split`` places them; shape arithmetic (ops with
   no floating-point output) joins its first user, since a cut can only name float tensors.
   What is left are *groups*, one per op of the main computation, in a topological order
   (the program's own order when it is one, which keeps Keras layers together). Runs of
   groups that cost nothing are merged into the cheapest place to cut among them, and a
   group with no float tensor leaving it cannot end a stage.
3. **Prefix sums** over that order: ``C[b]``, the cost before boundary ``b``, and ``X[b]``,
   the bytes crossing it, where a tensor counts once for every boundary between its
   producer and its last consumer, however many consumers it has (a difference array,
   O(|V| + |E|)).
4. **Bottleneck.** Binary search on the cap of a stage's cost, each probe a greedy pass of
   ``K`` binary searches over ``C``: the smallest feasible bottleneck ``B*``.
5. **Bytes.** A dynamic program over the boundaries, ``G[k][i] = min G[k-1][j] + X[j]`` over
   the ``j`` whose stage ``[j, i)`` costs at most ``(1 + eps) B*`` (and fits
   ``memory_limit``): the fewest crossing bytes at a near-optimal bottleneck. The window of
   ``j`` is an interval, so each row is one vectorised range-minimum query (a sparse table),
   O(K n log n) with numpy.
6. **Polish** (``polish=True``): near each cut, inside the window where either neighbouring
   stage stays under the cap, a minimum s-t cut with networkx flows finds the cheapest
   predecessor-closed set, which need not be a prefix of the order (node-split: a tensor's
   bytes sit on one edge, so it counts once). Only improvements are kept.

With ``microbatches=M`` the objective is the pipeline's time, ``sum(t_k) + (M - 1) max(t_k)``
with ``t_k`` the stage's cost plus sending its inputs and their cotangents over a link
(``CostModel.link_bytes_per_second``): steps 5-6 run for a ladder of caps above ``B*`` and the
fastest result wins. With ``memory_limit`` (bytes per stage), a stage's variables plus its
residuals times the micro-batches in flight under 1F1B (``min(K - k, M)``, 1 without
``microbatches``) must fit. When no plan does, stages may be rematerialised (``Plan.remat``,
see "remat" below): only those whose residuals do not fit, at the price of a second forward
in their time; when even that cannot fit, ``GradSplitError`` names the stage and the
smallest limit that can work.

The cuts handed to ``split`` are, for each cut ``k``, the floating-point tensors made in
stage ``k`` and used after it; ``split`` computes each boundary from them (skip connections,
arguments), and ``Split.plan`` records what was intended and where ``split`` placed an op
elsewhere.

Example
-------
>>> import numpy as np, tensorflow as tf
>>> import gradsplit_compiler as gsc
>>> Ws = [tf.Variable(np.full((16, 16), 0.1)) for _ in range(4)]
>>> @tf.function
... def loss(x):
...     for W in Ws:
...         x = tf.tanh(x @ W)
...     return tf.reduce_sum(x)
>>> s = gsc.auto_split(loss, [tf.TensorSpec([None, 16], tf.float64)], 2, batch_size=8)
>>> len(s.stages), s.plan.bottleneck <= 1.03 * s.plan.lower_bound
(2, True)
"""

from __future__ import annotations

import functools
import heapq
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np

import passes
from gradsplit_compiler import ir
from gradsplit_compiler.core.split import Split, program_of
from gradsplit_compiler.core.verify import RANDOM_OPS
from gradsplit_compiler.errors import GradSplitError
from gradsplit_compiler.ir.program import READ_ONLY_RESOURCE_OPS, Program
from gradsplit_compiler.plan import costs as _costs
from gradsplit_compiler.util import collector_paused, format_bytes

__all__ = ["auto_split", "plan_partition", "baseline_plan", "Plan"]

_INF = float("inf")
# The ladder of caps, as multiples of B*, tried for the pipeline-time objective.
_PIPELINE_CAPS = (1.0, 1.005, 1.01, 1.02, 1.035, 1.05, 1.075, 1.1, 1.15, 1.2, 1.3, 1.4, 1.6,
                  1.8, 2.0, 2.5, 3.0, 4.0, _INF)


@dataclass
class Plan:
    """What ``plan_partition`` chose, and what it expects of each stage.

    ``cuts`` is what goes to ``split``; ``positions`` are the cuts as boundaries of
    ``groups`` (the coarsened ops, in order); ``stage_of`` maps every op placed by the plan
    to its intended stage. Costs are estimated seconds (forward + backward), bytes are at
    ``batch_size``. ``mismatches`` (filled by ``auto_split``) lists ``(op, intended stage,
    stage split chose)`` for every op ``split`` put elsewhere.

    ``remat`` (one bool per stage) says which stages the plan rematerialises: chosen only
    when no plan fits ``memory_limit`` without, and then only for the stages whose residuals
    do not fit; ``gsc.pipeline`` of the split uses it unless told otherwise.
    ``remat_saved`` is the bytes each such stage saves (its need without remat minus its
    need with), ``remat_seconds`` the forward it runs again, counted in ``stage_costs``;
    ``stage_memory`` is each stage's need as planned. ``explain()`` says all this in words.
    """

    num_stages: int
    cuts: list[list[str]]
    positions: list[int]
    stage_costs: list[float]
    cut_bytes: list[int]
    lower_bound: float
    total_cost: float
    stage_memory: list[float] = field(default_factory=list)
    pipeline_time: float | None = None
    timings: dict[str, float] = field(default_factory=dict)
    polished: list[int] = field(default_factory=list)
    mismatches: list[tuple[str, int, int | None]] = field(default_factory=list)
    method: str = "auto"
    remat: list[bool] = field(default_factory=list)
    remat_saved: list[int] = field(default_factory=list)
    remat_seconds: list[float] = field(default_factory=list)
    # (op names, members of each group in order, stage of each group): groups and stage_of
    # are built from these when asked for, not on every plan of a 100,000-op program
    _layout: Any = field(default=None, repr=False, compare=False)

    @functools.cached_property
    def groups(self) -> list[list[str]]:
        names, members, _ = self._layout
        return [[names[v] for v in mem] for mem in members]

    @functools.cached_property
    def stage_of(self) -> dict[str, int]:
        names, members, stages = self._layout
        return {names[v]: int(k) for mem, k in zip(members, stages) for v in mem}

    @property
    def bottleneck(self) -> float:
        return max(self.stage_costs)

    @property
    def imbalance(self) -> float:
        """The most expensive stage over an equal share of the total (1.0 is perfect)."""
        return self.bottleneck / (self.total_cost / self.num_stages)

    @property
    def total_bytes(self) -> int:
        return int(sum(self.cut_bytes))

    def explain(self) -> str:
        """The plan in words: per stage its estimated seconds and, with ``memory_limit``,
        its bytes; the stages rematerialised, and what that saves and costs."""
        lines = [f"{self.num_stages} stages ({self.method}), bottleneck "
                 f"{self.bottleneck * 1e3:.3g} ms, imbalance {self.imbalance:.3f}, "
                 f"{format_bytes(self.total_bytes)} across the cuts"]
        for s in range(self.num_stages):
            line = f"stage {s}: {self.stage_costs[s] * 1e3:.3g} ms"
            if self.stage_memory:
                line += f", {format_bytes(self.stage_memory[s])}"
            if self.remat and self.remat[s]:
                line += (f", rematerialised: saves {format_bytes(self.remat_saved[s])} "
                         f"for {self.remat_seconds[s] * 1e3:.3g} ms of forward run again")
            lines.append(line)
        chosen = [s for s, r in enumerate(self.remat) if r]
        lines.append(f"remat on stage{'s' if len(chosen) > 1 else ''} "
                     f"{', '.join(map(str, chosen))}: their residuals would not fit "
                     "memory_limit" if chosen else "no stage rematerialised")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.explain()

    def compare(self, split: Any) -> list[tuple[str, int, int | None]]:
        """``(op, intended, actual)`` for every op ``split`` placed in another stage."""
        g = split.graph
        found = []
        for op, k in self.stage_of.items():
            actual = g.nodes[op].get("stage") if op in g else None
            if actual != k:
                found.append((op, k, actual))
        self.mismatches = found
        return found


# -- the graph, indexed -------------------------------------------------------------------------


class _Indexed:
    """The program's graph as integer lists: one pass over networkx, then plain Python."""

    def __init__(self, program: Program):
        g = program.graph
        # One pass over each of networkx's iterators (``g.nodes(data=True)``,
        # ``g.adjacency()``): the views ``g.nodes[n]``, ``g.succ[n]`` cost a wrapper object
        # per lookup, which dominates on 100,000 ops.
        self.names = []
        self.ops, self.outputs, self.float_out = [], [], []
        is_float = _costs.is_float
        for name, a in g.nodes(data=True):
            self.names.append(name)
            self.ops.append(a["op"])
            outs = a.get("outputs") or ()
            self.outputs.append(outs)
            found = False
            for d, _ in outs:
                if is_float(d):
                    found = True
                    break
            self.float_out.append(found)
        n = len(self.names)
        index = dict(zip(self.names, range(n)))
        self.index = index
        self.data_out: list[list[tuple[int, int]]] = [[] for _ in range(n)]  # (out, reader)
        self.data_pred: list[list[int]] = [[] for _ in range(n)]
        self.ctrl_pred: list[list[int]] = [[] for _ in range(n)]
        self.ctrl_succ: list[list[int]] = [[] for _ in range(n)]
        in_order = True
        data_out, data_pred, ctrl_pred, ctrl_succ = (self.data_out, self.data_pred,
                                                     self.ctrl_pred, self.ctrl_succ)
        for u, nbrs in g.adjacency():
            iu = index[u]
            out = data_out[iu]
            for v, keyed in nbrs.items():
                iv = index[v]
                if iv < iu:
                    in_order = False
                for a in keyed.values():
                    if a["control"]:
                        ctrl_pred[iv].append(iu)
                        ctrl_succ[iu].append(iv)
                    else:
                        out.append((a["src_output"], iv))
                        data_pred[iv].append(iu)
        self.in_order = in_order

    def successors(self, u: int) -> set[int]:
        return {w for _, w in self.data_out[u]} | set(self.ctrl_succ[u])

    def written(self, placeholders: set[int]) -> set[int]:
        """The placeholders some op writes (an op other than a read takes the handle)."""
        ops = self.ops
        return {p for p in placeholders
                if any(ops[w] not in READ_ONLY_RESOURCE_OPS for _, w in self.data_out[p])}

    def topological(self) -> list[int]:
        """The program's own node order when it is topological, else the topological order
        closest to it (Kahn's algorithm, lowest index first)."""
        n = len(self.names)
        if self.in_order:
            return list(range(n))
        indegree = [len(set(self.data_pred[v]) | set(self.ctrl_pred[v])) for v in range(n)]
        heap = [v for v in range(n) if indegree[v] == 0]
        heapq.heapify(heap)
        order = []
        while heap:
            u = heapq.heappop(heap)
            order.append(u)
            for v in self.successors(u):
                indegree[v] -= 1
                if indegree[v] == 0:
                    heapq.heappush(heap, v)
        return order

    def reach_back(self, roots: Sequence[int], data_only: bool) -> list[bool]:
        seen = [False] * len(self.names)
        stack = list(roots)
        for r in stack:
            seen[r] = True
        data, ctrl = self.data_pred, self.ctrl_pred
        while stack:
            v = stack.pop()
            for u in data[v] if data_only else data[v] + ctrl[v]:
                if not seen[u]:
                    seen[u] = True
                    stack.append(u)
        return seen


_is_float = _costs.is_float


# -- coarsening ---------------------------------------------------------------------------------


@dataclass
class _Groups:
    """The coarsened program: groups in order, their costs, and the tensors between them."""

    members: list[list[int]]        # op indices of each group, in order
    cost: np.ndarray                # per group
    bad_end: np.ndarray             # a stage may not end with this group (no float leaves it)
    group_of: list[int]             # op -> its group (-1: not placed)
    t_op: np.ndarray                # per crossing tensor: producing op
    t_index: np.ndarray             # its output index
    t_group: np.ndarray             # its producing group
    t_bytes: np.ndarray
    t_float: np.ndarray
    t_cons_ptr: np.ndarray          # CSR over the groups reading it
    t_cons: np.ndarray
    var_items: list[list[tuple[int, int]]]       # per group: (variable item, bytes)
    residual_items: list[list[tuple[int, int]]]  # per group: (tensor item, bytes)
    # per group: (argument of fn, bytes) it reads; whether a stage holding it may not run
    # its forward twice (it assigns a variable or draws random numbers: no remat)
    arg_items: list[list[tuple[int, int]]] = field(default_factory=list)
    no_remat: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))


def _coarsen(program: Program, ix: _Indexed, op_seconds: dict[str, float],
             batch: int, with_memory: bool) -> _Groups:
    n = len(ix.names)
    names, ops = ix.names, ix.ops
    data_pred, ctrl_pred = ix.data_pred, ix.ctrl_pred
    inputs = {ix.index[p] for p in program.input_placeholders if p in ix.index}
    var_ph = {ix.index[p] for p in program.variable_placeholders if p in ix.index}
    written = ix.written(var_ph)

    # Not placed by the plan: inputs, and the constants and reads split copies to its users.
    excluded = [False] * n
    for v in inputs:
        excluded[v] = True
    read_of: dict[int, int] = {}  # copied variable read -> its variable placeholder
    for v in range(n):
        op = ops[v]
        if op == "Const" and not data_pred[v]:
            excluded[v] = True
        elif op == "ReadVariableOp" and len(data_pred[v]) == 1:
            ph = data_pred[v][0]
            if ph in var_ph and ph not in written:
                excluded[v] = True
                read_of[v] = ph

    out_ops = [ix.index[ir.parse_tensor_name(o)[0]] for o in program.output_names]
    roots = out_ops + [ix.index[c] for c in program.control_outputs if c in ix.index]
    live = ix.reach_back(roots, data_only=False)
    main = ix.reach_back(out_ops, data_only=True)
    unit = [lv and not ex for lv, ex in zip(live, excluded)]

    order = ix.topological()
    pos = [0] * n
    for i, v in enumerate(order):
        pos[v] = i
    # Keys (anchor, sub-position): an op's group is the main op at its anchor position.
    key: list[tuple[int, int] | None] = [None] * n
    float_out = ix.float_out
    for v in reversed(order):  # main ops; shape arithmetic goes with its first user
        if not unit[v] or not main[v]:
            continue
        if not float_out[v]:
            readers = [w for w in ix.successors(v) if unit[w]]
            if readers and all(main[w] for w in readers):
                best = min(key[w] for w in readers)
                key[v] = (best[0], best[1] - 1)
                continue
        key[v] = (pos[v], 0)
    floating = []
    for v in order:  # side-effect-only ops: right after the op they hang off ...
        if not unit[v] or main[v]:
            continue
        keyed = [key[u] for u in data_pred[v] + ctrl_pred[v] if unit[u] and key[u]]
        # a copied read or constant counts where split places it: with its first user
        keyed += [k for u in data_pred[v] + ctrl_pred[v] if excluded[u] and u not in inputs
                  for k in [min((key[w] for _, w in ix.data_out[u] if key[w]), default=None)]
                  if k is not None]
        if keyed:
            best = max(keyed)
            key[v] = (best[0], best[1] + 1)
        else:
            floating.append(v)
    anchored = [k[0] for k in key if k is not None]
    if not anchored:
        raise GradSplitError(
            "fn computes nothing from its arguments and variables that could be cut into "
            "stages; auto_split needs a program with some work in it."
        )
    last = max(anchored)
    for v in reversed(floating):  # ... or, with nothing placed before them, with a user
        keyed = [key[w] for w in ix.successors(v) if unit[w] and key[w]]
        key[v] = (min(keyed)[0], min(keyed)[1] - 1) if keyed else (last, 1 << 40)

    placed = [v for v in range(n) if unit[v]]
    placed.sort(key=lambda v: (key[v], pos[v]))
    members: list[list[int]] = []
    group_of = [-1] * n
    previous = None
    for v in placed:
        anchor = key[v][0]
        if anchor != previous:
            members.append([])
            previous = anchor
        members[-1].append(v)
        group_of[v] = len(members) - 1
    m = len(members)
    seconds = np.array([op_seconds.get(names[v], 0.0) for v in placed])
    starts = np.cumsum([0] + [len(mem) for mem in members[:-1]])
    cost = np.add.reduceat(seconds, starts) if len(seconds) else np.zeros(0)

    # Tensors between groups, each once, with the groups that read it.
    t_op, t_index, t_group, t_bytes, t_float, cons = [], [], [], [], [], []
    data_out, outputs = ix.data_out, ix.outputs
    tensor_bytes = _costs.tensor_bytes
    for gi, mem in enumerate(members):
        for v in mem:
            reads = data_out[v]
            if not reads:
                continue
            if len(reads) == 1:  # the common case: one reader
                out_index, w = reads[0]
                gw = group_of[w]
                if gw < 0 or gw == gi:
                    continue
                readers = {out_index: [gw]}
            else:
                found: dict[int, set[int]] = {}
                for out_index, w in reads:
                    gw = group_of[w]
                    if gw >= 0 and gw != gi:
                        found.setdefault(out_index, set()).add(gw)
                readers = {i: sorted(groups) for i, groups in found.items()}
            outs = outputs[v]
            for out_index, groups in readers.items():
                dtype, shape = outs[out_index] if out_index < len(outs) else (None, None)
                t_op.append(v)
                t_index.append(out_index)
                t_group.append(gi)
                t_bytes.append(tensor_bytes(dtype, shape, batch))
                t_float.append(_is_float(dtype))
                cons.append(groups)
    t_group_arr = np.array(t_group, np.int64)
    t_float_arr = np.array(t_float, bool)
    # A stage must hand a float tensor on (split can only name floats as cuts): a group
    # with no float tensor read later cannot end one.
    bad_end = np.ones(m, bool)
    bad_end[t_group_arr[t_float_arr]] = False
    offered = [i for i, name in enumerate(names)
               if program.graph.nodes[name].get("cut_candidate")]
    if offered:  # a pass offered places to cut (ir.edit.offer_cut): only after those
        allowed = np.zeros(m, bool)
        allowed[[group_of[i] for i in offered if group_of[i] >= 0]] = True
        bad_end |= ~allowed
    bad_end[m - 1] = False
    ptr = np.zeros(len(cons) + 1, np.int64)
    ptr[1:] = np.cumsum([len(c) for c in cons])
    flat = np.fromiter((g for c in cons for g in c), np.int64, count=int(ptr[-1]))

    var_items: list[list[tuple[int, int]]] = [[] for _ in range(m)]
    residual_items: list[list[tuple[int, int]]] = [[] for _ in range(m)]
    arg_items: list[list[tuple[int, int]]] = [[] for _ in range(m)]
    no_remat = np.zeros(m, bool)
    if with_memory:
        _memory_items(program, ix, members, excluded, inputs, read_of, var_ph, batch,
                      var_items, residual_items)
        for gi, mem in enumerate(members):
            seen = set()
            for v in mem:
                if ops[v] in RANDOM_OPS or any(u in written for u in data_pred[v]):
                    no_remat[gi] = True
                for u in data_pred[v]:
                    if u in inputs and u not in seen:
                        seen.add(u)
                        outs = ix.outputs[u]
                        arg_items[gi].append(
                            (u, tensor_bytes(*outs[0], batch) if outs else 0))
    return _Groups(
        members=members, cost=cost, bad_end=bad_end, group_of=group_of,
        t_op=np.array(t_op, np.int64), t_index=np.array(t_index, np.int64),
        t_group=t_group_arr, t_bytes=np.array(t_bytes, np.float64), t_float=t_float_arr,
        t_cons_ptr=ptr, t_cons=flat, var_items=var_items, residual_items=residual_items,
        arg_items=arg_items, no_remat=no_remat,
    )


def _memory_items(program, ix, members, excluded, inputs, read_of, var_ph, batch,
                  var_items, residual_items) -> None:
    """Per group: the variables it reads and the residual tensors its backward keeps."""
    g = program.graph
    names = ix.names
    tensor_ids: dict[str, int] = {}

    def var_bytes(ph: int, user: int) -> int:
        index = program.variable_placeholders[names[ph]]
        if index < len(program.variables):
            return _costs.variable_bytes(program.variables[index])
        outs = ix.outputs[user]  # a synthetic program: the read's output says
        return _costs.tensor_bytes(*outs[0], 1) if user != ph and outs else 0

    for gi, mem in enumerate(members):
        seen_vars, seen_res = set(), set()
        for v in mem:
            for u in ix.data_pred[v]:
                ph = read_of.get(u, u if u in var_ph else None)
                if ph is not None and ph not in seen_vars:
                    seen_vars.add(ph)
                    var_items[gi].append((ph, var_bytes(ph, u)))
            for name in _costs.residual_tensors(g, names[v]):
                op_name, idx = ir.parse_tensor_name(name)
                producer = ix.index[op_name]
                if excluded[producer] and producer not in inputs:
                    continue  # a constant or a variable read: not the stage's memory
                tid = tensor_ids.setdefault(name, len(tensor_ids))
                if tid not in seen_res:
                    seen_res.add(tid)
                    outs = ix.outputs[producer]
                    dtype, shape = outs[idx] if idx < len(outs) else (None, None)
                    residual_items[gi].append(
                        (tid, _costs.tensor_bytes(dtype, shape, batch)))


# -- prefix sums over an order of the groups ----------------------------------------------------


def _spans(gr: _Groups, gpos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per tensor: the position of its producing group and of its last reader."""
    if len(gr.t_group) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return gpos[gr.t_group], np.maximum.reduceat(gpos[gr.t_cons], gr.t_cons_ptr[:-1])


def _prefix(gr: _Groups, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``C[b]``: cost of the groups before boundary ``b``; ``X[b]``: bytes crossing it."""
    m = len(order)
    gpos = np.empty(m, np.int64)
    gpos[order] = np.arange(m)
    c = np.zeros(m + 1)
    np.cumsum(gr.cost[order], out=c[1:])
    if len(gr.t_group) == 0:
        return c, np.zeros(m + 1)
    first, last = _spans(gr, gpos)
    diff = np.bincount(first + 1, weights=gr.t_bytes, minlength=m + 2)
    diff -= np.bincount(last + 1, weights=gr.t_bytes, minlength=m + 2)
    return c, np.cumsum(diff)[: m + 1]


def _candidates(c: np.ndarray, x: np.ndarray, bad_end: np.ndarray) -> np.ndarray:
    """Boundaries worth cutting at: not after a group that can't end a stage, and among a
    run of boundaries with the same cost before them (groups that cost nothing) only the one
    with the fewest bytes. Always 0 and ``m``, strictly increasing in cost."""
    m = len(c) - 1
    inner = np.arange(1, m)
    inner = inner[~bad_end[inner - 1]]
    if len(inner) == 0:
        return np.array([0, m])
    # one boundary per distinct cost, the fewest bytes (the earliest on ties)
    pick = np.lexsort((inner, x[inner], c[inner]))
    sorted_inner = inner[pick]
    keep = np.r_[True, c[sorted_inner[1:]] != c[sorted_inner[:-1]]]
    chosen = np.sort(sorted_inner[keep])
    chosen = chosen[(c[chosen] > c[0]) & (c[chosen] < c[m])]
    return np.r_[0, chosen, m]


# -- memory -------------------------------------------------------------------------------------


def _memory_reach(gr: _Groups, order: np.ndarray, cand: np.ndarray, limit: float,
                  in_flight: int) -> np.ndarray:
    """For each candidate boundary ``j``: the furthest candidate ``i`` such that the stage
    ``[j, i)`` fits ``limit`` (variables + ``in_flight`` x residuals); two pointers."""
    m = len(order)
    var_count: dict[int, int] = {}
    res_count: dict[int, int] = {}
    state = [0.0, 0.0]

    def add(g: int, sign: int) -> None:
        for items, counts, slot in ((gr.var_items[g], var_count, 0),
                                    (gr.residual_items[g], res_count, 1)):
            for item, nbytes in items:
                before = counts.get(item, 0)
                counts[item] = before + sign
                if before == 0 and sign > 0:
                    state[slot] += nbytes
                elif before == 1 and sign < 0:
                    state[slot] -= nbytes

    def used() -> float:
        return state[0] + in_flight * state[1]

    reach_group = np.zeros(m + 1, np.int64)  # boundary -> furthest boundary
    end = 0
    for start in range(m + 1):
        if end < start:
            end = start
        while end < m:
            add(int(order[end]), 1)
            if used() > limit:
                add(int(order[end]), -1)
                break
            end += 1
        reach_group[start] = end
        if start < m and end > start:
            add(int(order[start]), -1)
    # furthest candidate at or below the reach of each candidate start
    return np.searchsorted(cand, reach_group[cand], side="right") - 1


def _stage_memory(gr: _Groups, order: np.ndarray, bounds: Sequence[int],
                  in_flight: Sequence[int]) -> list[float]:
    found = []
    for k in range(len(bounds) - 1):
        variables: dict[int, int] = {}
        residuals: dict[int, int] = {}
        for g in order[bounds[k]:bounds[k + 1]]:
            variables.update(gr.var_items[g])
            residuals.update(gr.residual_items[g])
        found.append(sum(variables.values()) + in_flight[k] * sum(residuals.values()))
    return found


# -- remat ---------------------------------------------------------------------------------------
#
# A stage that would not fit ``memory_limit`` with its residuals may be rematerialised: its
# forward then keeps only its inputs (the tensors it reads from earlier stages, and the
# arguments of fn) per micro-batch in flight, and its backward runs the forward again first,
# so one micro-batch's residuals are alive while that backward runs. Its need is
# ``variables + in_flight x inputs + residuals``, against ``variables + in_flight x
# residuals`` without; the extra forward is added to the stage's time. A stage that assigns
# a variable or draws random numbers cannot run its forward twice and is never
# rematerialised. The inputs of a stage are not monotone in where it starts (starting just
# after a wide tensor makes it an input), so the search in this mode takes, for each start
# ``j``, the furthest end ``ends[j]`` (exact: the need grows with the end) and runs the
# dynamic program over ``j < i <= ends[j]`` (``_interval_min``) rather than over a window of
# starts.


class _Window:
    """A stage ``[start, end)`` of an order of the groups, moved one group at a time: its
    variables, one micro-batch's residuals, its inputs, and whether it may be
    rematerialised."""

    def __init__(self, gr: _Groups, order: np.ndarray, reads: list[list[int]],
                 made: list[list[int]], gpos: np.ndarray, start: int = 0):
        self.gr, self.order, self.reads, self.made = gr, order, reads, made
        self.producer_pos = gpos[gr.t_group] if len(gr.t_group) else np.zeros(0, np.int64)
        self.counts: list[dict[int, int]] = [{}, {}, {}]  # variables, residuals, arguments
        self.sums = [0.0, 0.0, 0.0]
        self.readers = [0] * len(gr.t_group)
        self.inputs = 0.0  # tensors made before the stage and read in it
        self.blocked = 0
        self.start = self.end = start

    def _items(self, g: int, sign: int) -> None:
        gr = self.gr
        for slot, items in enumerate((gr.var_items[g], gr.residual_items[g], gr.arg_items[g])):
            counts = self.counts[slot]
            for item, nbytes in items:
                before = counts.get(item, 0)
                counts[item] = before + sign
                if before == 0 and sign > 0:
                    self.sums[slot] += nbytes
                elif before == 1 and sign < 0:
                    self.sums[slot] -= nbytes
        self.blocked += sign * int(gr.no_remat[g])

    def _read(self, g: int, sign: int) -> None:
        readers, pos, nbytes = self.readers, self.producer_pos, self.gr.t_bytes
        for t in self.reads[g]:
            readers[t] += sign
            if readers[t] == (1 if sign > 0 else 0) and pos[t] < self.start:
                self.inputs += sign * nbytes[t]

    def push(self) -> None:
        g = int(self.order[self.end])
        self.end += 1
        self._items(g, 1)
        self._read(g, 1)

    def pop_end(self) -> None:
        self.end -= 1
        g = int(self.order[self.end])
        self._items(g, -1)
        self._read(g, -1)

    def pop_start(self) -> None:
        g = int(self.order[self.start])
        self._items(g, -1)
        self._read(g, -1)
        self.start += 1
        for t in self.made[g]:  # made here, read later in the stage: now an input
            if self.readers[t] > 0:
                self.inputs += self.gr.t_bytes[t]

    def plain(self, in_flight: int) -> float:
        return self.sums[0] + in_flight * self.sums[1]

    def remat(self, in_flight: int) -> float:
        if self.blocked:
            return _INF
        return self.sums[0] + in_flight * (self.inputs + self.sums[2]) + self.sums[1]

    def input_bytes(self) -> float:
        return self.inputs + self.sums[2]


class _Remat:
    """The planner's view of remat under ``limit`` (see above)."""

    def __init__(self, gr: _Groups, ix: _Indexed, forward_seconds: dict[str, float],
                 limit: float, in_flight: Sequence[int]):
        self.gr, self.limit, self.in_flight = gr, limit, list(in_flight)
        m = len(gr.members)
        names = ix.names
        self.forward = np.array([sum(forward_seconds.get(names[v], 0.0) for v in mem)
                                 for mem in gr.members]) if m else np.zeros(0)
        self.reads: list[list[int]] = [[] for _ in range(m)]
        self.made: list[list[int]] = [[] for _ in range(m)]
        ptr, cons = gr.t_cons_ptr, gr.t_cons
        for t, producer in enumerate(gr.t_group.tolist()):
            self.made[producer].append(t)
            for reader in cons[ptr[t]:ptr[t + 1]].tolist():
                self.reads[reader].append(t)

    def window(self, order: np.ndarray, start: int = 0) -> _Window:
        m = len(order)
        gpos = np.empty(m, np.int64)
        gpos[order] = np.arange(m)
        return _Window(self.gr, order, self.reads, self.made, gpos, start)

    def needs(self, order: np.ndarray, bounds: Sequence[int]) -> list[dict[str, float]]:
        """Per stage: its need without remat (``plain``) and with (``remat``, inf when it
        cannot be), its ``inputs``, ``variables`` and one micro-batch's ``residuals``."""
        found = []
        for s in range(len(bounds) - 1):
            w = self.window(order, bounds[s])
            while w.end < bounds[s + 1]:
                w.push()
            f = self.in_flight[s]
            found.append({"plain": w.plain(f), "remat": w.remat(f), "inputs": w.input_bytes(),
                          "variables": w.sums[0], "residuals": w.sums[1], "in_flight": f})
        return found

    def flags(self, order: np.ndarray, bounds: Sequence[int]) -> list[bool]:
        """Remat where the stage's residuals do not fit and its inputs do."""
        return [n["plain"] > self.limit and n["remat"] <= self.limit
                for n in self.needs(order, bounds)]

    def extra(self, order: np.ndarray, bounds: Sequence[int]) -> np.ndarray:
        """Per stage: the seconds of the forward it runs again (0 without remat)."""
        fwd = np.r_[0.0, np.cumsum(self.forward[order])]
        again = np.diff(fwd[list(bounds)])
        return np.where(self.flags(order, bounds), again, 0.0)

    def reach(self, order: np.ndarray, cand: np.ndarray, in_flight: int,
              limit: float) -> np.ndarray:
        """For each candidate boundary ``j``: the furthest candidate ``i`` such that the stage
        ``[j, i)`` fits ``limit`` rematerialised (``order`` and ``cand`` are those of the
        search: remembered per limit and in-flight count)."""
        cache = self.__dict__.setdefault("_reach_cache", {})
        if (limit, in_flight) not in cache:
            cache[limit, in_flight] = self._reach(order, cand, in_flight, limit)
        return cache[limit, in_flight]

    def _reach(self, order: np.ndarray, cand: np.ndarray, in_flight: int,
               limit: float) -> np.ndarray:
        m = len(order)
        w = self.window(order)
        reach_group = np.zeros(m + 1, np.int64)
        for start in range(m + 1):
            while w.end < m:
                w.push()
                if w.remat(in_flight) > limit:
                    w.pop_end()
                    break
            reach_group[start] = w.end
            if start == m:
                break
            if w.end > start:
                w.pop_start()
            else:
                w.start = w.end = start + 1
            while w.end > w.start and w.remat(in_flight) > limit:
                w.pop_end()  # a later start can make more inputs: the need may grow
        return np.searchsorted(cand, reach_group[cand], side="right") - 1


def _interval_min(values: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each ``i``: the smallest ``values[j]`` over the ``j`` with ``j < i <= ends[j]``
    (ties: the smallest ``j``), and that ``j`` (-1 where there is none). Each ``j`` lowers
    the interval ``(j, ends[j]]`` of a sparse table (two blocks of a power of two), and the
    table is pushed down level by level: O(n log n) in numpy."""
    n = len(values)
    j = np.flatnonzero((ends > np.arange(n)) & np.isfinite(values))
    best, arg = np.full(n, _INF), np.full(n, -1, np.int64)
    if not len(j):
        return best, arg
    a, b = j + 1, ends[j]
    level = np.frexp((b - a + 1).astype(np.float64))[1] - 1
    top = int(level.max())
    table_v = np.full((top + 1, n), _INF)
    table_a = np.full((top + 1, n), -1, np.int64)
    starts = np.r_[a, b - (1 << level) + 1]
    levels, js = np.r_[level, level], np.r_[j, j]
    vals = values[js]
    by = np.lexsort((js, vals, starts, levels))  # per cell the smallest value, then j
    ls, ss = levels[by], starts[by]
    first = by[np.r_[True, (ls[1:] != ls[:-1]) | (ss[1:] != ss[:-1])]]
    table_v[levels[first], starts[first]] = vals[first]
    table_a[levels[first], starts[first]] = js[first]
    for lvl in range(top, 0, -1):
        half = 1 << (lvl - 1)
        parent_v, parent_a = table_v[lvl], table_a[lvl]
        for shift in (0, half):
            child_v, child_a = table_v[lvl - 1, shift:], table_a[lvl - 1, shift:]
            pv, pa = parent_v[:n - shift], parent_a[:n - shift]
            better = (pv < child_v) | ((pv == child_v) & (pa >= 0) & (
                (child_a < 0) | (pa < child_a)))
            child_v[better] = pv[better]
            child_a[better] = pa[better]
    return table_v[0], table_a[0]


def _stage_ends(cp: np.ndarray, cpr: np.ndarray, cap: float, plain: np.ndarray | None,
                remat: np.ndarray) -> np.ndarray:
    """For each candidate start: the furthest candidate end of a stage under ``cap`` that
    fits as it is (cost ``cp``, memory reach ``plain``) or rematerialised (cost ``cpr``,
    reach ``remat``)."""
    tol = 1e-12 * cpr[-1]
    ends_plain = np.searchsorted(cp, cp + cap + tol, side="right") - 1
    if plain is not None:
        ends_plain = np.minimum(ends_plain, plain)
    ends_remat = np.minimum(np.searchsorted(cpr, cpr + cap + tol, side="right") - 1, remat)
    return np.maximum(ends_plain, ends_remat)


def _fewest_bytes_ends(cp: np.ndarray, xp: np.ndarray | None, k: int,
                       ends: Sequence[np.ndarray]) -> list[int] | None:
    """``_fewest_bytes`` over stages given by their furthest end per start (``ends[s]``);
    ``xp=None``: any feasible cuts."""
    mc = len(cp)
    idx = np.arange(mc)
    total = float(cp[-1])
    g = np.where((idx > 0) & (idx <= ends[0][0]), 0.0, _INF)
    choices = []
    for s in range(1, k):
        if xp is None:
            values = g.copy()
        else:
            share = np.abs(cp - s * total / k) / max(total, 1e-300) * (0.5 / k)
            values = g + xp + share
        values[0] = _INF
        g, arg = _interval_min(values, ends[s])
        choices.append(arg)
    return _backtrack(g, choices, mc, k)


# -- the search ---------------------------------------------------------------------------------


def _greedy_stages(cp: np.ndarray, cap: float, reach: Sequence[np.ndarray] | None,
                   k: int) -> bool:
    """Whether ``k`` stages of cost <= ``cap`` (and within ``reach``) cover every group."""
    last = len(cp) - 1
    j = 0
    tol = 1e-12 * cp[-1]
    for s in range(k):
        i = int(np.searchsorted(cp, cp[j] + cap + tol, side="right")) - 1
        if reach is not None:
            i = min(i, int(reach[s][j]))
        if i <= j:
            return False
        if i >= last:
            return last >= k  # enough boundaries to give every stage one group
        j = i
    return False


def _bottleneck(cp: np.ndarray, k: int, reach: Sequence[np.ndarray] | None) -> float:
    """The smallest cap for which ``k`` stages are feasible (binary search)."""
    total = float(cp[-1])
    steps = np.diff(cp)
    lo = max(total / k, float(steps.max()) if len(steps) else 0.0)
    hi = total
    if reach is not None and not _greedy_stages(cp, hi, reach, k):
        return _INF
    if _greedy_stages(cp, lo, reach, k):
        return lo
    for _ in range(100):
        if hi - lo <= 1e-9 * total:
            break
        mid = 0.5 * (lo + hi)
        if _greedy_stages(cp, mid, reach, k):
            hi = mid
        else:
            lo = mid
    return hi


def _sparse_argmin(values: np.ndarray) -> np.ndarray:
    """Level ``l`` row ``j``: index of the minimum of ``values[j : j + 2**l]``."""
    n = len(values)
    levels = [np.arange(n)]
    width = 1
    while 2 * width <= n:
        prev = levels[-1]
        left = prev[: n - 2 * width + 1]
        right = prev[width: width + len(left)]
        levels.append(np.where(values[right] < values[left], right, left))
        width *= 2
    table = np.empty((len(levels), n), np.int64)
    for lvl, row in enumerate(levels):
        table[lvl, : len(row)] = row
        table[lvl, len(row):] = row[-1] if len(row) else 0
    return table


def _range_argmin(values: np.ndarray, table: np.ndarray, lo: np.ndarray,
                  hi: np.ndarray) -> np.ndarray:
    """Index of the minimum of ``values[lo[i] .. hi[i]]`` (inclusive, ``lo <= hi``)."""
    length = hi - lo + 1
    level = np.frexp(length.astype(np.float64))[1] - 1
    left = table[level, lo]
    right = table[level, hi - (1 << level) + 1]
    return np.where(values[right] < values[left], right, left)


def _fewest_bytes(cp: np.ndarray, xp: np.ndarray, k: int, cap: float,
                  reach_lo: Sequence[np.ndarray] | None) -> list[int] | None:
    """Candidate indices of the ``k - 1`` cuts with the fewest crossing bytes such that every
    stage costs at most ``cap``; ``None`` when there are none. Ties go to the cuts nearest an
    equal share of the cost."""
    mc = len(cp)
    total = float(cp[-1])
    tol = 1e-12 * total
    lo_cost = np.searchsorted(cp, cp - cap - tol, side="left")
    idx = np.arange(mc)
    los = []
    for s in range(k):
        lo = lo_cost if reach_lo is None else np.maximum(lo_cost, reach_lo[s])
        los.append(lo)
    g = np.where((los[0] == 0) & (idx > 0), 0.0, _INF)
    g[0] = _INF
    choices = []
    for s in range(1, k):
        # a tie-breaker below one byte: distance of cut s - 1 from its equal share
        share = np.abs(cp - s * total / k) / max(total, 1e-300) * (0.5 / k)
        values = g + xp + share
        values[0] = _INF
        table = _sparse_argmin(values)
        lo = los[s]
        valid = (lo <= idx - 1) & (idx > 0)
        lo_c = np.where(valid, lo, 0)
        hi_c = np.where(valid, idx - 1, 0)
        arg = _range_argmin(values, table, lo_c, hi_c)
        new = np.where(valid, values[arg], _INF)
        choices.append(arg)
        g = new
    return _backtrack(g, choices, mc, k)


# -- min-cut polish ------------------------------------------------------------------------------


def _group_preds(gr: _Groups, ix: _Indexed, gid: int) -> set[int]:
    """The groups group ``gid`` depends on (data or control)."""
    found = set()
    for v in gr.members[gid]:
        for u in ix.data_pred[v] + ix.ctrl_pred[v]:
            q = gr.group_of[u]
            if q >= 0 and q != gid:
                found.add(q)
    return found


def _polish_cut(gr: _Groups, ix: _Indexed, order: np.ndarray, bounds: list[int], k: int,
                cap: float, memory_ok, max_window: int) -> tuple[np.ndarray, int] | None:
    """Move cut ``k`` (between stages ``k`` and ``k + 1``) to the cheapest predecessor-closed
    set inside the window where both stages stay under ``cap``; ``None`` when it can't do
    better than the current boundary."""
    p = bounds[k + 1]
    before, after = bounds[k], bounds[k + 2]
    cost = gr.cost
    c_prev = float(cost[order[before:p]].sum())
    c_next = float(cost[order[p:after]].sum())
    # right end b: stage k may grow to [before, b); left end a: stage k + 1 to [a, after)
    b, grown = p, c_prev
    while b < after - 1 and b - p < max_window and grown + cost[order[b]] <= cap:
        grown += cost[order[b]]
        b += 1
    a, grown = p, c_next
    while a > before + 1 and p - a < max_window and grown + cost[order[a - 1]] <= cap:
        grown += cost[order[a - 1]]
        a -= 1
    while b > p and not memory_ok(k, before, b, order):
        b -= 1
    while a < p and not memory_ok(k + 1, a, after, order):
        a += 1
    if b - a < 2:
        return None
    window = order[a:b]
    inside = {int(gid): i for i, gid in enumerate(window.tolist())}
    m = len(order)
    gpos = np.empty(m, np.int64)
    gpos[order] = np.arange(m)
    # positive cost on both sides keeps both stages non-empty
    if cost[order[before:a]].sum() <= 0 or cost[order[b:after]].sum() <= 0:
        return None

    net = nx.DiGraph()
    net.add_node("s")
    net.add_node("t")
    for gid, i in inside.items():
        for q in _group_preds(gr, ix, gid):
            if q in inside:
                net.add_edge(("g", i), ("g", inside[q]))  # closure: no capacity = infinite
    first_pos, last_pos = _spans(gr, gpos)
    near = np.flatnonzero((first_pos < b) & (last_pos >= a)
                          & ~((first_pos < a) & (last_pos >= b)))  # those spanning it: fixed
    base = 0.0
    for t in near.tolist():
        consumers = gr.t_cons[gr.t_cons_ptr[t]:gr.t_cons_ptr[t + 1]].tolist()
        readers_in = [inside[c] for c in consumers if c in inside]
        beyond = bool(last_pos[t] >= b)
        node = ("t", t)
        src = "s" if first_pos[t] < a else ("g", inside[int(gr.t_group[t])])
        net.add_edge(src, node, capacity=float(gr.t_bytes[t]))
        for i in readers_in:
            net.add_edge(node, ("g", i))
        if beyond:
            net.add_edge(node, "t")
        if first_pos[t] < p <= last_pos[t]:
            base += float(gr.t_bytes[t])
    if not len(near):
        return None
    value, (source_side, _) = nx.minimum_cut(net, "s", "t")
    if value >= base - 0.5:
        return None
    chosen = {x[1] for x in source_side if isinstance(x, tuple) and x[0] == "g"}
    first = [gid for i, gid in enumerate(window) if i in chosen]
    rest = [gid for i, gid in enumerate(window) if i not in chosen]
    new_order = np.concatenate([order[:a], np.array(first + rest, np.int64), order[b:]])
    return new_order, a + len(first)


# -- the plan ------------------------------------------------------------------------------------


def plan_partition(program: Program, num_stages: int, *, batch_size: int | None = None,
                   memory_limit: float | None = None, microbatches: int | None = None,
                   eps: float = 0.03, polish: bool = True,
                   model: _costs.CostModel = _costs.DEFAULT_MODEL,
                   op_seconds: dict[str, float] | None = None,
                   polish_window: int = 100, max_stage_cost: float | None = None) -> Plan:
    """Choose ``num_stages - 1`` cuts of ``program`` (after ``inline_calls`` and
    ``refresh_shapes``); see the module docstring for the method. ``op_seconds`` (op name
    -> forward + backward seconds) replaces the cost model when given; ``max_stage_cost``
    (seconds) replaces the cap ``(1 + eps) B*`` when it is larger."""
    _check_arguments(num_stages, batch_size, memory_limit, microbatches, eps)
    with collector_paused():
        return _plan_partition(program, num_stages, batch_size, memory_limit, microbatches,
                               eps, polish, model, op_seconds, polish_window, max_stage_cost)


def _plan_partition(program, num_stages, batch_size, memory_limit, microbatches, eps, polish,
                    model, op_seconds, polish_window, max_stage_cost) -> Plan:
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    g = program.graph
    op_seconds_given = op_seconds is not None
    if op_seconds is None:
        outputs = {ir.parse_tensor_name(o)[0] for o in program.output_names}
        op_seconds = _costs.op_costs(g, outputs, batch_size, model)
    timings["cost model"] = time.perf_counter() - clock

    clock = time.perf_counter()
    ix = _Indexed(program)
    batch = batch_size or 1
    gr = _coarsen(program, ix, op_seconds, batch, with_memory=memory_limit is not None)
    order = np.arange(len(gr.members))
    timings["coarsen"] = time.perf_counter() - clock

    clock = time.perf_counter()
    k = num_stages
    c, x = _prefix(gr, order)
    cand = _candidates(c, x, gr.bad_end)
    if len(cand) - 1 < k:
        raise GradSplitError(
            f"num_stages={k}, but this program has only {len(cand) - 1} pieces of work "
            f"that stages can hold apart; ask for at most {max(len(cand) - 1, 1)} stages."
        )
    in_flight = [min(k - s, microbatches) if microbatches else 1 for s in range(k)]
    cp = c[cand]
    xp = x[cand].astype(np.float64)
    reach = reach_lo = None
    if memory_limit is not None:
        reach = [_memory_reach(gr, order, cand, memory_limit, f) for f in in_flight]
        reach_lo = [np.searchsorted(r, np.arange(len(cand)), side="left") for r in reach]
    best_cap = _bottleneck(cp, k, reach)
    remat = None
    if not math.isfinite(best_cap):  # no plan fits as it is: rematerialise where needed
        if op_seconds_given:  # measured: the backward taken as twice the forward
            forward = {n: t / 3.0 for n, t in op_seconds.items()}
        else:
            forward = _costs.op_costs(g, (), batch_size, model, forward=True)
        remat = _Remat(gr, ix, forward, memory_limit, in_flight)
        cpr = cp + np.r_[0.0, np.cumsum(remat.forward[order])][cand]
        remat_reach = [remat.reach(order, cand, f, memory_limit) for f in in_flight]
        best_cap = _remat_bottleneck(cp, cpr, k, reach, remat_reach)
        if not math.isfinite(best_cap):
            raise GradSplitError(_memory_refusal(gr, ix, order, cand, k, in_flight,
                                                 memory_limit, microbatches, remat, reach))
    timings["bottleneck"] = time.perf_counter() - clock

    clock = time.perf_counter()
    total = float(c[-1]) if remat is None else float(cpr[-1])
    if microbatches:
        caps = [best_cap * f for f in _PIPELINE_CAPS]
        caps = [min(cap, total) if math.isfinite(cap) else total for cap in caps]
        caps.append(best_cap * (1 + eps))
    else:
        caps = [max(best_cap * (1 + eps), max_stage_cost or 0.0)]
    best = None
    for cap in sorted(set(caps)):
        if remat is None:
            chosen = _fewest_bytes(cp, xp, k, cap, reach_lo)
        else:
            chosen = _fewest_bytes_ends(cp, xp, k, [
                _stage_ends(cp, cpr, cap, r, rr) for r, rr in zip(reach, remat_reach)])
        if chosen is None:
            continue
        bounds = [0] + [int(cand[i]) for i in chosen] + [len(order)]
        score = _score(gr, order, bounds, microbatches, model, remat)
        if best is None or score < best[0] - 1e-15:
            best = (score, cap, bounds)
    assert best is not None, "the cap found by the bottleneck search is feasible"
    _, cap, bounds = best
    timings["bytes DP"] = time.perf_counter() - clock

    clock = time.perf_counter()
    polished = []
    if polish and k > 1:
        memory_ok = _memory_check(gr, memory_limit, in_flight, remat)
        for cut in range(k - 1):
            moved = _polish_cut(gr, ix, order, bounds, cut, cap, memory_ok, polish_window)
            if moved is None:
                continue
            new_order, new_position = moved
            new_bounds = bounds[:cut + 1] + [new_position] + bounds[cut + 2:]
            if remat is not None and max(_stage_times(gr, new_order, new_bounds, remat)) > (
                    cap * (1 + 1e-12)):
                continue  # a stage moved into remat: its second forward breaks the cap
            if _score(gr, new_order, new_bounds, microbatches, model, remat) < _score(
                    gr, order, bounds, microbatches, model, remat):
                order, bounds = new_order, new_bounds
                polished.append(cut)
    timings["polish"] = time.perf_counter() - clock
    plan = _make_plan(program, ix, gr, order, bounds, k, best_cap, in_flight, model,
                      microbatches, memory_limit is not None, remat)
    plan.polished = polished
    plan.timings = timings
    return plan


def _check_arguments(num_stages, batch_size, memory_limit, microbatches, eps) -> None:
    if isinstance(num_stages, bool) or not isinstance(num_stages, (int, np.integer)) or (
            num_stages < 2):
        raise GradSplitError(
            f"num_stages must be an integer of at least 2 (one cut or more); got "
            f"{num_stages!r}. For one stage, call fn itself."
        )
    for name, value in (("batch_size", batch_size), ("microbatches", microbatches)):
        if value is not None and (isinstance(value, bool) or not isinstance(
                value, (int, np.integer)) or value < 1):
            raise GradSplitError(f"{name} must be a positive integer or None; got {value!r}.")
    if memory_limit is not None and not (isinstance(memory_limit, (int, float, np.number))
                                         and memory_limit > 0):
        raise GradSplitError(
            f"memory_limit must be a positive number of bytes per stage; got {memory_limit!r}."
        )
    if not (isinstance(eps, (int, float)) and 0 <= eps):
        raise GradSplitError(f"eps must be a non-negative number; got {eps!r}.")


def _stage_times(gr: _Groups, order: np.ndarray, bounds: Sequence[int],
                 remat: _Remat | None) -> np.ndarray:
    """Each stage's seconds, the forward a rematerialised stage runs again included."""
    c, _ = _prefix(gr, order)
    stage = np.diff(c[list(bounds)])
    return stage if remat is None else stage + remat.extra(order, bounds)


def _score(gr: _Groups, order: np.ndarray, bounds: Sequence[int], microbatches: int | None,
           model: _costs.CostModel, remat: _Remat | None = None) -> float:
    """What the plan minimises: the pipeline's time with ``microbatches``; otherwise the
    bytes crossing all cuts (the bottleneck is held by the cap)."""
    c, x = _prefix(gr, order)
    cut_bytes = [float(x[b]) for b in bounds[1:-1]]
    if not microbatches:
        return float(sum(cut_bytes))
    stage = _stage_times(gr, order, bounds, remat)
    link = np.array([0.0] + [2.0 * b / model.link_bytes_per_second for b in cut_bytes])
    t = stage + link
    return float(t.sum() + (microbatches - 1) * t.max())


def _memory_check(gr: _Groups, memory_limit: float | None, in_flight: Sequence[int],
                  remat: _Remat | None = None):
    if memory_limit is None:
        return lambda stage, start, end, order: True

    def ok(stage: int, start: int, end: int, order: np.ndarray) -> bool:
        if _stage_memory(gr, order, [start, end], [in_flight[stage]])[0] <= memory_limit:
            return True
        if remat is None:
            return False
        w = remat.window(order, start)
        while w.end < end:
            w.push()
        return w.remat(in_flight[stage]) <= memory_limit

    return ok


def _remat_bottleneck(cp: np.ndarray, cpr: np.ndarray, k: int,
                      reach: Sequence[np.ndarray], remat_reach: Sequence[np.ndarray]) -> float:
    """``_bottleneck`` when stages may be rematerialised: each probe is the dynamic program
    over the furthest end of each start (the greedy pass needs a reach that grows with the
    start, which a stage's inputs do not give)."""

    def feasible(cap: float) -> bool:
        ends = [_stage_ends(cp, cpr, cap, r, rr) for r, rr in zip(reach, remat_reach)]
        return _fewest_bytes_ends(cp, None, k, ends) is not None

    total = float(cpr[-1])
    steps = np.diff(cp)
    lo = max(float(cp[-1]) / k, float(steps.max()) if len(steps) else 0.0)
    hi = total
    if not feasible(_INF):
        return _INF
    if feasible(lo):
        return lo
    for _ in range(100):
        if hi - lo <= 1e-9 * total:
            break
        mid = 0.5 * (lo + hi)
        if feasible(mid):
            hi = mid
        else:
            lo = mid
    return hi


def _memory_refusal(gr: _Groups, ix: _Indexed, order: np.ndarray, cand: np.ndarray, k: int,
                    in_flight: Sequence[int], limit: float, microbatches: int | None,
                    remat: _Remat, reach: Sequence[np.ndarray]) -> str:
    """Why no ``k`` stages fit ``limit``, even rematerialised: the smallest limit that works,
    and at it the stage that needs the most (its inputs, its micro-batches in flight)."""
    plain_smallest = _smallest_memory(gr, order, cand, k, in_flight)

    def plan_at(bound: float) -> list[int] | None:
        plain = [_memory_reach(gr, order, cand, bound, f) for f in in_flight]
        rematerialised = [remat.reach(order, cand, f, bound) for f in in_flight]
        ends = [_stage_ends(cand.astype(np.float64), cand.astype(np.float64), _INF, r, rr)
                for r, rr in zip(plain, rematerialised)]
        return _fewest_bytes_ends(cand.astype(np.float64), None, k, ends)

    # The smallest limit with remat allowed: at most the plain one, and at least that over
    # the most micro-batches in flight (a stage's plain need is at most that many times its
    # need rematerialised). Bisected to 0.1%, unless remat helps nowhere near it.
    lo, hi = plain_smallest / max(in_flight), plain_smallest
    cuts = plan_at(hi)
    if plan_at(hi * (1 - 1e-3)) is None:
        lo = hi
    while hi - lo > max(1.0, 1e-3 * hi):
        mid = 0.5 * (lo + hi)
        found = plan_at(mid)
        if found is not None:
            hi, cuts = mid, found
        else:
            lo = mid
    bounds = [0] + [int(cand[i]) for i in cuts] + [len(order)]
    needs = remat.needs(order, bounds)
    s = max(range(k), key=lambda i: min(needs[i]["plain"], needs[i]["remat"]))
    need = needs[s]
    f = in_flight[s]
    names = ix.names
    first = names[gr.members[int(order[bounds[s]])][0]]
    last = names[gr.members[int(order[bounds[s + 1] - 1])][-1]]
    if not math.isfinite(need["remat"]):
        why = (" Remat is ruled out for it: it assigns a variable or draws random numbers, "
               "which running its forward again would repeat.")
    elif f == 1:
        why = (" With one micro-batch in flight remat cannot help: it keeps the inputs on top "
               "of one micro-batch's residuals.")
    else:
        why = ""
    fewer = (f", or use fewer micro-batches: microbatches={microbatches} keeps {f} in flight "
             f"at stage {s}" if f > 1 else "")
    return (
        f"memory_limit={format_bytes(limit, exact=True)} per stage cannot hold this program "
        f"in {k} stages, even with remat on the stages whose residuals do not fit (a stage "
        "needs its variables + residuals x micro-batches in flight; rematerialised, its "
        "variables + inputs x micro-batches in flight + one micro-batch's residuals while its "
        f"backward runs the forward again). Stage {s}, ops {first!r} to {last!r}, needs "
        f"{format_bytes(min(need['plain'], need['remat']))} at best: its inputs are "
        f"{format_bytes(need['inputs'])} per micro-batch with {f} in flight, its residuals "
        f"{format_bytes(need['residuals'])} per micro-batch, its variables "
        f"{format_bytes(need['variables'])}.{why} The smallest limit that works is "
        f"{format_bytes(hi, exact=True)}. Raise memory_limit or ask for more stages{fewer}."
    )


def _smallest_memory(gr: _Groups, order: np.ndarray, cand: np.ndarray, k: int,
                     in_flight: Sequence[int]) -> float:
    """The smallest per-stage memory limit under which ``k`` stages exist (cost ignored)."""
    whole = _stage_memory(gr, order, [0, len(order)], [max(in_flight)])[0]
    lo, hi = 0.0, max(whole, 1.0)
    cp = np.arange(len(cand), dtype=np.float64)  # cost plays no part: a cap of everything
    for _ in range(60):
        if hi - lo <= max(1.0, 1e-6 * hi):
            break
        mid = 0.5 * (lo + hi)
        reach = [_memory_reach(gr, order, cand, mid, f) for f in in_flight]
        if _greedy_stages(cp, _INF, reach, k):
            hi = mid
        else:
            lo = mid
    return hi


def _make_plan(program: Program, ix: _Indexed, gr: _Groups, order: np.ndarray,
               bounds: Sequence[int], k: int, lower_bound: float, in_flight: Sequence[int],
               model: _costs.CostModel, microbatches: int | None,
               with_memory: bool, remat: _Remat | None = None) -> Plan:
    c, x = _prefix(gr, order)
    m = len(order)
    gpos = np.empty(m, np.int64)
    gpos[order] = np.arange(m)
    stage_of_group = np.searchsorted(np.array(bounds[1:]), gpos, side="right")
    layout = (ix.names, [gr.members[gid] for gid in order.tolist()],
              stage_of_group[order].tolist())
    cuts: list[list[str]] = [[] for _ in range(k - 1)]
    if len(gr.t_group):
        first, last = _spans(gr, gpos)
        stage = stage_of_group[gr.t_group]
        ends = np.array(list(bounds[1:]) + [m + 1])
        crossing = gr.t_float & (stage < k - 1) & (last >= ends[np.minimum(stage, k - 1)])
        for t in np.flatnonzero(crossing)[np.argsort(first[crossing], kind="stable")]:
            cuts[int(stage[t])].append(f"{ix.names[gr.t_op[t]]}:{int(gr.t_index[t])}")
    for s, names in enumerate(cuts):
        if not names:  # the bad_end rule rules this out; a bug if it happens
            raise AssertionError(f"stage {s} of the plan hands no float tensor on")
    stage_costs = [float(v) for v in _stage_times(gr, order, bounds, remat)]
    cut_bytes = [int(x[b]) for b in bounds[1:-1]]
    plan = Plan(
        num_stages=k, cuts=cuts, positions=list(bounds[1:-1]), _layout=layout,
        stage_costs=stage_costs, cut_bytes=cut_bytes,
        lower_bound=float(lower_bound), total_cost=float(c[-1]),
        remat=[False] * k, remat_saved=[0] * k, remat_seconds=[0.0] * k,
    )
    if with_memory:
        plan.stage_memory = _stage_memory(gr, order, bounds, in_flight)
    if remat is not None:
        for s, need in enumerate(remat.needs(order, bounds)):
            if need["plain"] > remat.limit and need["remat"] <= remat.limit:
                plan.remat[s] = True
                plan.remat_saved[s] = int(need["plain"] - need["remat"])
                plan.stage_memory[s] = float(need["remat"])
                plan.remat_seconds[s] = stage_costs[s] - float(c[bounds[s + 1]] - c[bounds[s]])
    if microbatches:
        plan.pipeline_time = _score(gr, order, bounds, microbatches, model, remat)
    return plan


# -- baselines -----------------------------------------------------------------------------------


def baseline_plan(program: Program, num_stages: int, by: str, *,
                  batch_size: int | None = None,
                  model: _costs.CostModel = _costs.DEFAULT_MODEL) -> Plan:
    """The cuts the common recipes make, on the same order of the same groups:
    ``by="ops"`` cuts at equal op counts (DeepSpeed's ``uniform``, per op), ``by="params"``
    at equal parameter bytes (DeepSpeed's ``parameters``; a variable counts where it is
    first used). Each cut goes to the nearest boundary that can end a stage."""
    if by not in ("ops", "params"):
        raise GradSplitError(f"by must be 'ops' or 'params'; got {by!r}.")
    _check_arguments(num_stages, batch_size, None, None, 0.0)
    outputs = {ir.parse_tensor_name(o)[0] for o in program.output_names}
    op_seconds = _costs.op_costs(program.graph, outputs, batch_size, model)
    ix = _Indexed(program)
    gr = _coarsen(program, ix, op_seconds, batch_size or 1, with_memory=True)
    order = np.arange(len(gr.members))
    if by == "ops":
        weight = np.array([len(mem) for mem in gr.members], np.float64)
    else:
        seen: set[int] = set()
        weight = np.zeros(len(gr.members))
        for gid, items in enumerate(gr.var_items):
            for item, nbytes in items:
                if item not in seen:
                    seen.add(item)
                    weight[gid] += nbytes
    c, x = _prefix(gr, order)
    allowed = _candidates(np.cumsum(np.r_[0.0, np.ones(len(order))]), x, gr.bad_end)
    prefix = np.r_[0.0, np.cumsum(weight)]
    inner = allowed[1:-1]
    bounds = [0]
    at = -1
    for s in range(1, num_stages):
        target = prefix[-1] * s / num_stages
        # leave enough boundaries for the cuts still to come
        options = np.arange(at + 1, len(inner) - (num_stages - 1 - s))
        best = options[np.argmin(np.abs(prefix[inner[options]] - target))]
        at = int(best)
        bounds.append(int(inner[at]))
    bounds.append(len(order))
    plan = _make_plan(program, ix, gr, order, bounds, num_stages,
                      _bottleneck(c[_candidates(c, x, gr.bad_end)], num_stages, None),
                      [1] * num_stages, model, None, False)
    plan.method = f"equal {by}"
    return plan


# -- the entry point -----------------------------------------------------------------------------


def auto_split(fn: Any, input_signature: Sequence | None, num_stages: int, *,
               batch_size: int | None = None, memory_limit: float | None = None,
               microbatches: int | None = None, training: bool | None = None,
               eps: float = 0.03, polish: bool = True,
               cost_model: _costs.CostModel | None = None) -> Any:
    """Split ``fn`` into ``num_stages`` stages chosen for the user.

    Parameters
    ----------
    fn, input_signature, training
        As for ``gsc.split``: ``fn`` may be a ``gsc.Program`` (``input_signature`` then
        ``None``). When some of its ops carry the node attribute ``cut_candidate``
        (``gradsplit_compiler.ir.edit.offer_cut``), cuts go only right after those ops.
    num_stages : int
        How many stages (at least 2).
    batch_size : int, optional
        The batch a ``None`` dimension stands for in the cost model (per micro-batch when
        ``microbatches`` is given). Default 1.
    memory_limit : float, optional
        Bytes each stage may hold: its variables plus the residuals its backward keeps,
        times the micro-batches in flight (1F1B: ``min(num_stages - k, microbatches)``).
        When no plan fits, the stages whose residuals do not fit are rematerialised
        (``split.plan.remat``, which ``gsc.pipeline`` follows): their inputs times the
        micro-batches in flight plus one micro-batch's residuals must fit then.
    microbatches : int, optional
        Minimise the pipeline's time ``sum(t_k) + (M - 1) max(t_k)`` instead of the
        bottleneck alone.
    eps : float
        How far above the smallest possible bottleneck a stage may go to cut fewer bytes.
    polish : bool
        Improve each cut with a minimum cut near it (networkx flows).
    cost_model : CostModel, optional
        The machine constants (``costs.fit`` makes one from measurements).

    Returns
    -------
    Split
        As ``gsc.split`` returns, with ``split.plan`` (a ``Plan``): the intended stages,
        estimated costs and bytes, and any op ``split`` placed elsewhere.

    Raises
    ------
    GradSplitError
        For arguments that cannot work, naming what would.
    """
    _check_arguments(num_stages, batch_size, memory_limit, microbatches, eps)
    model = cost_model or _costs.DEFAULT_MODEL
    # One trace: the analysis phase, then the cutting phase, as split() runs them.
    with collector_paused():
        program = program_of(fn, input_signature, training)
        program = passes.run(program, "analysis")
        if any(nx.get_node_attributes(program.graph, "cut_candidate").values()):
            polish = False  # a minimum cut would move the cuts off the offered ops
        plan = plan_partition(program, num_stages, batch_size=batch_size,
                              memory_limit=memory_limit, microbatches=microbatches, eps=eps,
                              polish=polish, model=model)
        program.cut_specs = [list(c) for c in plan.cuts]
        program = passes.run(program, "cutting")
        result = Split(program, plan=plan)
    plan.compare(result)
    return result


def _backtrack(g, choices: list, mc: int, k: int) -> list[int] | None:
    """The cuts of the best partition of ``mc`` groups into ``k`` stages from a dynamic
    program's last row ``g`` and each stage's ``choices`` (``None`` if nothing fits)."""
    if not np.isfinite(g[mc - 1]):
        return None
    cuts = []
    i = mc - 1
    for s in range(k - 1, 0, -1):
        i = int(choices[s - 1][i])
        cuts.append(i)
    return cuts[::-1]
