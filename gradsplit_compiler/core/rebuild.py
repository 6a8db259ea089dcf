"""Rebuild: one stage's ops -> a forward function that returns residuals and a backward
function (its vector-Jacobian product) that consumes them.

How (the residuals cut): the stage's ops are imported into a scratch trace
together with their vector-Jacobian product, what ``tf.gradients(outputs, inputs +
variables, grad_ys=cotangents)`` gives, built by a ``tf.GradientTape`` the imported ops are
recorded on (``_tf_internal.vjp_on_tape``; by ``tf.gradients`` itself where only it can). That
graph is then cut a second time: ops that depend on the cotangents are backward; the rest
are forward, and the forward tensors the backward reads are the residuals. Two exceptions
keep every piece compilable and small: constants and shape arithmetic (``Shape``, ``Size``,
integer ops on them) that the backward needs are recomputed in the backward, because XLA
needs shapes as compile-time constants and they cost nothing to recompute. The forward is
never run again by the backward.

Both pieces are kept as GraphDefs and emitted into whatever function is being traced by
``tf.graph_util.import_graph_def`` with an ``input_map`` from the piece's inputs to the
traced arguments and from the variable placeholders to the captured variable handles; the
inputs' producers are not part of the piece, so no ``Placeholder`` is left for XLA to refuse.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import graph_pb2

from gradsplit_compiler import _tf_internal, ir
from gradsplit_compiler.core.residuals import cut_forward_backward
from gradsplit_compiler.errors import GradSplitError
from gradsplit_compiler.frontend import custom_gradients
from gradsplit_compiler.ir.program import Program, StagePlan
from gradsplit_compiler.util import phase

__all__ = [
    "ListResidual",
    "StageVJP",
    "build_stage_vjp",
    "capture_map",
    "emit",
    "external_inputs",
    "is_differentiable",
    "program_graph_def",
    "stage_graph_def",
]

CONTROL_FLOW_OPS = ir.CONTROL_FLOW_OPS


def is_differentiable(dtype: tf.DType) -> bool:
    return dtype.is_floating or dtype.is_complex


def stage_graph_def(program: Program, plan: StagePlan) -> graph_pb2.GraphDef:
    """The GraphDef of the stage's ops alone; inputs from outside are left dangling."""
    return _piece_graph_def(program.graph, plan.nodes)


def program_graph_def(program: Program) -> graph_pb2.GraphDef:
    """The GraphDef of every op of ``program`` but its inputs (the argument and capture
    placeholders), which ``emit`` maps to tensors of the function being traced."""
    inputs = program.input_placeholders
    return _piece_graph_def(program.graph, [n for n in program.graph if n not in inputs])


def _piece_graph_def(g: nx.MultiDiGraph, nodes: list[str]) -> graph_pb2.GraphDef:
    members = set(nodes)
    gd = graph_pb2.GraphDef()
    gd.versions.CopyFrom(g.graph["versions"])
    pred = ir.predecessor_edges(g)
    attrs = ir.node_attributes(g)
    for name in nodes:
        nd = gd.node.add()
        nd.CopyFrom(attrs[name]["node_def"])
        nd.input.extend(inp for inp in ir.inputs_from_edges(pred[name].items())
                        # a control input from outside: ordered by the stage order already
                        if not (inp.startswith("^") and inp[1:] not in members))
        _keep_colocation_within(nd, members)
    _copy_used_functions(g.graph["library"], gd)
    return gd


def _keep_colocation_within(nd, members: set[str]) -> None:
    """Drop from ``nd``'s ``_class`` (colocation) the ops that are not ``members``."""
    if "_class" in nd.attr:
        listed = nd.attr["_class"].list.s
        keep = [s for s in listed if s.decode().removeprefix("loc:@") in members]
        if not keep:
            del nd.attr["_class"]
        elif len(keep) != len(listed):
            del listed[:]
            listed.extend(keep)


