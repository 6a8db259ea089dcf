"""Custom gradients that survive the graph being cut and imported again.

``tf.custom_gradient`` (``tf.nn.silu``, the swish of EfficientNet, ``tf.recompute_grad``...)
registers a Python gradient function under a name the op carries in its
``_gradient_op_type`` attribute. That function closes over tensors of the graph it was
traced in: called on a copy of the op imported into another graph (a stage traced with its
gradient), it reaches for tensors of the old graph and fails ("... is out of scope").

At capture, each such gradient is traced as a function of the op's cotangents inside the
original graph, where the tensors it closes over become explicit captures; it is registered
under a name of its own, and the op is pointed at that name. Called later on an imported
copy, it finds those tensors by name in the graph being traced (the stage's ops keep their
names; a stage input is looked up through ``names_in_trace``) and calls the traced function
on them: the gradient TensorFlow would have built, in the new graph.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator

import tensorflow as tf
from tensorflow.core.framework import graph_pb2

from gradsplit_compiler import _tf_internal
from gradsplit_compiler.errors import GradSplitError

_ids = itertools.count(1)
_ACTIVE: list[dict] = []  # original tensor name -> tensor standing for it in the trace


@contextlib.contextmanager
def names_in_trace(mapping: dict) -> Iterator[None]:
    """While tracing a stage: ``mapping`` from original tensor names (the stage's inputs)
    to the tensors that stand for them in the graph being traced."""
    _ACTIVE.append(mapping)
    try:
        yield
    finally:
        _ACTIVE.pop()


def make_portable(graph, graph_def: graph_pb2.GraphDef) -> int:
    """Re-register the custom gradients of ``graph``'s ops so that they work on imported
    copies; rewrite their ``_gradient_op_type`` in ``graph_def``. Returns how many."""
    nodes = {nd.name: nd for nd in graph_def.node}
    count = 0
    for op in graph.get_operations():
        if op.name not in nodes or "_gradient_op_type" not in nodes[op.name].attr:
            continue
        kind = nodes[op.name].attr["_gradient_op_type"].s.decode()
        grad_fn = _tf_internal.registered_gradient(kind)
        if grad_fn is None:
            continue
        specs = [tf.TensorSpec(t.shape, t.dtype) for t in op.outputs]
        with graph.as_default():
            traced = tf.function(lambda *dys, op=op, fn=grad_fn: fn(op, *dys),
                                 autograph=False).get_concrete_function(*specs)
        externals = []
        for external, _ in traced.graph.captures:
            if getattr(external, "graph", None) is graph:
                externals.append(("name", external.name))
            else:
                externals.append(("value", external))
        name = f"gsc.portable_gradient.{next(_ids)}"
        tf.RegisterGradient(name)(_portable(traced, externals, kind))
        nodes[op.name].attr["_gradient_op_type"].s = name.encode()
        count += 1
    return count


def _portable(traced, externals: list, kind: str):
    def gradient(op, *cotangents):
        mapping = _ACTIVE[-1] if _ACTIVE else {}
        graph = op.graph
        captured = []
        for how, ref in externals:
            if how == "value":
                captured.append(_tf_internal.capture_in_current_graph(ref))
                continue
            tensor = mapping.get(ref)
            if tensor is None:
                try:
                    tensor = graph.get_tensor_by_name(ref)
                except (KeyError, ValueError):
                    raise GradSplitError(
                        f"the custom gradient of op {op.name!r} ({kind}) reads tensor {ref!r}, "
                        "which is not in the stage being differentiated. Move the cut so "
                        f"that {ref!r} and {op.name!r} are in the same stage."
                    ) from None
            captured.append(tensor)
        cotangents = [tf.zeros_like(t) if c is None else c
                      for c, t in zip(cotangents, op.outputs)]
        return list(traced._call_flat(list(cotangents), captured))

    return gradient
