"""Every private TensorFlow API gradsplit_compiler touches, in one place.

Checked on TensorFlow 2.16 to 2.21. Each helper names the API it wraps; tests in
``tests/core/test_tf_internal.py`` pin their behaviour so an upgrade that breaks one shows here.
"""

from __future__ import annotations

import itertools
import re

import tensorflow as tf
from tensorflow.core.framework import graph_pb2
from tensorflow.core.function.polymorphism import function_type as _function_type
from tensorflow.python.eager import context as _context
from tensorflow.python.eager.polymorphic_function import atomic_function as _atomic
from tensorflow.python.framework import function_def_to_graph as _fdef_to_graph

_SUFFIX = re.compile(r"_gsc\d+$")


def function_body_graph_def(fdef):
    """``function_def_to_graph.function_def_to_graph_def``: a FunctionDef as a GraphDef.

    Returns ``(graph_def, flat_names)``: arguments become ``Placeholder`` nodes named after
    the input args, and ``flat_names`` maps FunctionDef tensor names (``op:out_arg:i``) to
    GraphDef names (``op:j``).
    """
    return _fdef_to_graph.function_def_to_graph_def(fdef)


def capture_in_current_graph(tensor: tf.Tensor) -> tf.Tensor:
    """``FuncGraph.capture``: the placeholder standing for eager ``tensor`` in the trace."""
    graph = tf.compat.v1.get_default_graph()
    return graph.capture(tensor)


_fresh = itertools.count(1)


def with_fresh_function_names(piece: graph_pb2.GraphDef) -> graph_pb2.GraphDef:
    """A copy of ``piece`` whose library functions (and every reference to them) carry a
    new unique suffix.

    Why: importing a library function under a name the process already knows with a
    different body fails ("Attempting to add a duplicate function with name ... where the
    previous and current definitions differ"), and gradient construction rewrites ``If`` /
    ``While`` bodies under derived names, so each import gets names of its own.
    """
    names = {f.signature.name for f in piece.library.function}
    suffix = f"_gsc{next(_fresh)}"
    copy = graph_pb2.GraphDef()
    copy.CopyFrom(piece)

    def rename(name: str) -> str:
        base = _SUFFIX.sub("", name)
        return base + suffix if name in names else name

    def fix_attr(value) -> None:
        if value.HasField("func"):
            value.func.name = rename(value.func.name)
            for inner in value.func.attr.values():
                fix_attr(inner)
        if value.HasField("list"):
            for func in value.list.func:
                func.name = rename(func.name)

    def fix_nodes(nodes) -> None:
        for nd in nodes:
            if nd.op in names:
                nd.op = rename(nd.op)
            for value in nd.attr.values():
                fix_attr(value)

    fix_nodes(copy.node)
    for fdef in copy.library.function:
        fdef.signature.name = rename(fdef.signature.name)
        fix_nodes(fdef.node_def)
    for grad in copy.library.gradient:
        grad.function_name = rename(grad.function_name)
        grad.gradient_func = rename(grad.gradient_func)
    return copy


def register_functions(library) -> None:
    """``atomic_function.from_function_def``: make imported library functions callable
    eagerly, for as long as the function being traced lives.

    ``import_graph_def`` adds them to the graph only (as ``_DefinedFunction``s); a piece that
    is imported but not differentiated otherwise fails at call time with "Function ... is
    not defined". Registered through an ``AtomicFunction`` that replaces the graph's
    ``_DefinedFunction`` entry (same definition, already in the C graph), they become
    children of the traced function: TensorFlow's reference counting removes them from the
    eager context when the last function using them is deleted, instead of keeping every
    copy for the life of the process.
    """
    ctx = _context.context()
    graph = tf.compat.v1.get_default_graph()
    for fdef in library.function:
        name = fdef.signature.name
        if ctx.has_function(name):
            continue
        atomic = _atomic.from_function_def(fdef, _function_type.FunctionType([]))
        if graph._is_function(name):
            graph._functions[name] = atomic
        else:  # imported outside any graph that outlives this call: keep it for good
            _KEPT.append(atomic)


_KEPT: list = []


def flat_caller(function):
    """``ConcreteFunction._call_flat``: call a ``tf.function`` that has an input signature
    on a flat list of tensors, skipping the per-call argument binding.

    Why: ``tf.function.__call__`` canonicalises and type-checks every argument against its
    signature on every call (about 0.5 ms for a stage with 40 residuals); a stage driver that
    already holds tensors of the right specs does not need that. Returns
    ``call(*flat_tensors) -> structured outputs``; the caller is responsible for passing
    tensors in the signature's flattened order with matching dtypes.
    """
    concrete = function.get_concrete_function()

    def call(*flat):
        return concrete._call_flat(list(flat), concrete.captured_inputs)

    return call


def registered_gradient(name: str):
    """``ops._gradient_registry.lookup``: the Python gradient function registered under
    ``name`` (a ``tf.custom_gradient``'s ``_gradient_op_type``), or ``None``."""
    from tensorflow.python.framework import ops

    try:
        return ops._gradient_registry.lookup(name)
    except LookupError:
        return None
