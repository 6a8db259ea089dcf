"""Keras layer names -> the graph tensors that are their outputs.

Facts this relies on (Keras 3 TensorFlow backend, checked on Keras 3.15 / TF 2.21):

* ``Layer.__call__`` opens ``backend.name_scope(layer.name)`` twice per call (around the
  build, which makes no ops, and around ``call``), and each takes a unique scope name; so
  a call's ops live in ``<parent>/<name>_<k>`` with ``k >= 1``, and removing the last
  ``_<digits>`` gives back the layer name exactly. Scopes nest by call.
* A layer call's outputs are the tensors made in its scope and read outside it, plus
  tensors nobody reads (the Softmax when the loss takes the logits); the last of those in
  data-flow order are kept.
* Layers without ops (``InputLayer``, pass-through layers) are resolved from the
  functional model's topology.

Keras internals used (read only, through ``gradsplit_compiler._tf_internal``):
``Layer._flatten_layers``, ``Sequential._functional``, ``Functional._nodes_by_depth``,
``KerasTensor._keras_history``; and TensorFlow's ``Operation._control_outputs``.
"""

from __future__ import annotations

import re
from collections import defaultdict

import networkx as nx
import tensorflow as tf

from gradsplit_compiler import _tf_internal, ir
from gradsplit_compiler.ir import from_networkx

__all__ = ["keras_layer_calls", "keras_layer_outputs", "layer_names", "layer_outputs"]

_SUFFIX = re.compile(r"^(.*)_(\d+)$")
_SKIP_OPS = {"Const", "NoOp", "VarHandleOp", "ReadVariableOp", "Placeholder",
             "AssignVariableOp", "AssignAddVariableOp", "AssignSubVariableOp",
             "ResourceGather"}
_BAD_DTYPES = {tf.resource, tf.variant, tf.string}


def _strip(comp):
    m = _SUFFIX.match(comp)
    return (m.group(1), int(m.group(2))) if m else (None, None)


_sublayers = _tf_internal.sublayers


class _Tensor:
    """What the index reads of a ``tf.Tensor``, from the IR."""

    __slots__ = ("_consumers", "dtype", "name", "op")

    def __init__(self, name, dtype, op):
        self.name, self.dtype, self.op, self._consumers = name, dtype, op, []

    def consumers(self):
        return self._consumers


class _Op:
    """What the index reads of a ``tf.Operation``, from the IR."""

    __slots__ = ("control_outputs", "inputs", "name", "outputs", "type")

    def __init__(self, name, kind):
        self.name, self.type = name, kind
        self.inputs, self.outputs, self.control_outputs = [], [], False


def _ops_of(g) -> list[_Op] | None:
    """The IR ``g`` as ``_Op``s in node order, or ``None`` when a dtype is unknown (then
    the index imports the graph into TensorFlow instead)."""
    attrs = ir.node_attributes(g)
    ops = {}
    for name, a in attrs.items():
        op = ops[name] = _Op(name, a["op"])
        for k, (dtype, _shape) in enumerate(a["outputs"] or ()):
            if dtype is None:
                return None
            op.outputs.append(_Tensor(ir.tensor_name(name, k), dtype, op))
    for name, preds in ir.predecessor_edges(g).items():
        op = ops[name]
        data = []
        for src, edges in preds.items():
            for e in edges.values():
                if e["control"]:
                    ops[src].control_outputs = True
                    continue
                outputs = ops[src].outputs
                if e["src_output"] >= len(outputs):
                    return None
                data.append((e["dst_input"], outputs[e["src_output"]]))
        data.sort(key=lambda d: d[0])
        op.inputs = [t for _, t in data]
        for _, t in data:
            t._consumers.append(op)
    return list(ops.values())


