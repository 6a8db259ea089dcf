"""Give every op a stage and compute what crosses each cut.

Guarantees afterwards, with ``K = len(program.cuts)``:

- every live op (one the outputs, the control outputs or a cut depend on) has a node
  attribute ``stage`` in ``0..K``; dead ops and the argument and capture placeholders have
  ``stage=None``; data never flows from a later stage to an earlier one;
- stage ``k < K`` holds what cut ``k`` needs that no earlier stage holds (the tensors of cut
  ``k`` are computed in stage ``k``); the last stage holds what computes the outputs; an op
  that only feeds side effects (a batch-norm statistics update, a print) runs in the earliest
  stage where its inputs are ready, so statistics stay beside the layer they belong to;
  every stage runs at least one op that does work (not only ``Const``, ``Identity``, reads);
- constants, and reads of variables that nothing in the program writes, are copied into
  every stage that uses them (node attribute ``stages``), so a variable is read where it is
  used and never travels across a cut; every other op (every stateful op among them) runs
  in exactly one stage, its own (``stages == [stage]``);
- ``program.stages[k]`` lists the stage's ops (those whose ``stages`` hold ``k``), its inputs
  (argument tensors and outputs of earlier stages), its outputs (what later stages or the
  caller read), its variables and captures; ``program.boundaries[k]`` lists every tensor that
  crosses cut ``k``, that is every input of a later stage computed in stage ``k`` or before
  or passed as an argument: the named tensors, skip connections and arguments;
- cuts out of data-flow order, and cuts that leave a stage with nothing to do, were refused
  with a ``GradSplitError``.

``check`` (the pass's ``ensures``) tests these in one sweep over the nodes and edges and one
over the stage plans, except two that need a walk per cut or per op: that stage ``k`` holds
*only* what cut ``k`` needs (it tests that cut ``k``'s tensors are computed in stage ``k``,
which with forward data flow puts all they need in stages ``0..k``), and where a side-effect
op lands (it tests only that it has a stage). The refusals are tested where they are raised.
Of a stage plan's variables and captures it tests nothing.

Example
-------
>>> import tensorflow as tf
>>> import gradsplit_compiler as gsc
>>> from gradsplit_compiler.frontend.capture import capture
>>> from passes.resolve_cuts import resolve_cuts
>>> from passes.partition import partition
>>> f = tf.function(lambda x: tf.reduce_sum(gsc.mark(tf.tanh(x), "y") * x))
>>> program = capture(f, [tf.TensorSpec([None])])
>>> program.cut_specs = ["y"]
>>> program = partition(resolve_cuts(program))
>>> program.boundaries
[['x:0', 'gsc.mark.y.:0']]
>>> from passes.partition import check
>>> check(program)
[]
"""

from __future__ import annotations

import networkx as nx

from gradsplit_compiler import ir
from gradsplit_compiler.errors import GradSplitError
from gradsplit_compiler.ir.program import Program, StagePlan

# Ops that do no work of their own: a stage made only of these is empty.
__all__ = ["TRIVIAL_OPS", "check", "partition"]

TRIVIAL_OPS = {"Const", "NoOp", "Identity", "ReadVariableOp"}


def partition(program: Program) -> Program:
    g = program.graph
    inputs = program.input_placeholders
    live = _live_nodes(program) - inputs
    producers = [[ir.parse_tensor_name(t)[0] for t in cut] for cut in program.cuts]
    _check_cut_producers(program, producers, inputs)
    needed = [ir.ancestors(g, ops) & live for ops in producers]
    _check_order(program, producers, needed)

    num_stages = len(program.cuts) + 1
    stage: dict[str, int | None] = dict.fromkeys(g.nodes)
    for k in reversed(range(len(needed))):
        for node in needed[k]:
            stage[node] = k
    main = ir.ancestors(g, {ir.parse_tensor_name(t)[0] for t in program.output_names},
                        data_only=True)
    side = {}  # an ordered set, in the graph's order: the same order in every process
    for node, placed in stage.items():
        if placed is None and node in live:
            if node in main:
                stage[node] = num_stages - 1
            else:
                side[node] = None
    # Where a side-effect op goes depends on its own inputs' and users' stages only, so
    # an order of these ops among themselves is enough, not one of the whole graph.
    successors = ir.successor_edges(g)
    side_only = ir.order_among(side, ((u, v) for u in side for v in successors[u]
                                      if v in side))
    # An op that only feeds side effects runs as early as its placed inputs allow, so a
    # statistics update stays in the stage of the layer it belongs to ...
    floating = set()
    for node in side_only:
        placed = [stage[p] for p in g.predecessors(node) if stage.get(p) is not None]
        if placed:
            stage[node] = max(placed)
        else:
            floating.add(node)
    # ... and one with no placed input (a read feeding that update) joins its first user.
    for node in reversed(side_only):
        if node in floating:
            users = [stage[s] for s in g.successors(node) if stage.get(s) is not None]
            stage[node] = min(users, default=num_stages - 1)
    nx.set_node_attributes(g, stage, "stage")
    _replicate(program, stage)
    _check_not_empty(program, stage, num_stages)
    members: list[list[str]] = [[] for _ in range(num_stages)]
    for node, copies in nx.get_node_attributes(g, "stages").items():
        for k in copies:
            members[k].append(node)
    program.stages = [_plan(program, k, members[k]) for k in range(num_stages)]
    program.boundaries = _boundaries(program, num_stages)
    return program