class _TracedPieces:
    """Pieces (GraphDefs of some of its ops) of a traced graph exported whole: each op's
    ``NodeDef`` is taken as exported, inputs included, in one ``extend`` per piece; only
    the ops with control inputs or colocations are edited (``_piece_graph_def`` does the
    same from the IR, rebuilding every op's inputs from its edges)."""

    def __init__(self, h: nx.MultiDiGraph, graph_def: graph_pb2.GraphDef):
        self.h = h
        self.node_defs = {nd.name: nd for nd in graph_def.node}
        self.edited = {name for name, nd in self.node_defs.items()
                       if "_class" in nd.attr or (nd.input and nd.input[-1].startswith("^"))}

    def __call__(self, nodes: list[str]) -> graph_pb2.GraphDef:
        members = set(nodes)
        gd = graph_pb2.GraphDef()
        gd.versions.CopyFrom(self.h.graph["versions"])
        node_defs = self.node_defs
        gd.node.extend([node_defs[name] for name in nodes])
        for i, name in enumerate(nodes):
            if name not in self.edited:
                continue
            nd = gd.node[i]
            if nd.input and nd.input[-1].startswith("^"):
                # a control input from outside: ordered by the stage order already
                kept = [inp for inp in nd.input
                        if not (inp.startswith("^") and inp[1:] not in members)]
                if len(kept) != len(nd.input):
                    del nd.input[:]
                    nd.input.extend(kept)
            _keep_colocation_within(nd, members)
        _copy_used_functions(self.h.graph["library"], gd)
        return gd


def _copy_used_functions(library, gd: graph_pb2.GraphDef) -> None:
    """Copy into ``gd.library`` the functions of ``library`` that ``gd``'s nodes call,
    directly or through other functions (a cond branch calling a tf.function...), and their
    registered gradients. A piece carrying the whole program's library would register every
    function again each time it is imported."""
    if not library.function:
        return
    functions = {f.signature.name: f for f in library.function}
    gradients = {gr.function_name: gr for gr in library.gradient}
    seen: set[str] = set()

    def visit_attr(value) -> None:
        if value.HasField("func"):
            visit(value.func.name)
            for inner in value.func.attr.values():
                visit_attr(inner)
        if value.HasField("list"):
            for func in value.list.func:
                visit(func.name)

    def visit_nodes(nodes) -> None:
        for nd in nodes:
            visit(nd.op)
            for value in nd.attr.values():
                visit_attr(value)

    def visit(name: str) -> None:
        if name in seen or name not in functions:
            return
        seen.add(name)
        visit_nodes(functions[name].node_def)
        if name in gradients:
            visit(gradients[name].gradient_func)

    visit_nodes(gd.node)
    for fdef in library.function:  # in the library's own order
        if fdef.signature.name in seen:
            gd.library.function.add().CopyFrom(fdef)
    for grad in library.gradient:
        if grad.function_name in seen:
            gd.library.gradient.add().CopyFrom(grad)


@dataclass
class ListResidual:
    """A loop accumulator (TensorList) that crosses from forward to backward as a tensor.

    The forward stacks it, rotated so the ``counter`` elements the loop pushed sit last
    (under XLA the list is a fixed buffer of ``maximum_iterations`` slots filled from the
    front, and the gradient loop pops from the back); the backward only rebuilds the list.
    """

    dtype: tf.DType
    element_shape: list
    counter: int  # index of the residual holding the loop's trip count

    def to_tensor(self, handle: tf.Tensor, counter: tf.Tensor) -> tf.Tensor:
        dense = tf.raw_ops.TensorListStack(
            input_handle=handle, element_shape=self.element_shape, element_dtype=self.dtype,
            num_elements=-1,
        )
        size = tf.shape(dense)[0]
        counter = tf.cast(counter, size.dtype)
        return tf.gather(dense, tf.math.floormod(tf.range(size) + counter, size))

    def from_tensor(self, dense: tf.Tensor) -> tf.Tensor:
        return tf.raw_ops.TensorListFromTensor(tensor=dense, element_shape=self.element_shape)


@dataclass
class StageVJP:
    """The two pieces of one stage and how to feed them."""

    forward_graph_def: graph_pb2.GraphDef
    backward_graph_def: graph_pb2.GraphDef
    input_keys: list[str]  # input_map keys of the forward piece, one per stage input
    output_names: list[str]  # forward return elements, one per stage output
    residual_names: list[str]  # forward tensors the backward reads
    residual_specs: list[tf.TensorSpec]
    cotangent_keys: dict[int, str]  # stage output index -> backward input_map key
    # per stage input: backward return element, or ("cotangent", j) / ("residual", r) / None
    input_gradients: list
    variable_gradients: list
    xla_compatible: bool = True
    list_residuals: dict = field(default_factory=dict)  # residual index -> ListResidual
    capture_keys: dict[str, object] = field(default_factory=dict)  # input_map key -> external
    variable_keys: dict[str, int] = field(default_factory=dict)  # input_map key -> var index
    split_backward: SplitBackward | None = None


