"""Tensor and op names as strings: no TensorFlow, so drawing and the CLI can read names cheaply.

``parse_tensor_name`` and ``tensor_name`` go between ``"op:1"`` and ``("op", 1)``;
``mark_op_name`` and ``mark_name_of`` between a ``gsc.mark`` name and the op that carries it.
``gradsplit_compiler.ir`` re-exports the tensor-name helpers; ``frontend.mark`` the mark ones.

Example
-------
>>> from gradsplit_compiler.ir.names import mark_name_of, mark_op_name, parse_tensor_name
>>> parse_tensor_name("dense/Tanh:1"), parse_tensor_name("dense/Tanh")
(('dense/Tanh', 1), ('dense/Tanh', 0))
>>> mark_op_name("y"), mark_name_of("model/gsc.mark.y._1")
('gsc.mark.y.', 'y')
"""

from __future__ import annotations

import re

__all__ = ["MARK_PREFIX", "mark_name_of", "mark_op_name", "parse_tensor_name", "tensor_name"]

MARK_PREFIX = "gsc.mark."
# TF makes repeated op names unique by appending "_<n>"; the trailing dot keeps that suffix
# apart from the user's own name.
_MARK_OP = re.compile(r"^gsc\.mark\.(?P<name>.+)\.(?:_\d+)?$")


def parse_tensor_name(name: str) -> tuple[str, int]:
    """``"op:1"`` -> ``("op", 1)``; ``"op"`` -> ``("op", 0)``."""
    op, sep, index = name.rpartition(":")
    if sep and index.isdigit():
        return op, int(index)
    return name, 0


def tensor_name(op: str, index: int) -> str:
    return f"{op}:{index}"


def mark_op_name(name: str) -> str:
    """The name ``gsc.mark`` gives the op that marks a tensor as ``name``."""
    return f"{MARK_PREFIX}{name}."


def mark_name_of(op_name: str) -> str | None:
    """The ``gsc.mark`` name of op ``op_name`` (any scope), or ``None``."""
    match = _MARK_OP.match(op_name.rsplit("/", 1)[-1])
    return match.group("name") if match else None
