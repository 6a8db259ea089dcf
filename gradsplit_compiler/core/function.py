"""``gsc.to_function``: a ``Program`` (edited or not) as a ``tf.function`` again.

Nested ``tf.function`` calls are inlined first (``passes.inline_calls``, as ``split`` does):
a tape cannot differentiate a call of a library function imported into a trace. Then the
program's ops, without its input placeholders, are emitted into the function being
traced by the same importer the stages use (``core.rebuild.emit``: ``import_graph_def`` with
an ``input_map`` from the argument placeholders to the function's arguments and from the
captured-variable placeholders to the variables' own handles, library functions renamed so
that every import has names of its own). So the function reads the program's variables (not
copies), has no ``Placeholder`` for XLA to refuse, differentiates with ``tf.GradientTape``
through TensorFlow's registered gradients, and compiles with ``jit_compile=True``.

Example
-------
>>> import numpy as np, tensorflow as tf
>>> import gradsplit_compiler as gsc
>>> W = tf.Variable(np.random.default_rng(0).normal(size=(3, 2)))
>>> program = gsc.capture(lambda x: tf.reduce_sum(tf.tanh(x @ W)),
...                       [tf.TensorSpec([None, 3], tf.float64)])
>>> f = gsc.to_function(program, jit_compile=True)
>>> x = tf.constant(np.random.default_rng(1).normal(size=(4, 3)))
>>> with tf.GradientTape() as tape:
...     value = f(x)
>>> expected = tf.reduce_sum(tf.tanh(x @ W))
>>> abs(float(value - expected)) < 1e-12, tape.gradient(value, W).shape
(True, TensorShape([3, 2]))
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from gradsplit_compiler import _tf_internal
from gradsplit_compiler.core.rebuild import emit, program_graph_def
from gradsplit_compiler.errors import GradSplitError
from gradsplit_compiler.ir import edit
from gradsplit_compiler.ir.program import Program
from passes.inline_calls import CALL_OPS, inline_calls

__all__ = ["to_function"]


def to_function(program: Program, *, jit_compile: bool | None = None,
                name: str = "") -> Any:
    """A ``tf.function`` running ``program``, with its ``input_signature``.

    Parameters
    ----------
    program : Program
        From ``gsc.capture``, edited or not (an edited graph is checked first, as the pass
        manager checks a pass's result).
    jit_compile : bool, optional
        Passed to ``tf.function``.
    name : str
        A name scope to import the program's ops under; by default none, so they keep
        their names (the gradient of a ``tf.custom_gradient`` op finds the tensors it
        closes over by name, as in a stage).

    Returns
    -------
    tf.function
        Called with the program's arguments (structured as its ``input_signature``),
        returns its outputs (structured as ``fn`` returned them). It reads
        ``program.variables`` themselves, so a ``tf.GradientTape`` around a call watches
        them and gives their gradients; the program's side effects (variable assignments)
        happen once per call.

    Raises
    ------
    GradSplitError
        When the graph is not a program TensorFlow can run (a dangling input, an unknown
        op, a missing attribute, a dtype mismatch, a cycle), naming the node.
    """
    if not isinstance(program, Program):
        raise GradSplitError(
            f"to_function needs a gsc.Program (from gsc.capture); got "
            f"{type(program).__name__}. Capture a function first: "
            "gsc.to_function(gsc.capture(fn, input_signature))."
        )
    problems = edit.problems(program)
    if problems:
        node, what = problems[0]
        raise GradSplitError(f"to_function cannot run this program: node {node!r} {what}.")
    if any(op in CALL_OPS for _, op in program.graph.nodes(data="op")):
        # A call of a library function imported into a trace has no gradient a tape can
        # build (TensorFlow looks for the Python function it was traced from): inline it,
        # as split does.
        program = inline_calls(program.copy())
    piece = program_graph_def(program)
    signature = program.input_signature or list(program.arg_specs)
    n_args = len(program.arg_names)

    def body(*args):
        flat = tf.nest.flatten(list(args))[:n_args]
        input_map = dict(zip(program.arg_names, flat))
        for ph, index in program.variable_placeholders.items():
            variable = program.variables[index]
            _tf_internal.record_variable_read(variable)
            input_map[ph + ":0"] = _tf_internal.capture_in_current_graph(variable.handle)
        for ph, external in program.other_captures.items():
            input_map[ph + ":0"] = _tf_internal.capture_in_current_graph(external)
        # an output that is an argument itself is not among the imported ops
        fetched = [n for n in program.output_names if n not in input_map]
        got = dict(zip(fetched, emit(piece, input_map, fetched, name)))
        _restore_loop_handle_data(piece, name)
        outputs = [input_map[n] if n in input_map else got[n] for n in program.output_names]
        outputs = [tf.identity(t) for t in outputs]
        return tf.nest.pack_sequence_as(program.output_structure, outputs)

    return tf.function(body, input_signature=signature, jit_compile=jit_compile,
                       autograph=False)


def _restore_loop_handle_data(piece, scope: str) -> None:
    """A loop carries a resource unchanged: each resource output of an imported ``While``
    gets the handle data of the input it passes through (import leaves it out)."""
    graph = tf.compat.v1.get_default_graph()
    for node_def in piece.node:
        if node_def.op not in ("While", "StatelessWhile"):
            continue
        op = graph.get_operation_by_name(f"{scope}/{node_def.name}" if scope else node_def.name)
        for source, target in zip(op.inputs, op.outputs):
            if target.dtype == tf.resource:
                _tf_internal.copy_handle_data(source, target)