class _GraphIndex:
    def __init__(self, graph):
        """``graph``: the program's IR (read as it is) or a GraphDef (imported)."""
        ops = _ops_of(graph) if isinstance(graph, nx.MultiDiGraph) else None
        if ops is None:
            if isinstance(graph, nx.MultiDiGraph):
                graph = from_networkx(graph)
            g = tf.Graph()
            with g.as_default():
                tf.graph_util.import_graph_def(graph, name="")
            ops = g.get_operations()
        self.ops = ops                         # creation order
        self.order = {op.name: i for i, op in enumerate(self.ops)}
        self.children = defaultdict(list)      # scope -> child comps (ordered)
        self.scopes = set()
        self.ops_in = defaultdict(list)        # scope -> ops under it (recursive)
        for op in self.ops:
            scope = ""  # each enclosing scope of the op, outermost first
            for part in op.name.split("/")[:-1]:
                parent, scope = scope, f"{scope}/{part}" if scope else part
                if scope not in self.scopes:
                    self.scopes.add(scope)
                    self.children[parent].append(part)
                self.ops_in[scope].append(op)

    def release(self) -> None:
        """Drop what the index holds and unlink its ops and tensors (each refers to the
        other), so that they are freed now instead of being left to the cycle collector,
        which ``gsc.split`` runs once at its end over everything the split made."""
        for op in self.ops:
            if isinstance(op, _Op):
                op.inputs = op.outputs = ()
        self.ops = []
        for table in (self.order, self.children, self.scopes, self.ops_in):
            table.clear()

    @staticmethod
    def inside(name, scope):
        return name.startswith(scope + "/")

    def scope_outputs(self, scope):
        ops = self.ops_in.get(scope, [])
        cands, dangling = [], []
        for op in ops:
            if op.type in _SKIP_OPS:
                continue
            outs = [t for t in op.outputs if t.dtype.base_dtype not in _BAD_DTYPES]
            if not outs:
                continue
            op_consumed = (any(t.consumers() for t in op.outputs)
                           or (op.control_outputs if isinstance(op, _Op)
                               else _tf_internal.has_control_outputs(op)))
            for t in outs:
                cons = t.consumers()
                if any(not self.inside(c.name, scope) for c in cons):
                    cands.append(t)
                elif not op_consumed:          # dangling op (e.g. unused Softmax)
                    dangling.append(t)
        # A dangling op is an output when it follows from what the layer computes (the
        # Softmax after logits the loss reads) or when nothing else leaves the layer; one
        # that does not follow from a tensor read outside is a leftover (a Keras RNN
        # traces its step once outside its loop and leaves those ops unused).
        if cands and dangling:
            after = self.downstream([t.op for t in cands], scope)
            dangling = [t for t in dangling if t.op.name in after]
        cands = cands + dangling
        if len(cands) <= 1:
            return cands
        # keep maximal candidates: drop t if it reaches another candidate in S
        cand_ops = {t.op.name for t in cands}
        keep = []
        for t in cands:
            seen, stack, reaches = set(), [c for c in t.consumers()], False
            while stack and not reaches:
                o = stack.pop()
                if o.name in seen or not self.inside(o.name, scope):
                    continue
                seen.add(o.name)
                if o.name in cand_ops and o is not t.op:
                    reaches = True
                    break
                for ot in o.outputs:
                    stack.extend(ot.consumers())
            if not reaches:
                keep.append(t)
        return keep

    def downstream(self, ops, scope):
        """Names of the ops of ``scope`` that ``ops`` reach through data edges."""
        seen, stack = set(), list(ops)
        while stack:
            op = stack.pop()
            if op.name in seen or not self.inside(op.name, scope):
                continue
            seen.add(op.name)
            for t in op.outputs:
                stack.extend(t.consumers())
        return seen

    def external_inputs(self, scope):
        res = []
        for op in self.ops_in.get(scope, []):
            for t in op.inputs:
                if not self.inside(t.op.name, scope) and t.dtype.base_dtype not in _BAD_DTYPES \
                        and t.op.type != "Const" and t not in res:
                    res.append(t)
        return res


_functional_of = _tf_internal.functional_of


def keras_layer_calls(graph_def, model, root_scope=None):
    """Detailed version: list of dicts
    {layer, name, scope, parent, outputs, how} -- one per layer call. ``graph_def``: a
    GraphDef, the IR of one (``networkx.MultiDiGraph``) or an index of either."""
    if isinstance(graph_def, _GraphIndex):
        return _layer_calls(graph_def, model, root_scope)
    gi = _GraphIndex(graph_def)
    try:
        return _layer_calls(gi, model, root_scope)
    finally:
        gi.release()