@dataclass
class SplitBackward:
    """The backward cut in two for zero-bubble schedules, both pieces of the same traced
    graph as the fused backward.

    ``input_graph_def`` (B) holds the ops the input cotangents need; ``weight_graph_def``
    (W) the ops only the variable gradients need, plus copies of the constants and shape
    arithmetic it reads (recomputed, as the fused backward recomputes them). No op that
    reads a cotangent is in both: what W needs of B's work crosses as ``carried`` tensors,
    which B returns. ``weight_inputs`` lists what W reads, in order: ``("residual", r)``,
    ``("cotangent", j)`` (output ``j``'s cotangent) or ``("carried", c)``.
    """

    input_graph_def: graph_pb2.GraphDef
    weight_graph_def: graph_pb2.GraphDef
    carried_names: list[str]  # tensors of B that W reads, graph order
    carried_specs: list[tf.TensorSpec]
    weight_inputs: list[tuple[str, int]]
    weight_keys: list[str]  # W's input_map key of each weight input


def build_stage_vjp(program: Program, plan: StagePlan, input_specs: list[tf.TensorSpec],
                    output_specs: list[tf.TensorSpec],
                    cotangent_outputs: list[int] | None = None,
                    static: bool = False) -> StageVJP:
    """Trace the stage with its gradient and cut that graph into forward and backward.

    ``cotangent_outputs`` are the indices of the stage outputs that receive a cotangent
    (default: every floating-point output); the others are treated as constants.
    ``static``: ``input_specs`` are the static shapes of one call; the shapes recorded on
    library function arguments at capture (``_output_shapes``, a ``None`` batch) are dropped
    so that gradient construction sees the branches with the shapes they are called with.

    The steps, each a function below: ``_stage_piece`` (the stage's GraphDef),
    ``_trace_with_gradients`` (one trace of the stage and its gradient),
    ``_cut_traced`` (forward, backward and residuals of that trace), ``_residuals`` (their
    order, loop accumulators, specs), ``_gradient_sources`` (where each gradient comes
    from), ``_capture_keys`` (variables and other captures of the pieces) and
    ``_split_backward`` (the backward cut again into B and W, for zero-bubble schedules).
    """
    stage = f"stage {plan.index}: "
    with phase(stage + "piece"):
        stage_gd = _stage_piece(program, plan, static)
    if cotangent_outputs is None:
        cotangent_outputs = [j for j, s in enumerate(output_specs) if is_differentiable(s.dtype)]
    diff_outputs = list(cotangent_outputs)
    diff_inputs = [i for i, s in enumerate(input_specs) if is_differentiable(s.dtype)]
    with phase(stage + "trace"):
        trace = _trace_with_gradients(program, plan, stage_gd, input_specs, output_specs,
                                      diff_outputs, diff_inputs)
    with phase(stage + "convert"):
        traced_gd = trace.graph.as_graph_def()
        whole = graph_pb2.GraphDef()
        whole.CopyFrom(traced_gd)  # one copy of the message, not one per node
        h = ir.to_networkx(traced_gd, trace.graph, consume=True, shapes=False)
        pieces = _TracedPieces(h, whole)
    with phase(stage + "cut"):
        lists = _ListAccumulators(h, trace.graph)
        cut = _cut_traced(program, plan, stage_gd, trace, h, lists)
        residual_names, list_residuals, residual_specs = _residuals(
            h, trace.graph, cut.residuals, lists)
        input_gradients, variable_gradients = _gradient_sources(
            plan, trace, residual_names, set(cut.backward), len(input_specs), diff_outputs,
            diff_inputs)
        variable_keys, capture_keys = _capture_keys(program, plan, trace.capture_kind)
    with phase(stage + "split backward"):
        split_backward = _split_backward(h, trace, cut.backward, residual_names,
                                         list_residuals, input_gradients, variable_gradients,
                                         diff_outputs, pieces)
    with phase(stage + "pieces"):
        forward_graph_def = pieces(cut.forward)
        backward_graph_def = pieces(cut.backward)
        # networkx's cached views (``h.pred``...) refer back to ``h``, so ``h`` would be
        # left for Python's cycle collector with every node and edge dict in it: emptied
        # here, they are freed now instead of walked by the next collection.
        h.clear()
    return StageVJP(
        split_backward=split_backward,
        xla_compatible=trace.xla_compatible,
        list_residuals=list_residuals,
        forward_graph_def=forward_graph_def,
        backward_graph_def=backward_graph_def,
        input_keys=[ph + ":0" for ph in trace.input_ops],
        output_names=trace.output_names,
        residual_names=residual_names,
        residual_specs=residual_specs,
        cotangent_keys={diff_outputs[k]: ph + ":0" for k, ph in enumerate(trace.cotangent_ops)},
        input_gradients=input_gradients,
        variable_gradients=variable_gradients,
        capture_keys=capture_keys,
        variable_keys=variable_keys,
    )


