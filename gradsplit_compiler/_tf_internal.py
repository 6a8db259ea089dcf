"""Every private TensorFlow and Keras API gradsplit_compiler touches, in one place.

Checked on TensorFlow 2.16 to 2.21 and Keras 3.15 (the TensorFlow backend); no other module
of the package (``tests/test_boundary.py`` checks it) reads a private attribute of TensorFlow
or Keras, or imports ``tensorflow.python`` / ``keras.src``. Each helper names the API it wraps;
``tests/core/test_tf_internal.py`` pins their behaviour so that an upgrade that breaks one
shows there.

TensorFlow
    - ``function_body_graph_def``: ``function_def_to_graph.function_def_to_graph_def``
    - ``capture_in_current_graph``: ``FuncGraph.capture``
    - ``scratch_graph``: ``func_graph.FuncGraph``, ``control_flow_ops.XLAControlFlowContext``
    - ``with_fresh_function_names``: no private API; why it exists is TensorFlow's rule on
      duplicate function names
    - ``register_functions``: ``atomic_function.from_function_def``, ``context.context()``,
      ``Graph._is_function``, ``Graph._functions``
    - ``call_flat`` / ``flat_caller``: ``ConcreteFunction._call_flat``,
      ``ConcreteFunction._captured_inputs``, ``record.could_possibly_record``
    - ``registered_gradient``: ``ops._gradient_registry``
    - ``skip_underived_inputs``: ``Operation.skip_input_indices`` (what ``tf.GradientTape``
      hands the gradient functions), ``ops._gradient_registry``, ``backprop_util.IsTrainable``
    - ``vjp_on_tape``: ``record.record_operation``, ``ops.get_gradient_function``,
      ``Operation._id``, ``Operation._gradient_function``, ``Graph._is_function``, and
      what ``skip_underived_inputs`` uses
    - ``has_control_outputs``: ``Operation._control_outputs``
    - ``shape_dims``: ``TensorShape._dims``
    - ``connected_server_def``: ``context.context()._server_def``
    - ``pin_registered_functions``: ``atomic_function.RUNTIME_FUNCTION_REFS``
    - ``op_def``: ``op_def_registry.get``
    - ``eager_function_names``: ``context.context().list_function_names``
    - ``record_variable_read``: ``resource_variable_ops.variable_accessed``
    - ``copy_handle_data``: ``handle_data_util.copy_handle_data``

Keras
    - ``sublayers``: ``Layer._flatten_layers``
    - ``functional_of``: ``Sequential._functional``, ``Functional._nodes_by_depth``
    - ``nodes_by_depth``: ``Functional._nodes_by_depth``
    - ``input_layer_of``: ``KerasTensor._keras_history``
"""

from __future__ import annotations

import contextlib
import itertools
import re

import tensorflow as tf
from tensorflow.core.framework import graph_pb2
from tensorflow.core.function.polymorphism import function_type as _function_type
from tensorflow.python.eager import context as _context
from tensorflow.python.eager import record as _record
from tensorflow.python.eager.polymorphic_function import atomic_function as _atomic
from tensorflow.python.framework import func_graph as _func_graph
from tensorflow.python.framework import function_def_to_graph as _fdef_to_graph
from tensorflow.python.framework import op_def_registry as _op_def_registry
from tensorflow.python.ops import control_flow_ops as _control_flow_ops
from tensorflow.python.ops import handle_data_util as _handle_data_util
from tensorflow.python.ops import resource_variable_ops as _resource_variable_ops

__all__ = [
    "call_flat",
    "capture_in_current_graph",
    "connected_server_def",
    "copy_handle_data",
    "eager_function_names",
    "flat_caller",
    "function_body_graph_def",
    "functional_of",
    "has_control_outputs",
    "input_layer_of",
    "nodes_by_depth",
    "op_def",
    "pin_registered_functions",
    "record_variable_read",
    "register_functions",
    "registered_gradient",
    "scratch_graph",
    "shape_dims",
    "skip_underived_inputs",
    "sublayers",
    "vjp_on_tape",
    "with_fresh_function_names",
]

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


