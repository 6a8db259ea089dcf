"""``Program``: what the passes read and rewrite, from capture to the stage plan.

``gsc.capture(fn, input_signature)`` makes one; ``gsc.split`` and ``gsc.auto_split`` accept
one in place of ``fn``; ``gsc.to_function(program)`` runs one again. What a pass may read,
and what it must keep, is in ``docs/passes.md``.

The graph (``program.graph``, a ``networkx.MultiDiGraph``; ``gradsplit_compiler.ir.graph``
has the full description) has one node per TensorFlow op, keyed by op name:

- ``op`` (the op type), ``node_def`` (its ``NodeDef``, ``input`` cleared: the edges hold
  it), ``outputs`` (per output, ``(tf.DType, tf.TensorShape)``);
- ``variable`` on the placeholder of a captured variable (the variable's name);
- ``cut_candidate`` (``True``) on an op a pass offers ``gsc.auto_split`` as a place to cut
  after; when some op carries it, ``auto_split`` cuts only after those ops;
- after partition, ``stage`` (``None`` for inputs and dead ops) and ``stages``.

One edge per use: a data edge carries ``src_output``, ``dst_input`` and ``control=False``;
a control edge ``control=True`` and its ``position``. ``graph.graph["library"]`` is the
function library (``program.library``).

Example
-------
>>> import tensorflow as tf
>>> import gradsplit_compiler as gsc
>>> v = tf.Variable(2.0)
>>> program = gsc.capture(lambda x: tf.tanh(x) * v, [tf.TensorSpec([None])])
>>> program.arg_names, program.output_names, [w is v for w in program.variables]
(['x:0'], ['Identity:0'], [True])
>>> program.graph.nodes["Tanh"]["op"], program.tensor_spec("Identity:0")
('Tanh', TensorSpec(shape=(None,), dtype=tf.float32, name=None))
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import tensorflow as tf

from gradsplit_compiler.ir.graph import node_attributes, parse_tensor_name, successor_edges

__all__ = ["READ_ONLY_RESOURCE_OPS", "Program", "StagePlan"]

# Resource ops that only read: a variable used only by these is never written.
READ_ONLY_RESOURCE_OPS = {"ReadVariableOp", "ResourceGather", "ResourceGatherNd", "VariableShape"}


@dataclass
class StagePlan:
    """What partition decided for one stage: its ops, what enters and what leaves."""

    index: int
    nodes: list[str]
    inputs: list[str]
    outputs: list[str]
    variable_indices: list[int]
    capture_placeholders: list[str]


@dataclass
class Program:
    """A traced program and everything the passes learn about it.

    ``graph`` is the IR (see ``ir/graph.py`` and this module's docstring). Tensor names are
    ``"op:index"`` throughout. ``arg_names`` and ``output_names`` are the graph tensors of
    the arguments (in ``input_signature`` order, flattened) and of the outputs (flattened);
    ``variables`` are the ``tf.Variable`` objects the program reads, themselves (not
    copies), and ``variable_placeholders`` maps the placeholder op standing for each to its
    index in ``variables``. The fields after ``input_signature`` are filled by the passes.
    """

    graph: nx.MultiDiGraph
    arg_names: list[str]
    arg_specs: list[tf.TensorSpec]
    output_names: list[str]
    output_structure: Any
    control_outputs: list[str]
    variables: list[tf.Variable]
    # placeholder op name -> index into ``variables``
    variable_placeholders: dict[str, int]
    # placeholder op name -> captured eager tensor that is not a variable
    other_captures: dict[str, Any]
    input_signature: Any = None
    tf_function: Any = None
    keras_models: list[Any] = field(default_factory=list)
    cut_specs: list[Any] = field(default_factory=list)
    cuts: list[list[str]] = field(default_factory=list)
    keras_layers: dict[str, list[str]] = field(default_factory=dict)
    stages: list[StagePlan] = field(default_factory=list)
    boundaries: list[list[str]] = field(default_factory=list)

    @property
    def library(self):
        """The function library (a ``FunctionDefLibrary``): the bodies of ``tf.cond``,
        ``tf.while_loop`` and nested ``tf.function`` calls the graph's ops name."""
        return self.graph.graph["library"]

    def copy(self) -> Program:
        """A program whose graph (nodes, ``NodeDef``\\ s, library) can be edited without
        changing this one; it reads the same variables."""
        graph = self.graph.copy()
        for _, attrs in graph.nodes(data=True):
            node_def = type(attrs["node_def"])()
            node_def.CopyFrom(attrs["node_def"])
            attrs["node_def"] = node_def
            if isinstance(attrs.get("outputs"), list):
                attrs["outputs"] = list(attrs["outputs"])
        for key in ("library", "versions"):
            if key in graph.graph:
                value = type(graph.graph[key])()
                value.CopyFrom(graph.graph[key])
                graph.graph[key] = value
        return dataclasses.replace(
            self, graph=graph, arg_names=list(self.arg_names), output_names=list(
                self.output_names), control_outputs=list(self.control_outputs),
            variable_placeholders=dict(self.variable_placeholders),
            other_captures=dict(self.other_captures), cut_specs=list(self.cut_specs),
            cuts=[list(c) for c in self.cuts], keras_layers=dict(self.keras_layers),
            stages=list(self.stages), boundaries=[list(b) for b in self.boundaries])

    def tensor_spec(self, name: str) -> tf.TensorSpec:
        """The static shape and dtype of graph tensor ``name`` (``"op:index"``)."""
        return tf.TensorSpec(self.tensor_shape(name), self.tensor_dtype(name))

    def tensor_dtype(self, name: str) -> tf.DType | None:
        op, index = parse_tensor_name(name)
        outputs = self.graph.nodes[op].get("outputs") or []
        return outputs[index][0] if index < len(outputs) else None

    def tensor_shape(self, name: str) -> tf.TensorShape:
        op, index = parse_tensor_name(name)
        outputs = self.graph.nodes[op].get("outputs") or []
        return outputs[index][1] if index < len(outputs) else tf.TensorShape(None)

    def written_resources(self) -> set[str]:
        """Placeholder op names of the resources some op of the program writes."""
        attrs = node_attributes(self.graph)
        succ = successor_edges(self.graph)
        return {ph for ph in list(self.variable_placeholders) + list(self.other_captures)
                if ph in succ
                and any(attrs[dst]["op"] not in READ_ONLY_RESOURCE_OPS for dst in succ[ph])}

    def written_variables(self) -> list[int]:
        written = self.written_resources()
        return sorted(i for ph, i in self.variable_placeholders.items() if ph in written)

    @property
    def input_placeholders(self) -> set[str]:
        """Op names of the argument and capture placeholders: inputs, not stage ops."""
        return (
            {parse_tensor_name(n)[0] for n in self.arg_names}
            | set(self.variable_placeholders)
            | set(self.other_captures)
        )