def _stage_piece(program: Program, plan: StagePlan, static: bool) -> graph_pb2.GraphDef:
    """The stage's GraphDef; with ``static``, without the ``_output_shapes`` recorded on
    library function arguments."""
    stage_gd = stage_graph_def(program, plan)
    if static:
        for fdef in stage_gd.library.function:
            for arg in fdef.arg_attr.values():
                if "_output_shapes" in arg.attr:
                    del arg.attr["_output_shapes"]
    return stage_gd


@dataclass
class _Trace:
    """One trace of a stage with its gradient: the graph and the names in it."""

    graph: Any  # the FuncGraph
    xla_compatible: bool
    input_ops: list[str]  # the placeholder op of each stage input
    cotangent_ops: list[str]  # the placeholder op of each cotangent (diff_outputs order)
    output_names: list[str]  # each stage output's tensor
    gradient_names: list[str | None]  # per differentiable input, then per variable
    capture_kind: dict[str, Any]  # placeholder op of a capture -> the external it stands for


def _trace_with_gradients(program: Program, plan: StagePlan, stage_gd: graph_pb2.GraphDef,
                          input_specs: list[tf.TensorSpec], output_specs: list[tf.TensorSpec],
                          diff_outputs: list[int], diff_inputs: list[int]) -> _Trace:
    """Trace the stage's ops and ``tf.gradients(outputs, inputs + variables, cotangents)``
    (built on a tape, ``_tf_internal.vjp_on_tape``) in one function, as XLA traces (cond
    intermediates stay plain tensors, not Optionals, and loop accumulators get a fixed size,
    so every piece compiles on its own); without
    XLA's rules when a loop has no ``maximum_iterations`` (the stage is then not
    ``xla_compatible``)."""
    stage_variables = set(plan.variable_indices)
    var_placeholders = {
        ph: idx for ph, idx in program.variable_placeholders.items() if idx in stage_variables
    }
    recorded: dict = {}
    stand_ins: dict = {}  # placeholder op of a variable's handle -> the handle

    def body(*args):
        ins = args[: len(input_specs)]
        cots = args[len(input_specs):]
        recorded["ins"] = [t.op.name for t in ins]
        recorded["cots"] = [t.op.name for t in cots]
        input_map = dict(zip(plan.inputs, ins))
        # A placeholder with the handle's dtype and shape, not a capture of the function
        # graph: tf.gradients in a function graph looks through every capture for each
        # tensor it visits, quadratic in the stage's variables.
        stand_ins.clear()
        indices = list(dict.fromkeys(var_placeholders.values()))
        handles = dict(zip(indices, _resource_placeholders(
            [(f"gsc.variable.{idx}", program.variables[idx].handle) for idx in indices])))
        for idx in indices:
            stand_ins[handles[idx].op.name] = program.variables[idx].handle
        for ph, idx in var_placeholders.items():
            input_map[ph + ":0"] = handles[idx]
        for ph in plan.capture_placeholders:
            input_map[ph + ":0"] = _tf_internal.capture_in_current_graph(
                program.other_captures[ph]
            )
        with phase(f"stage {plan.index}: import"):
            outs = emit(stage_gd, input_map, plan.outputs, name="")
        ys = [outs[j] for j in diff_outputs]
        xs = [ins[i] for i in diff_inputs] + [handles[idx] for idx in plan.variable_indices]
        grads = [None] * len(xs)
        if ys and xs:
            try:
                with custom_gradients.names_in_trace(input_map), \
                        phase(f"stage {plan.index}: gradients"):
                    # Built by a tape, as the training step's trace builds it (a
                    # quarter less than tf.gradients spends on the same gradient
                    # functions); tf.gradients where only it can (TF1 loops, calls).
                    grads = _tf_internal.vjp_on_tape(ys, xs, list(cots), name="gsc.vjp")
                    if grads is None:
                        grads = tf.gradients(ys, xs, grad_ys=list(cots), name="gsc.vjp")
            except LookupError as exc:
                raise GradSplitError(
                    f"stage {plan.index} has an op TensorFlow cannot differentiate: {exc}. "
                    "Move the cut so this op is not between a cut and the value, or wrap it "
                    "in tf.stop_gradient."
                ) from None
        grads = [None if g is None else tf.convert_to_tensor(g) for g in grads]
        recorded["outs"] = [t.name for t in outs]
        recorded["grads"] = [None if g is None else g.name for g in grads]

    cot_specs = [
        tf.TensorSpec(output_specs[j].shape, output_specs[j].dtype, name=f"gsc.cot.{j}")
        for j in diff_outputs
    ]
    named_inputs = [
        tf.TensorSpec(s.shape, s.dtype, name=f"gsc.in.{i}") for i, s in enumerate(input_specs)
    ]

    def trace(xla: bool):
        with _tf_internal.scratch_graph(f"gsc_stage{plan.index}_vjp", xla) as graph:
            body(*[tf.compat.v1.placeholder(s.dtype, s.shape, name=s.name)
                   for s in named_inputs + cot_specs])
        return graph

    xla_compatible = True
    try:
        graph = trace(xla=True)
    except (ValueError, tf.errors.InvalidArgumentError) as exc:
        if "maximum_iterations" not in str(exc):
            raise
        xla_compatible = False
        graph = trace(xla=False)
    xla_compatible = xla_compatible and not _unbounded_lists(graph)
    capture_kind = dict(stand_ins)
    for external, internal in graph.captures:
        capture_kind[internal.op.name] = external
    return _Trace(graph=graph, xla_compatible=xla_compatible, input_ops=recorded["ins"],
                  cotangent_ops=recorded["cots"], output_names=recorded["outs"],
                  gradient_names=recorded["grads"], capture_kind=capture_kind)