@contextlib.contextmanager
def scratch_graph(name: str, xla: bool):
    """``func_graph.FuncGraph`` (with ``control_flow_ops.XLAControlFlowContext`` when ``xla``):
    a function graph as the default graph, to build ops in and read back, never called.

    What ``tf.function(..., jit_compile=xla).get_concrete_function`` traces into (so
    ``tf.gradients`` builds control flow as XLA needs it when ``xla``, and eager tensors are
    captured), without what only a callable function needs: automatic control dependencies
    between its stateful ops, an ``Identity`` per output and the function's definition.
    Those cost a third as much as ``tf.gradients`` itself on a chain of dense layers.
    """
    graph = _func_graph.FuncGraph(name)
    with graph.as_default():
        context = _control_flow_ops.XLAControlFlowContext() if xla else None
        if context is not None:
            context.Enter()
        try:
            yield graph
        finally:
            if context is not None:
                context.Exit()


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


def call_flat(concrete, args: list, captured: list | None = None):
    """``ConcreteFunction._call_flat`` (TF 2.16-2.21): run ``concrete`` on ``args``, a flat
    list of tensors in its signature's order, and ``captured`` (default: its own
    ``captured_inputs``), without ``tf.function``'s per-call argument binding. Returns the
    structured outputs."""
    return concrete._call_flat(
        args, concrete.captured_inputs if captured is None else captured)


def flat_caller(function, *trace_args):
    """``ConcreteFunction._call_flat``: call a ``tf.function`` that has an input signature
    (or its concrete function for ``trace_args``) on a flat list of tensors, skipping the
    per-call argument binding.

    Why: ``tf.function.__call__`` canonicalises and type-checks every argument against its
    signature on every call (about 0.5 ms for a stage with 40 residuals); a stage driver that
    already holds tensors of the right specs does not need that. Returns
    ``call(*flat_tensors) -> structured outputs``; the caller is responsible for passing
    tensors in the signature's flattened order with matching dtypes.

    Eagerly and with no gradient tape recording (``record.could_possibly_record``), the
    call goes straight to the concrete function's ``inference_fn.call_flat`` (what
    ``_call_flat`` itself does then) with the captured inputs read once (the variables'
    handles; ``captured_inputs`` flattens them again on every call) and the outputs put
    back in their structure by a packer made once for it (``FunctionType.pack_output``
    builds a trace type per output, ``tf.nest.pack_sequence_as`` checks every level's type
    again): about 40 us less per call. Functions whose outputs or captures are not plain
    tensors in lists, tuples and dicts (composites, resources, named tuples, captures read
    at call time) always take ``_call_flat``.
    """
    concrete = function.get_concrete_function(*trace_args)

    def call(*flat):
        return call_flat(concrete, list(flat))

    pack = _packer(concrete.structured_outputs)
    if pack is None or any(callable(c) for c in concrete._captured_inputs):
        return call
    inference, captured = concrete.inference_fn, list(concrete.captured_inputs)

    def fast(*flat):
        if not tf.executing_eagerly() or _record.could_possibly_record():
            return call(*flat)
        outputs = inference.call_flat(*flat, *captured)  # None when there are none
        return pack(iter(outputs or ()))

    return fast


def _packer(structure):
    """``pack(iterator of flat outputs) -> structure`` for a function's structured outputs
    made of tensors and ``None`` in lists, tuples and dicts (``tf.nest``'s order: a dict's
    values by sorted key); ``None`` for anything else."""
    if structure is None:
        return lambda flat: None
    if isinstance(structure, tf.Tensor):
        return None if structure.dtype in (tf.resource, tf.variant) else next
    if type(structure) in (list, tuple):
        parts = [_packer(s) for s in structure]
        if any(p is None for p in parts):
            return None
        kind = type(structure)
        return lambda flat: kind([p(flat) for p in parts])
    if type(structure) is dict:
        try:
            keys = sorted(structure)
        except TypeError:
            return None
        parts = [_packer(structure[k]) for k in keys]
        if any(p is None for p in parts):
            return None
        order = list(structure)

        def pack_dict(flat):
            got = {k: p(flat) for k, p in zip(keys, parts)}
            return {k: got[k] for k in order}

        return pack_dict
    return None


def registered_gradient(name: str):
    """``ops._gradient_registry.lookup``: the Python gradient function registered under
    ``name`` (a ``tf.custom_gradient``'s ``_gradient_op_type``), or ``None``."""
    from tensorflow.python.framework import ops

    try:
        return ops._gradient_registry.lookup(name)
    except LookupError:
        return None


