"""``Program``: what the passes read and rewrite, from capture to the stage plan."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import tensorflow as tf

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

    ``graph`` is the IR (see ``gradsplit_compiler.ir.graph``). Tensor names are ``"op:index"``
    throughout.
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

    def tensor_dtype(self, name: str) -> tf.DType | None:
        op, index = _parse(name)
        outputs = self.graph.nodes[op].get("outputs") or []
        return outputs[index][0] if index < len(outputs) else None

    def tensor_shape(self, name: str) -> tf.TensorShape:
        op, index = _parse(name)
        outputs = self.graph.nodes[op].get("outputs") or []
        return outputs[index][1] if index < len(outputs) else tf.TensorShape(None)

    def written_resources(self) -> set[str]:
        """Placeholder op names of the resources some op of the program writes."""
        written = set()
        for ph in list(self.variable_placeholders) + list(self.other_captures):
            if ph not in self.graph:
                continue
            for _, dst in self.graph.out_edges(ph):
                if self.graph.nodes[dst]["op"] not in READ_ONLY_RESOURCE_OPS:
                    written.add(ph)
        return written

    def written_variables(self) -> list[int]:
        written = self.written_resources()
        return sorted(i for ph, i in self.variable_placeholders.items() if ph in written)

    @property
    def input_placeholders(self) -> set[str]:
        """Op names of the argument and capture placeholders: inputs, not stage ops."""
        return (
            {_parse(n)[0] for n in self.arg_names}
            | set(self.variable_placeholders)
            | set(self.other_captures)
        )


def _parse(name: str) -> tuple[str, int]:
    op, _, index = name.rpartition(":")
    return op, int(index)