def _resource_placeholders(named_handles: list[tuple[str, tf.Tensor]]) -> list[tf.Tensor]:
    """One ``Placeholder`` per ``(name, handle)`` in the graph being traced, with the
    handle's shape and handle data: imported as one GraphDef, which costs a fraction of
    ``tf.compat.v1.placeholder`` called once per variable (a stage may read thousands)."""
    if not named_handles:
        return []
    gd = graph_pb2.GraphDef()
    for name, handle in named_handles:
        nd = gd.node.add(name=name, op="Placeholder")
        nd.attr["dtype"].type = tf.resource.as_datatype_enum
        nd.attr["shape"].shape.CopyFrom(handle.shape.as_proto())
    placeholders = tf.graph_util.import_graph_def(
        gd, return_elements=[name + ":0" for name, _ in named_handles], name="")
    for (_, handle), placeholder in zip(named_handles, placeholders):
        _tf_internal.copy_handle_data(handle, placeholder)
    return placeholders


class _ListAccumulators:
    """``_list_accumulator`` of each tensor of the traced graph, each asked once."""

    def __init__(self, h: nx.MultiDiGraph, graph):
        self.h, self.graph = h, graph
        self.found: dict = {}

    def __call__(self, name: str):
        if name not in self.found:
            self.found[name] = _list_accumulator(self.h, self.graph, name)
        return self.found[name]


def _cut_traced(program: Program, plan: StagePlan, stage_gd: graph_pb2.GraphDef,
                trace: _Trace, h: nx.MultiDiGraph, lists: _ListAccumulators):
    """The traced graph cut into forward and backward (``residuals.cut_forward_backward``):
    captured reads of variables nobody writes may be read again in the backward."""
    written = set(program.written_variables())
    by_handle = _stage_variables_by_handle(program, plan)
    rereadable = set()
    for ph, external in trace.capture_kind.items():
        index = by_handle.get(id(external))
        if index is not None and index not in written:
            rereadable.add(ph)
    return cut_forward_backward(
        h,
        gradients={ir.parse_tensor_name(n)[0] for n in trace.gradient_names if n is not None},
        cotangents=set(trace.cotangent_ops),
        inputs=set(trace.input_ops),
        captures=set(trace.capture_kind),
        stage_ops={nd.name for nd in stage_gd.node},
        travels=lists,
        rereadable=rereadable,
    )