def _layer_calls(gi, model, root_scope):
    calls = []
    by_layer = defaultdict(list)

    def add(layer, scope, parent, outputs, how):
        info = dict(layer=layer, name=layer.name, scope=scope, parent=parent,
                    outputs=outputs, how=how)
        calls.append(info)
        by_layer[id(layer)].append(info)
        return info

    def find_calls(scope, layer):
        """Call scopes of direct sublayers of `layer` below `scope`."""
        subs = {s.name: s for s in _sublayers(layer)}
        found, stack = [], [scope]
        while stack:
            s = stack.pop()
            for comp in gi.children.get(s, []):
                child = f"{s}/{comp}" if s else comp
                base, k = _strip(comp)
                if base in subs:
                    found.append((subs[base], k, child))
                else:
                    stack.append(child)       # tf-internal / user name scope
        found.sort(key=lambda x: gi.order[gi.ops_in[x[2]][0].name])
        return found

    def visit(layer, scope, parent):
        add(layer, scope, parent, [t.name for t in gi.scope_outputs(scope)], "scope")
        for sub, _k, child in find_calls(scope, layer):
            visit(sub, child, scope)

    # 1. top-level call scope(s)
    if root_scope is not None:
        roots = [root_scope]
    else:
        roots = [s for s in gi.scopes if _strip(s.split("/")[-1])[0] == model.name]
        if roots:
            depth = min(r.count("/") for r in roots)
            roots = [r for r in roots if r.count("/") == depth]
        roots.sort(key=lambda s: gi.order[gi.ops_in[s][0].name])
    for r in roots:
        visit(model, r, None)

    # 4. layers without ops (InputLayer, pass-through) via functional topology
    def fill(m, mscope):
        f = _functional_of(m)
        if f is not None:
            kt2name = {}
            # model inputs = non-const tensors entering the model scope
            ext = [t.name for t in gi.external_inputs(mscope)]
            if len(f.inputs) == len(ext):   # exact for 1 input; >1: by first use
                for kt, tn in zip(f.inputs, ext):
                    kt2name[id(kt)] = tn
                    il = _tf_internal.input_layer_of(kt)
                    if not any(c["parent"] == mscope for c in by_layer.get(id(il), [])):
                        add(il, None, mscope, [tn], "model-input")
            used = defaultdict(int)
            by_depth = _tf_internal.nodes_by_depth(f)
            for depth in sorted(by_depth, reverse=True):
                for node in by_depth[depth]:
                    op = node.operation
                    if node.is_input:
                        continue
                    mine = [c for c in by_layer.get(id(op), [])
                            if c["parent"] == mscope and c["scope"]]
                    i = used[id(op)]
                    used[id(op)] += 1
                    if i < len(mine):
                        outs = mine[i]["outputs"]
                        if len(outs) == len(node.outputs):
                            for kt, tn in zip(node.outputs, outs):
                                kt2name[id(kt)] = tn
                        continue
                    ins = [kt2name.get(id(x)) for x in node.input_tensors]
                    if len(ins) == 1 and ins[0] and len(node.outputs) == 1:
                        kt2name[id(node.outputs[0])] = ins[0]
                        add(op, None, mscope, [ins[0]], "pass-through (no ops)")
        for c in list(calls):
            if c["parent"] == mscope and c["scope"] and _sublayers(c["layer"]):
                fill(c["layer"], c["scope"])

    for r in roots:
        fill(model, r)
    return calls


def keras_layer_outputs(graph_def, model, root_scope=None):
    """{layer_name: [tensor_name, ...]} (one entry per call and output, in call
    order).  Nested models' layers are included; if two layers in different
    nested models share a name, the later one is keyed '<parent>/<name>'."""
    res = {}
    owner = {}
    for c in keras_layer_calls(graph_def, model, root_scope):
        key = c["name"]
        if key in owner and owner[key] is not c["layer"]:
            parent = (c["scope"] or "").rsplit("/", 1)[0].split("/")[-1]
            key = f"{_strip(parent)[0] or parent}/{key}"
        owner.setdefault(key, c["layer"])
        res.setdefault(key, []).extend(c["outputs"])
    return res


def layer_names(models: list) -> set[str]:
    """Names of every layer of ``models``, nested models included (cheap: no graph work)."""
    names: set[str] = set()
    stack = list(models)
    while stack:
        layer = stack.pop()
        for sub in _sublayers(layer):
            if sub.name not in names:
                names.add(sub.name)
                stack.append(sub)
    return names


def layer_outputs(g, models: list) -> dict[str, list[str]]:
    """``{layer name: [tensor, ...]}`` for every layer of ``models`` called in graph ``g``."""
    if not models:
        return {}
    index = _GraphIndex(g)  # read from the IR: no import into TensorFlow
    found: dict[str, list[str]] = {}
    try:
        for model in models:
            for name, tensors in keras_layer_outputs(index, model).items():
                found.setdefault(name, [])
                found[name].extend(t for t in tensors if t not in found[name])
    finally:
        index.release()
    return found