def skip_underived_inputs(xs: list[tf.Tensor]) -> int:
    """Before ``tf.gradients(ys, xs)``: tell the gradient function of every op that depends on
    ``xs`` which of its inputs do not (``skip_input_indices``, what ``tf.GradientTape`` hands
    them as well); returns how many ops were told.

    Why: ``tf.gradients`` builds every input's gradient of every op it visits, also of inputs
    no ``x`` flows into (a constant factor, the mean that ``tf.nn.moments`` stops the gradient
    of), and drops them; the gradient functions of broadcasting arithmetic (``Mul``,
    ``Sub``, ``SquaredDifference``, ``MatMul``...) and of ``While`` (its captures) skip what
    they are told to, as under a tape. Only inputs whose gradient nobody reads are skipped,
    so the gradients are the same. A tensor depends on ``xs`` through a trainable dtype and
    an op with a gradient (``tf.stop_gradient``, ``tf.shape``... stop it). Checked on
    TensorFlow 2.16 to 2.21.
    """
    return sum(1 for op in _derived_ops(xs) if getattr(op, "skip_input_indices", None))


def _derived_ops(xs: list[tf.Tensor]) -> list:
    """The ops that read a tensor derived from ``xs`` (see ``skip_underived_inputs``), in
    the order they were added to the graph, each told which of its inputs are not
    derived."""
    from tensorflow.python.eager import backprop_util
    from tensorflow.python.framework import ops

    registry = ops._gradient_registry
    stops: dict[str, bool] = {}  # op type -> whether it has no gradient

    def stops_gradient(op) -> bool:
        kind = op.type
        if kind not in stops:
            try:
                stops[kind] = registry.lookup(kind) is None
            except LookupError:  # a function call or an op with no gradient: not ours
                stops[kind] = False
        if not stops[kind]:
            return False
        return "_gradient_op_type" not in op.node_def.attr  # a custom gradient instead

    derived = {id(x) for x in xs}
    keep = list(xs)  # the ids above stay valid while the tensors live
    stack = list(xs)
    visited: dict[int, tf.Operation] = {}
    while stack:
        tensor = stack.pop()
        for op in tensor.consumers():
            if id(op) in visited:
                continue
            visited[id(op)] = op
            if stops_gradient(op):
                continue
            for out in op.outputs:
                if id(out) not in derived and backprop_util.IsTrainable(out):
                    derived.add(id(out))
                    keep.append(out)
                    stack.append(out)
    found = sorted(visited.values(), key=lambda op: op._id)
    for op in found:
        skip = tuple(i for i, t in enumerate(op.inputs) if id(t) not in derived)
        if skip:
            op.skip_input_indices = skip
    return found


# Ops whose gradients need what only ``tf.gradients`` keeps: the state of TF1 while loops,
# and ``SymbolicGradient`` for function calls without a Python gradient.
_TF_GRADIENTS_ONLY = frozenset({
    "Enter", "RefEnter", "Exit", "RefExit", "Switch", "RefSwitch", "Merge", "RefMerge",
    "NextIteration", "RefNextIteration", "LoopCond", "PartitionedCall",
    "StatefulPartitionedCall", "SymbolicGradient",
})