def _residuals(h: nx.MultiDiGraph, graph, cut_residuals, lists: _ListAccumulators
               ) -> tuple[list[str], dict[int, ListResidual], list[tf.TensorSpec]]:
    """The residuals in the traced graph's order (a loop accumulator brings its trip
    count along), which of them are loop accumulators, and the spec of each."""
    residual_names = list(cut_residuals)
    order = {n: i for i, n in enumerate(h.nodes)}
    list_infos = {name: lists(name) for name in residual_names
                  if graph.get_tensor_by_name(name).dtype == tf.variant and lists(name)}
    for info in list_infos.values():
        if info["counter"] not in residual_names:
            residual_names.append(info["counter"])
    residual_names.sort(key=lambda t: (order[ir.parse_tensor_name(t)[0]],
                                       ir.parse_tensor_name(t)[1]))
    list_residuals = {
        residual_names.index(name): ListResidual(
            dtype=info["dtype"], element_shape=info["element_shape"],
            counter=residual_names.index(info["counter"]),
        )
        for name, info in list_infos.items()
    }
    return residual_names, list_residuals, _residual_specs(graph, residual_names,
                                                           list_residuals)


def _residual_specs(graph, residual_names: list[str],
                    list_residuals: dict[int, ListResidual]) -> list[tf.TensorSpec]:
    """One spec per residual: a loop accumulator's as the stacked tensor that carries it; an
    ``If`` intermediate's with its rank only."""
    residual_specs = []
    for i, name in enumerate(residual_names):
        t = graph.get_tensor_by_name(name)
        if i in list_residuals:
            spec = list_residuals[i]
            if isinstance(spec.element_shape, int):  # -1: rank unknown
                residual_specs.append(tf.TensorSpec(None, spec.dtype))
            else:
                dims = [None if d < 0 else int(d) for d in spec.element_shape]
                residual_specs.append(tf.TensorSpec([None] + dims, spec.dtype))
            continue
        shape = t.shape
        if t.op.type in CONTROL_FLOW_OPS and shape.rank is not None:
            # An If's intermediate for the branch not taken has a made-up static shape
            # (a 0 where the batch goes): keep only the rank.
            shape = tf.TensorShape([None] * shape.rank)
        residual_specs.append(tf.TensorSpec(shape, t.dtype))
    return residual_specs


def _gradient_sources(plan: StagePlan, trace: _Trace, residual_names: list[str],
                      backward: set[str], num_inputs: int, diff_outputs: list[int],
                      diff_inputs: list[int]) -> tuple[list, list]:
    """Per stage input and per variable, where its gradient comes from: a tensor the backward
    returns, ``("cotangent", j)`` (the gradient is an output's cotangent itself),
    ``("residual", r)`` or ``None`` (no gradient)."""
    cot_ph = {op: diff_outputs[k] for k, op in enumerate(trace.cotangent_ops)}
    residual_index = {name: r for r, name in reversed(list(enumerate(residual_names)))}
    grad_names = trace.gradient_names

    def grad_source(name: str | None):
        if name is None:
            return None
        op = ir.parse_tensor_name(name)[0]
        if op in cot_ph:
            return ("cotangent", cot_ph[op])
        if name in residual_index:
            return ("residual", residual_index[name])
        return name

    n_diff_in = len(diff_inputs)
    input_gradients = [None] * num_inputs
    for k, i in enumerate(diff_inputs):
        input_gradients[i] = grad_source(grad_names[k])
    variable_gradients = [grad_source(n) for n in grad_names[n_diff_in:]]
    needed_returns = [s for s in input_gradients + variable_gradients if isinstance(s, str)]
    for name in needed_returns:
        if ir.parse_tensor_name(name)[0] not in backward:
            raise GradSplitError(  # pragma: no cover - a gradient that ignores its cotangent
                f"stage {plan.index}: gradient {name} does not depend on the cotangents."
            )
    return input_gradients, variable_gradients


