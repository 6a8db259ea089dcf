"""Running a program that XLA may refuse: the refusal in the user's terms."""

from __future__ import annotations

import re

import tensorflow as tf

from gradsplit_compiler.errors import GradSplitError

__all__ = ["run_reporting_xla_errors"]

_UNSUPPORTED_NODE = re.compile(r"compatible with node \{\{node ([^}]+)\}\}")
_STAGE_OF_NODE = re.compile(r"^stage(\d+)\.(forward|backward)/(.+)$")
_UNSUPPORTED = re.compile(r"Detected unsupported operations.*?: (\w+) \(No registered '(\w+)'")


def run_reporting_xla_errors(fn, *args):
    """``fn(*args)``; XLA's refusal of an op becomes a ``GradSplitError`` naming the op, its
    stage and whether it is in the forward or the backward."""
    try:
        return fn(*args)
    except tf.errors.InvalidArgumentError as exc:
        match = _UNSUPPORTED.search(str(exc))
        if match:
            where = _UNSUPPORTED_NODE.search(str(exc))
            node = where.group(1) if where else match.group(1)
            stage = _STAGE_OF_NODE.match(node)
            place = (
                f"op {stage.group(3)!r} in the {stage.group(2)} of stage {stage.group(1)}"
                if stage else f"op {node!r}"
            )
            raise GradSplitError(
                f"XLA cannot compile {place}: no XLA kernel for op type {match.group(2)!r}. "
                "Run with jit_compile=False, or rewrite that op with XLA-supported ops."
            ) from None
        raise
