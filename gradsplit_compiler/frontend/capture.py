"""Capture: trace ``fn`` once and describe what its graph's inputs and outputs are."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import tensorflow as tf

from gradsplit_compiler import ir
from gradsplit_compiler.errors import GradSplitError
from gradsplit_compiler.frontend import custom_gradients
from gradsplit_compiler.ir.program import Program
from gradsplit_compiler.util import phase

__all__ = ["as_tf_function", "capture", "check_signature"]


def as_tf_function(fn: Any, training: bool | None = None) -> tuple[Callable, Any]:
    """Return ``(tf_function, keras_model_or_None)`` for a tf.function, callable or Keras model."""
    model = _keras_model_of(fn)
    if model is not None and fn is model:
        if training is None:
            return tf.function(lambda *args: model(*args)), model
        return tf.function(lambda *args: model(*args, training=training)), model
    if not callable(fn):
        raise GradSplitError(
            "fn must be a tf.function, a Python callable or a keras.Model; got "
            f"{type(fn).__name__}."
        )
    if hasattr(fn, "get_concrete_function"):
        return fn, _models_reachable(fn)
    return tf.function(fn), _models_reachable(fn)


def _keras_model_of(obj: Any) -> Any:
    try:
        import keras
    except ImportError:  # pragma: no cover - keras ships with tensorflow >= 2.16
        return None
    return obj if isinstance(obj, keras.Model) else None


def _models_reachable(fn: Any) -> list:
    """Keras models a function closes over (its closure and the globals it names)."""
    try:
        import keras
    except ImportError:  # pragma: no cover
        return []
    target = getattr(fn, "python_function", fn)
    target = getattr(target, "__func__", target)
    found: list = []
    seen: set[int] = set()

    def visit(value: Any, depth: int) -> None:
        if id(value) in seen or depth > 2:
            return
        seen.add(id(value))
        if isinstance(value, keras.Model):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v, depth + 1)
        elif isinstance(value, dict):
            for v in value.values():
                visit(v, depth + 1)

    code = getattr(target, "__code__", None)
    for cell in getattr(target, "__closure__", None) or ():
        try:
            visit(cell.cell_contents, 0)
        except ValueError:  # empty cell
            pass
    if code is not None:
        globs = getattr(target, "__globals__", {})
        for name in code.co_names:
            if name in globs:
                visit(globs[name], 0)
    self_obj = getattr(getattr(fn, "python_function", fn), "__self__", None)
    if self_obj is not None:
        visit(self_obj, 0)
    return found


def check_signature(input_signature: Any) -> list[tf.TensorSpec]:
    if not isinstance(input_signature, (list, tuple)):
        raise GradSplitError(
            "input_signature must be a list or tuple of tf.TensorSpec, e.g. "
            "[tf.TensorSpec([None, 10], tf.float32)]; got "
            f"{type(input_signature).__name__}."
        )
    flat = tf.nest.flatten(input_signature)
    for i, spec in enumerate(flat):
        if not isinstance(spec, tf.TensorSpec):
            raise GradSplitError(
                f"input_signature entry {i} is {spec!r}, not a tf.TensorSpec; write it as "
                "tf.TensorSpec(shape, dtype)."
            )
    return flat


def _specs_text(specs: list[tf.TensorSpec]) -> str:
    return "[" + ", ".join(f"{s.shape}:{s.dtype.name}" for s in specs) + "]"


def _reason(exc: Exception) -> str:
    """The last line of a tracing error, which names what went wrong (TF's "in user code"
    wrapper puts the original error there), as ``Type: message`` without a final period."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    if not re.match(r"^\w+(Error|Exception|Warning): ", last):
        last = f"{type(exc).__name__}: {last}" if last else type(exc).__name__
    return last.rstrip(".")


def capture(fn: Any, input_signature: Sequence, training: bool | None = None) -> Program:
    """Trace ``fn`` with ``input_signature`` and return the un-cut ``Program`` (``gsc.capture``).

    Parameters
    ----------
    fn : tf.function, callable or keras.Model
        As for ``gsc.split``; traced once.
    input_signature : list of tf.TensorSpec
    training : bool, optional
        When ``fn`` is a ``keras.Model``, the ``training`` flag it is called with.

    Returns
    -------
    Program
        ``graph`` (the IR: every op of the trace, nested ``tf.function`` calls not yet
        inlined, each op's output dtypes and static shapes), ``arg_names``, ``output_names``,
        ``variables`` (the variables ``fn`` reads, themselves) and ``library``. Edit it with
        ``gradsplit_compiler.ir.edit``, cut it with ``gsc.split(program, cuts=...)``, run it
        with ``gsc.to_function(program)``; ``docs/passes.md`` is the tutorial.

    Raises
    ------
    GradSplitError
        When ``fn`` cannot be traced with ``input_signature``, or returns something other
        than tensors.

    Examples
    --------
    >>> import tensorflow as tf
    >>> import gradsplit_compiler as gsc
    >>> program = gsc.capture(lambda x: tf.reduce_sum(tf.tanh(x)), [tf.TensorSpec([None])])
    >>> sorted(program.graph.nodes[n]["op"] for n in program.graph)
    ['Const', 'Identity', 'Placeholder', 'Sum', 'Tanh']
    """
    specs = check_signature(input_signature)
    tf_fn, models = as_tf_function(fn, training)
    try:
        with phase("trace"):
            concrete = tf_fn.get_concrete_function(*input_signature)
    except GradSplitError:
        raise
    except Exception as exc:  # any tracing failure is the caller's program
        raise GradSplitError(
            f"fn could not be traced with input_signature {_specs_text(specs)}: "
            f"{_reason(exc)}. Check that fn runs on tensors of these shapes and dtypes "
            "inside a tf.function."
        ) from None
    graph = concrete.graph
    n_args = len(specs)
    arg_names = [t.name for t in graph.inputs[:n_args]]

    variables_by_handle = {id(v.handle): v for v in graph.variables}
    variables: list[tf.Variable] = []
    variable_placeholders: dict[str, int] = {}
    other_captures: dict[str, Any] = {}
    for external, internal in graph.captures:
        op_name = internal.op.name
        var = variables_by_handle.get(id(external))
        if var is not None:
            variable_placeholders[op_name] = len(variables)
            variables.append(var)
        else:
            other_captures[op_name] = external

    outputs = tf.nest.flatten(concrete.structured_outputs)
    if any(not isinstance(t, tf.Tensor) for t in outputs):
        raise GradSplitError(
            "fn must return tensors (or nested lists, tuples or dicts of tensors); it returned "
            f"{concrete.structured_outputs!r}."
        )
    output_names = [t.name for t in outputs]
    with phase("convert"):
        graph_def = graph.as_graph_def(add_shapes=True)
        custom_gradients.make_portable(graph, graph_def)
        ir_graph = ir.to_networkx(graph_def, graph, consume=True)
    program = Program(
        graph=ir_graph,
        arg_names=arg_names,
        arg_specs=specs,
        output_names=output_names,
        output_structure=tf.nest.map_structure(lambda t: t.name, concrete.structured_outputs),
        control_outputs=[op.name for op in graph.control_outputs],
        variables=variables,
        variable_placeholders=variable_placeholders,
        other_captures=other_captures,
        input_signature=list(input_signature),
        tf_function=tf_fn,
        keras_models=list(models) if isinstance(models, list) else ([models] if models else []),
    )
    for ph, index in variable_placeholders.items():
        # readable without the private Program: which variable a placeholder stands for
        program.graph.nodes[ph]["variable"] = variables[index].name
    return program