def _split_backward(h: nx.MultiDiGraph, trace: _Trace, backward_ops: list[str],
                    residual_names: list[str], list_residuals: dict[int, ListResidual],
                    input_gradients: list, variable_gradients: list,
                    diff_outputs: list[int], pieces: _TracedPieces) -> SplitBackward:
    """The fused backward cut into B (what the input cotangents need) and W (the rest of
    what the variable gradients need); see ``SplitBackward``."""
    backward = set(backward_ops)
    order = {n: i for i, n in enumerate(h.nodes)}
    cot_ph = trace.cotangent_ops

    def ops_of(sources) -> set[str]:
        return {ir.parse_tensor_name(s)[0] for s in sources if isinstance(s, str)}

    b_ops = ir.ancestors(h, ops_of(input_gradients), within=backward)
    # B's real work (what reads a cotangent) is never repeated in W; the constants and
    # shape arithmetic both need are recomputed in each, as the fused backward does.
    b_work = b_ops & ir.descendants(h, set(cot_ph))
    w_ops = ir.ancestors(h, ops_of(variable_gradients), within=backward - b_work)
    residual_index = {name: r for r, name in reversed(list(enumerate(residual_names)))}
    cotangent_of = {op: diff_outputs[k] for k, op in enumerate(cot_ph)}
    carried: dict[str, int] = {}  # name -> position, in the order first read
    weight_inputs: dict[tuple[str, int], None] = {}  # an ordered set
    weight_keys: list[str] = []
    keyed: set[str] = set()

    def add(source: tuple[str, int], key: str) -> None:
        weight_inputs[source] = None
        weight_keys.append(key)
        keyed.add(key)

    def read(name: str) -> None:
        op = ir.parse_tensor_name(name)[0]
        if name in keyed or op in w_ops or op in trace.capture_kind:
            return
        if op in cotangent_of:
            add(("cotangent", cotangent_of[op]), name)
        elif op in b_work:
            add(("carried", carried.setdefault(name, len(carried))), name)
        else:
            add(("residual", residual_index[name]), name)

    pred = ir.predecessor_edges(h)
    for node in sorted(w_ops, key=order.__getitem__):
        edges = sorted((a["dst_input"], src, a["src_output"]) for src, keyed in pred[node].items()
                       for a in keyed.values() if not a["control"])
        for _, src, index in edges:
            read(ir.tensor_name(src, index))
    for source in variable_gradients:  # a gradient W only passes on
        if isinstance(source, str):
            if ir.parse_tensor_name(source)[0] not in w_ops:
                read(source)
        elif source is not None and tuple(source) not in weight_inputs:
            kind, j = source
            add(tuple(source), residual_names[j] if kind == "residual" else
                cot_ph[diff_outputs.index(j)] + ":0")
    for r, as_list in list_residuals.items():  # a loop accumulator needs its trip count
        if ("residual", r) in weight_inputs and ("residual", as_list.counter) not in \
                weight_inputs:
            add(("residual", as_list.counter), residual_names[as_list.counter])
    weight_inputs = list(weight_inputs)
    carried = list(carried)
    carried_specs = []
    for name in carried:
        t = trace.graph.get_tensor_by_name(name)
        shape = t.shape
        if t.op.type in CONTROL_FLOW_OPS and shape.rank is not None:
            shape = tf.TensorShape([None] * shape.rank)  # as for residuals: rank only
        carried_specs.append(tf.TensorSpec(shape, t.dtype))
    return SplitBackward(
        input_graph_def=pieces(sorted(b_ops, key=order.__getitem__)),
        weight_graph_def=pieces(sorted(w_ops, key=order.__getitem__)),
        carried_names=carried, carried_specs=carried_specs, weight_inputs=weight_inputs,
        weight_keys=weight_keys)


def _capture_keys(program: Program, plan: StagePlan, capture_kind: dict[str, Any]
                  ) -> tuple[dict[str, int], dict[str, Any]]:
    """The pieces' ``input_map`` keys of captured variables (-> variable index) and of other
    captured tensors (-> the tensor)."""
    variable_keys = {}
    capture_keys = {}
    by_handle = _stage_variables_by_handle(program, plan)
    for ph, external in capture_kind.items():
        idx = by_handle.get(id(external))
        if idx is not None:
            variable_keys[ph + ":0"] = idx
        else:
            capture_keys[ph + ":0"] = external
    return variable_keys, capture_keys


def _stage_variables_by_handle(program: Program, plan: StagePlan) -> dict[int, int]:
    """``id(handle)`` of each variable the stage reads -> its index in
    ``program.variables`` (the first, should two share a handle)."""
    found: dict[int, int] = {}
    for i in plan.variable_indices:
        found.setdefault(id(program.variables[i].handle), i)
    return found