def _live_nodes(program: Program) -> set[str]:
    g = program.graph
    roots = {ir.parse_tensor_name(t)[0] for t in program.output_names}
    roots |= set(program.control_outputs)
    roots |= {ir.parse_tensor_name(t)[0] for cut in program.cuts for t in cut}
    roots &= set(g.nodes)
    return ir.ancestors(g, roots)


def _cut_label(program: Program, k: int) -> str:
    entry = program.cut_specs[k]
    return repr(entry)


def _check_cut_producers(program: Program, producers, inputs) -> None:
    g = program.graph
    # what fn's results and side effects are made of: a cut must feed one of them
    roots = {ir.parse_tensor_name(t)[0] for t in program.output_names}
    roots |= set(program.control_outputs)
    for k, ops in enumerate(producers):
        for op, tensor in zip(ops, program.cuts[k]):
            if op in inputs:
                raise GradSplitError(
                    f"cut {k} ({_cut_label(program, k)}) is {tensor}, an input of fn, so the "
                    "stage before it would be empty. Cut at a tensor that fn computes."
                )
            if op not in roots and not (nx.descendants(g, op) & roots):
                raise GradSplitError(
                    f"cut {k} ({_cut_label(program, k)}) is {tensor}, and the loss does not "
                    "depend on it (nor does any side effect of fn): no cotangent would ever "
                    "reach it. Cut at a tensor on the way to fn's outputs."
                )


def _check_order(program: Program, producers, needed) -> None:
    for k, ops in enumerate(producers):
        for j in range(k):
            late = [op for op in ops if op in needed[j]]
            if late:
                raise GradSplitError(
                    f"cut {j} ({_cut_label(program, j)}) is computed from cut {k} "
                    f"({_cut_label(program, k)}): cuts must be listed in data-flow order. "
                    f"Put {_cut_label(program, k)} before {_cut_label(program, j)}."
                )


def _replicable(program: Program, node: str, written: set[str], attrs: dict,
                pred: dict) -> bool:
    """Whether ``node`` may be copied into every stage that reads it: a constant, or a read
    of a variable nobody writes (``attrs``, ``pred``: ``ir.node_attributes``,
    ``ir.predecessor_edges`` of the graph)."""
    op = attrs[node]["op"]
    if op != "Const" and op != "ReadVariableOp":
        return False
    data_preds = [u for u, keyed in pred[node].items() for a in keyed.values()
                  if not a["control"]]
    if op == "Const":
        return not data_preds
    return len(data_preds) == 1 and data_preds[0] in program.variable_placeholders and (
        data_preds[0] not in written
    )


def _replicate(program: Program, stage: dict) -> None:
    g = program.graph
    written = program.written_resources()
    attrs = ir.node_attributes(g)
    pred, succ = ir.predecessor_edges(g), ir.successor_edges(g)
    replicated, stages = {}, {}
    for node in attrs:
        own = stage.get(node)
        if own is None:
            continue
        copies = {own}
        if _replicable(program, node, written, attrs, pred):
            out = [(v, a) for v, keyed in succ[node].items() for a in keyed.values()]
            users = {stage[v] for v, a in out if not a["control"]}
            users.discard(None)
            has_control_users = any(a["control"] for _, a in out)
            copies = users | ({own} if has_control_users or not users else set())
            replicated[node] = len(copies) > 1 or copies != {own}
        stages[node] = sorted(copies)
    nx.set_node_attributes(g, replicated, "replicated")
    nx.set_node_attributes(g, stages, "stages")