def vjp_on_tape(ys: list[tf.Tensor], xs: list[tf.Tensor], grad_ys: list[tf.Tensor],
                name: str) -> list | None:
    """``tf.gradients(ys, xs, grad_ys)`` of ops already in the graph being traced (an
    imported stage), built by ``tf.GradientTape`` instead: each op that depends on ``xs``
    is recorded on a tape (``record.record_operation``, in graph order) with a backward
    function that calls the op's registered gradient on the op itself, as ``tf.gradients``
    does (``ops.get_gradient_function``: a custom gradient's ``_gradient_op_type`` too),
    and sets the static shape of each input's gradient as ``tf.gradients`` does; then
    ``tape.gradient(ys, xs, output_gradients=grad_ys)`` under the name scope ``name`` (each
    cotangent through an ``Identity`` first, as ``tf.gradients`` does).

    The ops are told their underived inputs first (``skip_underived_inputs``). An op with no
    registered gradient fails as under ``tf.gradients`` (``LookupError``), once a gradient
    reaches it. Returns ``None``, building nothing, when an op between needs what only
    ``tf.gradients`` has (a TF1 loop's ``Enter``/``Exit``..., a function call: then
    ``tf.gradients`` should build it; the ops were told their underived inputs already).

    Why: ``tf.gradients`` spends a quarter more than the tape on the same gradient
    functions (per op: name scopes, colocation with the forward op, XLA attributes, a
    pending count, aggregation); recording an imported op costs a few microseconds.
    What differs from ``tf.gradients``: as under a tape in a ``tf.function``, a missing
    output gradient of an op that receives another is zeros whatever its dtype (``None``
    for a resource), and gradients that meet are added in the order the tape reaches
    them. Checked on TensorFlow 2.16 to 2.21.
    """
    from tensorflow.python.eager import record
    from tensorflow.python.framework import ops

    graph = tf.compat.v1.get_default_graph()
    found = _derived_ops(xs)
    recorded = []
    for op in found:
        if op.type in _TF_GRADIENTS_ONLY or graph._is_function(op.type):
            return None
        if not op.outputs:
            continue
        try:
            gradient = ops.get_gradient_function(op)
        except LookupError as exc:
            gradient = _no_gradient(op, exc)
        if gradient is not None:
            recorded.append((op, gradient))
    tape = tf.GradientTape(persistent=False, watch_accessed_variables=False)
    with tape:
        tape.watch(xs)
        for op, gradient in recorded:
            record.record_operation(op.type, op.outputs, op.inputs,
                                    _backward_function(op, gradient))
    with tf.name_scope(name):
        # As tf.gradients: an op of its own per cotangent, which the gradient formulas
        # that wait for theirs (a control dependency) wait for, and the gradient of an x
        # that is also a y.
        grad_ys = [tf.identity(g, name=f"grad_ys_{i}") for i, g in enumerate(grad_ys)]
        return tape.gradient(ys, xs, output_gradients=grad_ys)


def _backward_function(op, gradient):
    inputs = list(op.inputs)  # as recorded: a While's gradient adds inputs to the While

    def backward(*output_gradients):
        grads = gradient(op, *output_gradients)
        grads = list(grads) if isinstance(grads, (list, tuple)) else [grads]
        if len(grads) != len(inputs):
            raise ValueError(f"The gradient function of {op.name} ({op.type}) returned "
                             f"{len(grads)} gradients for {len(inputs)} inputs")
        for x, grad in zip(inputs, grads):
            if isinstance(grad, tf.Tensor) and x.dtype != tf.resource:
                grad.set_shape(x.shape)
        return grads

    return backward


def _no_gradient(op, exc: LookupError):
    def gradient(*_):
        raise LookupError(
            f"No gradient defined for operation'{op.name}' (op type: {op.type}). "
            "In general every operation must have an associated `@tf.RegisterGradient` "
            "for correct autodiff, which this op is lacking.") from exc

    return gradient


def connected_server_def():
    """``context.context()._server_def``: the ``tensorflow.ServerDef`` this process joined a
    cluster with (``tf.config.experimental_connect_to_cluster``), or ``None`` when it joined
    none.

    Why: TensorFlow has no public way to ask the eager context which cluster it is connected
    to. A pipeline reads the tasks' ``host:port`` from it (a task whose port refuses
    connections is dead) and keys its variable replicas on a task by its serialized form (a
    restarted cluster has the same device names but none of the old variables). Checked on
    TensorFlow 2.21.
    """
    return getattr(_context.context(), "_server_def", None)


def pin_registered_functions() -> int:
    """``atomic_function.RUNTIME_FUNCTION_REFS`` (checked on TF 2.21): one more reference to
    every function registered in the eager context now, so that none of them is removed
    from it later; returns how many.

    Why: when the last Python object of a function is collected, TensorFlow removes the
    function from the eager context, and a context connected to a cluster asks every task
    of the cluster it is connected to *now* to remove it too. After a reconnect to a
    restarted cluster, whose tasks never had the functions traced before it, that request
    fails ("Tried to remove non-existent function") and the failure surfaces in the next
    remote call, a step of an unrelated pipeline. Pinned before connecting, the functions
    traced until then (the old split's, the old pipeline's) are never removed; their
    definitions stay in memory, which a process that reconnects can afford.
    """
    from tensorflow.python.eager.polymorphic_function import atomic_function

    refs = atomic_function.RUNTIME_FUNCTION_REFS
    for key in list(refs):
        refs[key] += 1
    return len(refs)


