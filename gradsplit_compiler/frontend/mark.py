"""``gsc.mark``: name a tensor in user code so ``split`` can cut there."""

from __future__ import annotations

import re

import tensorflow as tf

from gradsplit_compiler.errors import GradSplitError

__all__ = ["mark", "mark_name_of"]

_PREFIX = "gsc.mark."
_VALID = re.compile(r"^[A-Za-z0-9_.\-]+$")
# TF makes repeated op names unique by appending "_<n>"; the trailing dot keeps that suffix
# apart from the user's own name.
_MARK_OP = re.compile(r"^gsc\.mark\.(?P<name>.+)\.(?:_\d+)?$")


def mark(tensor: tf.Tensor, name: str) -> tf.Tensor:
    """Mark ``tensor`` as a place to cut, under ``name``; returns a tensor to use instead.

    Inside a traced function this is an ``Identity`` whose op name ``split`` recognises;
    outside ``split`` it changes nothing (eagerly it returns ``tensor`` itself).

    Examples
    --------
    >>> import tensorflow as tf
    >>> import gradsplit_compiler as gsc
    >>> @tf.function
    ... def f(x):
    ...     return tf.reduce_sum(gsc.mark(tf.tanh(x), "y") ** 2)
    >>> float(f(tf.constant([0.0])))
    0.0
    """
    if not isinstance(name, str) or not _VALID.match(name):
        raise GradSplitError(
            f"gsc.mark name {name!r} must be a non-empty string of letters, digits, '_', "
            "'.' and '-', e.g. 'block1_out'."
        )
    if tf.executing_eagerly():
        return tensor
    return tf.identity(tensor, name=f"{_PREFIX}{name}.")


def mark_name_of(op_name: str) -> str | None:
    """The ``gsc.mark`` name of op ``op_name`` (any scope), or ``None``."""
    match = _MARK_OP.match(op_name.rsplit("/", 1)[-1])
    return match.group("name") if match else None