def _check_not_empty(program: Program, stage: dict, num_stages: int) -> None:
    g = program.graph
    busy = [False] * num_stages
    attrs = ir.node_attributes(g)
    for node, k in stage.items():
        if k is not None and attrs[node]["op"] not in TRIVIAL_OPS:
            busy[k] = True
    for k, is_busy in enumerate(busy):
        if is_busy:
            continue
        if k == 0:
            where = f"before cut 0 ({_cut_label(program, 0)})"
        elif k == num_stages - 1:
            where = f"after the last cut ({_cut_label(program, k - 1)})"
        else:
            where = (
                f"between cut {k - 1} ({_cut_label(program, k - 1)}) and cut {k} "
                f"({_cut_label(program, k)})"
            )
        raise GradSplitError(
            f"stage {k} would be empty: nothing is computed {where}. Remove a cut or move it "
            "so every stage does some work."
        )


def _plan(program: Program, k: int, nodes: list[str]) -> StagePlan:
    """Stage ``k``'s plan; ``nodes`` are its ops (those whose ``stages`` hold ``k``), in
    graph order."""
    g = program.graph
    attrs = ir.node_attributes(g)
    pred, succ = ir.predecessor_edges(g), ir.successor_edges(g)
    members = set(nodes)
    inputs: dict[str, None] = {}  # ordered sets (sorted below)
    variable_indices: set[int] = set()
    captures: set[str] = set()
    for node in nodes:
        for src, keyed in pred[node].items():
            if src in members:
                continue
            for a in keyed.values():
                if a["control"]:
                    continue
                if src in program.variable_placeholders:
                    variable_indices.add(program.variable_placeholders[src])
                elif src in program.other_captures:
                    captures.add(src)
                else:
                    inputs[ir.tensor_name(src, a["src_output"])] = None
    order = {n: i for i, n in enumerate(attrs)}

    def in_graph_order(names) -> list[str]:
        return sorted(names, key=lambda t: (order[ir.parse_tensor_name(t)[0]],
                                            ir.parse_tensor_name(t)[1]))

    outputs: dict[str, None] = {}
    wanted = set(program.output_names)
    for node in nodes:
        node_attrs = attrs[node]
        if node_attrs.get("stage") != k:
            continue
        for dst, keyed in succ[node].items():
            dst_attrs = attrs[dst]
            if k in dst_attrs.get("stages", ()) or dst_attrs.get("stage") is None:
                continue
            for a in keyed.values():
                if not a["control"]:
                    outputs[ir.tensor_name(node, a["src_output"])] = None
        n_out = len(node_attrs.get("outputs") or []) or 1
        for i in range(n_out):
            name = ir.tensor_name(node, i)
            if name in wanted:
                outputs[name] = None
    inputs, outputs = in_graph_order(inputs), in_graph_order(outputs)
    return StagePlan(
        index=k,
        nodes=nodes,
        inputs=inputs,
        outputs=outputs,
        variable_indices=sorted(variable_indices),
        capture_placeholders=sorted(captures),
    )


def _boundaries(program: Program, num_stages: int) -> list[list[str]]:
    attrs = ir.node_attributes(program.graph)
    boundaries = []
    for cut in range(num_stages - 1):
        crossing: dict[str, None] = {}  # an ordered set
        for plan in program.stages[cut + 1:]:
            for name in plan.inputs:
                producer_stage = attrs[ir.parse_tensor_name(name)[0]].get("stage")
                if producer_stage is None or producer_stage <= cut:
                    crossing[name] = None
        boundaries.append(list(crossing))
    return boundaries