def _unbounded_lists(graph) -> bool:
    """Whether a loop keeps values in a TensorList of unbounded size (no maximum_iterations):
    XLA cannot compile that."""
    for op in graph.get_operations():
        if op.type == "EmptyTensorList":
            size = tf.get_static_value(op.inputs[1])
            if size is None:
                if not _from_shapes(op.inputs[1]):
                    return True
            elif int(size) < 0:
                return True
    return False


_SHAPE_SOURCES = ("Shape", "ShapeN", "Size", "Rank", "VariableShape")


def _from_shapes(tensor) -> bool:
    """Whether ``tensor`` is integer arithmetic on constants and shapes only: unknown while
    tracing with a ``None`` batch, but a constant once XLA compiles for concrete shapes (a
    Keras RNN bounds its loop by the time dimension this way)."""
    seen = set()
    stack = [tensor.op]
    while stack:
        op = stack.pop()
        if op in seen:
            continue
        seen.add(op)
        if op.type == "Const" or op.type in _SHAPE_SOURCES:
            continue
        if op.type in ("Placeholder", "ReadVariableOp") or op.control_inputs or not op.outputs:
            return False
        if not all(t.dtype.is_integer or t.dtype == tf.bool for t in op.outputs):
            return False
        stack.extend(t.op for t in op.inputs)
    return True


def _list_accumulator(h: nx.MultiDiGraph, graph, name: str) -> dict | None:
    """For a ``While`` output that is a TensorList accumulator with a static element shape:
    its dtype, element shape and the loop's trip-count tensor; else ``None``."""
    op, index = ir.parse_tensor_name(name)
    if h.nodes[op]["op"] not in ("While", "StatelessWhile"):
        return None
    inputs = ir.data_inputs(h, op)
    if index >= len(inputs):
        return None
    init = graph.get_operation_by_name(inputs[index][0])
    if init.type not in ("EmptyTensorList", "TensorListReserve"):
        return None
    element_shape = tf.get_static_value(init.inputs[0])
    if element_shape is None:
        return None
    return {
        "dtype": init.get_attr("element_dtype"),
        "element_shape": [int(d) for d in np.atleast_1d(element_shape)]
        if np.ndim(element_shape) else int(element_shape),
        "counter": ir.tensor_name(op, 0),  # while_v2's first loop variable counts trips
    }


def external_inputs(piece: graph_pb2.GraphDef) -> frozenset[str]:
    """The tensors ``piece`` reads from outside itself, as ``"op:index"``."""
    members = {nd.name for nd in piece.node}
    found = set()
    for nd in piece.node:
        for inp in nd.input:
            if inp.startswith("^"):
                continue
            op, index = ir.parse_tensor_name(inp)
            if op not in members:
                found.add(ir.tensor_name(op, index))
    return frozenset(found)


def emit(piece: graph_pb2.GraphDef, input_map: dict, return_elements: list[str],
         name: str) -> list[tf.Tensor]:
    """Import ``piece`` into the function being traced; returns its return elements.

    ``input_map`` may hold more than the piece reads; only what it reads is mapped.
    """
    used = _external_cache.get(id(piece))
    if used is None or used[0] is not piece:
        used = (piece, external_inputs(piece))
        _external_cache[id(piece)] = used
    input_map = {k: v for k, v in input_map.items() if k in used[1]}
    if piece.library.function:
        piece = _tf_internal.with_fresh_function_names(piece)
    result = tf.graph_util.import_graph_def(
        piece, input_map=input_map, return_elements=return_elements or None, name=name
    )
    _tf_internal.register_functions(piece.library)
    return list(result or [])


_external_cache: dict[int, tuple] = {}


def capture_map(vjp: StageVJP, program: Program, variables: dict | None = None) -> dict:
    """input_map entries for the variable handles and other captures of a piece;
    ``variables`` maps variable indices to stand-ins (replicas on another device)."""
    variables = variables or {}
    mapping = {}
    for key, idx in vjp.variable_keys.items():
        var = variables.get(idx, program.variables[idx])
        mapping[key] = _tf_internal.capture_in_current_graph(var.handle)
    for key, external in vjp.capture_keys.items():
        mapping[key] = _tf_internal.capture_in_current_graph(external)
    return mapping