def op_def(op_type: str):
    """``op_def_registry.get`` (checked on TF 2.21): the ``OpDef`` TensorFlow registered under
    ``op_type`` (its inputs, outputs and attributes with their defaults), or ``None`` for a
    name no kernel library registered. TensorFlow has no public way to ask."""
    return _op_def_registry.get(op_type)


def eager_function_names() -> set[str]:
    """``context.context().list_function_names()`` (checked on TF 2.21): the names of every
    function registered in the eager context (what ``import_graph_def`` of a library and
    every traced call add). Tests read it to check that a refused program leaves nothing
    behind."""
    return set(_context.context().list_function_names())


def record_variable_read(variable) -> None:
    """``resource_variable_ops.variable_accessed`` (checked on TF 2.21): record, in the function
    being traced (and on any active ``tf.GradientTape``), that ``variable`` is read.

    Why: a function that reads a variable through its captured handle (an imported graph's
    ``ReadVariableOp``) and not through ``variable.read_value()`` is otherwise unknown to
    ``FuncGraph.variables``, so a tape around a call of it would not watch the variable and
    would give ``None`` for its gradient.
    """
    _resource_variable_ops.variable_accessed(variable)


def copy_handle_data(source: tf.Tensor, target: tf.Tensor) -> None:
    """``handle_data_util.copy_handle_data`` (checked on TF 2.21): give resource tensor ``target``
    the handle data (the dtype and shape of the variable behind it) of ``source``.

    Why: ``import_graph_def`` does not restore it on the outputs of an imported ``While``
    that carries a variable's handle through the loop (``tf.while_loop`` sets it when it
    traces); a ``tf.GradientTape`` around a function holding such a loop then fails with
    "Tried to take gradients ... of a variable without handle data".
    """
    _handle_data_util.copy_handle_data(source, target)


def has_control_outputs(op: tf.Operation) -> bool:
    """``Operation._control_outputs`` (TF 2.16-2.21): whether some op of ``op``'s graph
    has a control dependency on ``op``. TensorFlow has no public way to ask."""
    return bool(op._control_outputs)


def shape_dims(shape) -> tuple | None:
    """``TensorShape._dims`` (TF 2.16-2.21): the dims of a static shape as a tuple of ints and
    ``None``s, without building a list (``as_list``) or ``Dimension`` objects (``dims``);
    ``None`` for an unknown rank or for anything that is not a ``TensorShape``.

    Why: the cost model reads the shape of every tensor of programs of 100,000 ops; the
    public accessors cost 10-30x more per call.
    """
    dims = getattr(shape, "_dims", None)
    return dims if isinstance(dims, tuple) else None


# -- Keras 3 (TensorFlow backend; checked on Keras 3.15) ------------------------------------------


def sublayers(layer) -> list:
    """``Layer._flatten_layers(include_self=False, recursive=False)`` (Keras 3.x): the direct
    sublayers of ``layer``, models and plain layers alike, in tracking order; a layer without
    it gives its public ``layers`` (or nothing)."""
    try:
        return list(layer._flatten_layers(include_self=False, recursive=False))
    except Exception:
        return list(getattr(layer, "layers", []))


def functional_of(model):
    """The ``Functional`` graph of layers behind ``model``: ``Sequential._functional``
    (Keras 3.x: a ``Sequential`` wraps one once built), ``model`` itself when it is a
    ``Functional`` (it has ``_nodes_by_depth``), else ``None`` (a subclassed model)."""
    found = getattr(model, "_functional", None)
    if found is not None:
        return found
    return model if hasattr(model, "_nodes_by_depth") else None


def nodes_by_depth(functional) -> dict:
    """``Functional._nodes_by_depth`` (Keras 3.x): ``{depth: [Node, ...]}``, depth 0 at the
    outputs; each ``Node`` has public ``operation``, ``is_input``, ``input_tensors`` and
    ``outputs``."""
    return functional._nodes_by_depth


def input_layer_of(keras_tensor):
    """``KerasTensor._keras_history.operation`` (Keras 3.x): the layer (an ``InputLayer`` for
    a model input) whose call made ``keras_tensor``."""
    return keras_tensor._keras_history.operation