def check(program: Program) -> list[str]:
    """What the docstring guarantees, as violations (empty when it holds); see the module
    docstring for the two properties tested only in part."""
    g = program.graph
    last = len(program.cuts)
    problems: list[str] = []
    placeholders = program.input_placeholders
    live = _live_nodes(program) - placeholders
    written = program.written_resources()
    members: list[set[str]] = [set() for _ in range(last + 1)]
    busy = [False] * (last + 1)
    nodes = ir.node_attributes(g)
    pred, succ = ir.predecessor_edges(g), ir.successor_edges(g)
    for node, attrs in nodes.items():
        own = attrs.get("stage")
        if node not in live:
            if own is not None:
                kind = "an input placeholder" if node in placeholders else "dead"
                problems.append(f"node {node!r} is {kind} but has stage {own!r}")
            continue
        if own is None:
            problems.append(f"live node {node!r} has no stage")
            continue
        if not isinstance(own, int) or not 0 <= own <= last:
            problems.append(f"live node {node!r} has stage {own!r}, not one of 0..{last}")
            continue
        copies = attrs.get("stages")
        if attrs.get("replicated"):
            if not _replicable(program, node, written, nodes, pred):
                problems.append(
                    f"node {node!r} ({attrs['op']}) runs in stages {copies!r}, but only "
                    "constants and reads of unwritten variables may be copied"
                )
        elif copies != [own]:
            problems.append(f"node {node!r} runs in stages {copies!r}, not only in its "
                            f"stage {own}")
        for k in copies or ():
            if isinstance(k, int) and 0 <= k <= last:
                members[k].add(node)
            else:
                problems.append(f"node {node!r} runs in stage {k!r}, not one of 0..{last}")
        if attrs["op"] not in TRIVIAL_OPS:
            busy[own] = True
    for u, v, a in ((u, v, a) for u, consumers in succ.items()
                    for v, keyed in consumers.items() for a in keyed.values()):
        if a["control"]:
            continue
        su, sv = nodes[u].get("stage"), nodes[v].get("stage")
        if su is None or sv is None:
            continue
        if nodes[u].get("replicated"):
            if sv not in nodes[u].get("stages", ()):
                problems.append(f"node {v!r} (stage {sv}) reads the copied node {u!r}, which "
                                f"has no copy in stage {sv}")
        elif su > sv:
            problems.append(f"data edge {u!r} (stage {su}) -> {v!r} (stage {sv}) runs "
                            "backwards")
    for k, cut in enumerate(program.cuts):
        for tensor in cut:
            op = ir.parse_tensor_name(tensor)[0]
            if op in g and nodes[op].get("stage") != k:
                problems.append(f"cut {k}'s tensor {tensor!r} is computed in stage "
                                f"{nodes[op].get('stage')!r}, not {k}")
    problems += [f"stage {k} runs no op that does work" for k, b in enumerate(busy) if not b]
    if problems:
        return problems
    return _check_plans(program, members)


def _check_plans(program: Program, members: list[set[str]]) -> list[str]:
    """The stage plans and boundaries against the ``stage``/``stages`` attributes."""
    g = program.graph
    last = len(program.cuts)
    if len(program.stages) != last + 1 or len(program.boundaries) != last:
        return [f"{len(program.stages)} stage plans and {len(program.boundaries)} boundaries "
                f"for {last} cuts"]
    problems: list[str] = []
    arg_ops = {ir.parse_tensor_name(n)[0] for n in program.arg_names}
    outputs = [set(plan.outputs) for plan in program.stages]
    crossing: list[set[str]] = [set() for _ in range(last)]
    for k, plan in enumerate(program.stages):
        listed = set(plan.nodes)
        if plan.index != k or listed != members[k]:
            odd = sorted(listed ^ members[k])[:3]
            problems.append(f"program.stages[{k}] (index {plan.index}) does not list the ops "
                            f"whose stages hold {k}; e.g. {odd}")
        for tensor in plan.outputs:
            op = ir.parse_tensor_name(tensor)[0]
            if g.nodes[op].get("stage") != k:
                problems.append(f"stage {k} lists the output {tensor!r}, computed in stage "
                                f"{g.nodes[op].get('stage')!r}")
        for tensor in plan.inputs:
            op = ir.parse_tensor_name(tensor)[0]
            came = g.nodes[op].get("stage")
            if came is None:
                if op not in arg_ops:
                    problems.append(f"stage {k} reads {tensor!r}, neither an argument nor "
                                    "computed in a stage")
            elif came >= k or g.nodes[op].get("replicated"):
                problems.append(f"stage {k} reads {tensor!r} from stage {came} (a copied op "
                                "or not an earlier stage)")
            elif tensor not in outputs[came]:
                problems.append(f"stage {k} reads {tensor!r}, which stage {came} does not "
                                "list as an output")
            for cut in range(came or 0, k):
                crossing[cut].add(tensor)
    for name in program.output_names:
        op = ir.parse_tensor_name(name)[0]
        own = g.nodes[op].get("stage")
        if own is not None and own in g.nodes[op].get("stages", ()) and name not in outputs[own]:
            problems.append(f"the output {name!r} is not an output of stage {own}, which "
                            "computes it")
    for cut, boundary in enumerate(program.boundaries):
        if set(boundary) != crossing[cut]:
            odd = sorted(set(boundary) ^ crossing[cut])[:3]
            problems.append(f"program.boundaries[{cut}] is not what crosses cut {cut}; e.g. "
                            f"{odd}")
    return problems


partition.ensures = check
partition.preserves_edges = True  # sets attributes only: see passes/manager.py
