"""Programs the core tests cut, and the reference they are checked against.

Every builder returns a ``Case``: the function to split, its ``input_signature``, a function
that makes random arguments from a seeded ``numpy`` generator (never zeros), the suggested
cuts, the variables it owns and ``names``: graph tensor names recorded while ``fn`` was
traced (filled on the first trace), so a test can name a tensor the way TensorFlow does.

The reference is always ``tf.GradientTape`` on the original ``fn``, compiled the same way as
the composed stages (``jit_compile`` on both sides or on neither): compare like with like.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import tensorflow as tf

import gradsplit_compiler as gsc
from gradsplit_compiler.core.verify import reference_value_and_grads

# Relative tolerance by dtype, as in docs/api.md.
RTOL = {tf.float32: 1e-5, tf.float64: 1e-12}

# Both sides under XLA, or both in graph mode.
MODES = pytest.mark.parametrize("jit_compile", [True, False], ids=["xla", "graph"])


@dataclass
class Case:
    """One program to split: ``fn``, its signature, random arguments and suggested cuts."""

    name: str
    fn: Callable
    input_signature: list
    make_args: Callable[[np.random.Generator], list]
    cuts: list
    variables: list = field(default_factory=list)
    names: dict = field(default_factory=dict)
    dtype: tf.DType = tf.float64
    model: Any = None  # the keras.Model, for Keras cases

    def args(self, seed: int = 0) -> list:
        return self.make_args(np.random.default_rng(seed))

    def concrete(self):
        """The traced ``fn`` (a ``ConcreteFunction``), tracing it if needed."""
        fn = self.fn if hasattr(self.fn, "get_concrete_function") else tf.function(self.fn)
        return fn.get_concrete_function(*self.input_signature)


# -- random values -----------------------------------------------------------------------------


def normal(rng: np.random.Generator, shape: Sequence[int], dtype: tf.DType,
           scale: float = 1.0) -> np.ndarray:
    """Standard normal values of ``dtype``, bounded away from zero (never an exact zero)."""
    values = rng.normal(size=shape) * scale
    values = np.where(np.abs(values) < 1e-3, 1e-3, values)
    return values.astype(tf.as_dtype(dtype).as_numpy_dtype)


def variable(rng: np.random.Generator, shape: Sequence[int], dtype: tf.DType, name: str,
             scale: float = 0.5) -> tf.Variable:
    return tf.Variable(normal(rng, shape, dtype, scale), name=name)


def tensor(rng: np.random.Generator, shape: Sequence[int], dtype: tf.DType) -> tf.Tensor:
    return tf.constant(normal(rng, shape, dtype))


# -- the reference and the comparison ----------------------------------------------------------

# reference_value_and_grads, imported above, is gsc.verify's reference: tf.GradientTape on fn.


def reference_vjp(fn: Callable, variables: Sequence[tf.Variable], jit_compile: bool) -> Callable:
    """A compiled ``(args, output_cotangents) -> (outputs, input_cotangents, grads)``.

    ``input_cotangents`` are ``None`` for integer and boolean arguments.
    """
    variables = list(variables)

    def body(args, cotangents):
        args = list(args)
        floats = [a for a in args if a.dtype.is_floating]
        with tf.GradientTape(watch_accessed_variables=False, persistent=True) as tape:
            tape.watch(variables)
            tape.watch(floats)
            outputs = fn(*args)
        flat = tf.nest.flatten(outputs)
        grads = tape.gradient(flat, variables, output_gradients=list(cotangents),
                              unconnected_gradients=tf.UnconnectedGradients.ZERO)
        input_grads = tape.gradient(flat, floats, output_gradients=list(cotangents),
                                    unconnected_gradients=tf.UnconnectedGradients.ZERO)
        by_arg = iter(input_grads)
        input_cotangents = [tf.convert_to_tensor(next(by_arg)) if a.dtype.is_floating else None
                            for a in args]
        return outputs, input_cotangents, [tf.convert_to_tensor(g) for g in grads]

    return tf.function(body, jit_compile=jit_compile, autograph=False)


def max_abs(x) -> float:
    return float(np.max(np.abs(np.asarray(x)))) if np.size(np.asarray(x)) else 0.0


# Rounding noise on a gradient that is zero in exact arithmetic (the bias of a layer followed
# by batch normalization): a few ulps of the largest gradient entry, not a relative error.
ROUNDING_ULPS = 64


def rel_errors(got: Sequence, ref: Sequence) -> list[float]:
    """Per gradient: ``max|got - ref| / max|ref|``.

    A gradient whose reference is itself at rounding level (``max|ref| <= ROUNDING_ULPS`` ulps
    of the largest reference entry over all gradients, i.e. zero in exact arithmetic) has no
    relative error to speak of: its error is measured against that largest entry instead, and
    counts as 0 when it is within the same few ulps. Every other gradient is held to the
    strict relative error.
    """
    assert len(got) == len(ref), (len(got), len(ref))
    got = [np.asarray(g, np.float64) for g in got]
    ref_np = [np.asarray(r) for r in ref]
    scale = max([max_abs(r) for r in ref_np] + [0.0])
    dtypes = [r.dtype for r in ref_np if np.issubdtype(r.dtype, np.floating)]
    eps = max([float(np.finfo(d).eps) for d in dtypes] + [float(np.finfo(np.float64).eps)])
    rounding = ROUNDING_ULPS * eps * scale
    errors = []
    for g, r in zip(got, ref_np):
        assert g.shape == r.shape, (g.shape, r.shape)
        diff = max_abs(g - r.astype(np.float64))
        own = max_abs(r)
        if own <= rounding:
            errors.append(0.0 if diff <= rounding else diff / max(scale, 1e-300))
        else:
            errors.append(diff / own)
    return errors


def max_rel_error(got: Sequence, ref: Sequence) -> float:
    return max(rel_errors(got, ref), default=0.0)


def value_rel_error(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return max_abs(got - ref) / max(max_abs(ref), 1e-300)


def assert_matches_tape(fn: Callable, split, args: Sequence, jit_compile: bool,
                        rtol: float) -> list:
    """``split.value_and_gradients(*args)`` is within ``rtol`` of the tape's value and
    gradients on ``fn`` (``reference_value_and_grads``, compiled the same way); returns the
    split's gradients."""
    value, grads = split.value_and_gradients(*args, jit_compile=jit_compile)
    ref_value, ref_grads = reference_value_and_grads(fn, split.variables, jit_compile)(*args)
    value_error = value_rel_error(value, ref_value)
    assert value_error <= rtol, f"value: relative error {value_error:.3g} > {rtol:g}"
    grads_error = max_rel_error(grads, ref_grads)
    assert grads_error <= rtol, f"gradients: relative error {grads_error:.3g} > {rtol:g}"
    return grads


def assert_round_trip(gd) -> None:
    """``gsc.from_networkx(gsc.to_networkx(gd)) == gd``, byte for byte when serialized; on a
    difference, the first node (or the library, or the versions) that differs is named."""
    back = gsc.from_networkx(gsc.to_networkx(gd))
    if back != gd:  # say where before failing
        assert [n.name for n in back.node] == [n.name for n in gd.node]
        for mine, theirs in zip(back.node, gd.node):
            assert mine == theirs, mine.name
        assert back.library == gd.library
        assert back.versions == gd.versions
    assert back == gd
    assert back.SerializeToString(deterministic=True) == gd.SerializeToString(
        deterministic=True)


def stages_reading(split, var: tf.Variable) -> list[int]:
    """The indices of the stages that hold ``var`` among their variables."""
    return [s.index for s in split.stages if any(v is var for v in s.variables)]


def snapshot(variables: Sequence[tf.Variable]) -> list[np.ndarray]:
    return [v.numpy().copy() for v in variables]


def restore(variables: Sequence[tf.Variable], values: Sequence[np.ndarray]) -> None:
    for v, value in zip(variables, values):
        v.assign(value)


@contextlib.contextmanager
def keras_floatx(dtype: str) -> Iterator[None]:
    """Build Keras layers in ``dtype``; the previous default comes back afterwards."""
    import keras

    previous = keras.backend.floatx()
    keras.backend.set_floatx(dtype)
    try:
        yield
    finally:
        keras.backend.set_floatx(previous)


@contextlib.contextmanager
def grappler_off() -> Iterator[None]:
    """Run graph-mode functions without Grappler's rewrites (same kernels, same order as
    traced). Grappler's arithmetic optimizer and constant folding reassociate float sums,
    and do it differently in differently shaped graphs; tf.functions called inside pick the
    setting up when they run, so it applies to functions traced before, too."""
    previous = tf.config.optimizer.get_experimental_options().get("disable_meta_optimizer",
                                                                  False)
    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})
    try:
        yield
    finally:
        tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": previous})


# -- the seed problem --------------------------------------------------------------------------


def seed_model(dtype: tf.DType = tf.float32, marked: bool = True, seed: int = 0) -> Case:
    """``h = W x + b; y = tanh(h); loss = mse(y, y0)``, cut at ``y``.

    ``marked=True`` names ``y`` with ``gsc.mark(..., "y")``; ``marked=False`` leaves TF's own
    name, ``Tanh:0``, which the cut then uses.
    """
    rng = np.random.default_rng(seed)
    W = variable(rng, (10, 5), dtype, "W")
    b = variable(rng, (5,), dtype, "b")
    names: dict = {}

    @tf.function
    def loss(x, y0):
        y = tf.tanh(tf.matmul(x, W) + b)
        names["tanh"] = y.name
        if marked:
            y = gsc.mark(y, "y")
        names["y"] = y.name
        return tf.reduce_mean(tf.square(y - y0))

    return Case(
        name=f"seed_{'marked' if marked else 'graph_name'}_{tf.as_dtype(dtype).name}",
        fn=loss,
        input_signature=[tf.TensorSpec([None, 10], dtype), tf.TensorSpec([None, 5], dtype)],
        make_args=lambda r: [tensor(r, (6, 10), dtype), tensor(r, (6, 5), dtype)],
        cuts=["y"] if marked else ["Tanh:0"],
        variables=[W, b],
        names=names,
        dtype=tf.as_dtype(dtype),
    )


def seed_outputs_model(dtype: tf.DType = tf.float64, seed: int = 0) -> Case:
    """The seed model returning ``y = tanh(W x + b)`` itself (not a scalar), cut at ``h``."""
    rng = np.random.default_rng(seed)
    W = variable(rng, (10, 5), dtype, "W")
    b = variable(rng, (5,), dtype, "b")

    @tf.function
    def forward(x):
        h = gsc.mark(tf.matmul(x, W) + b, "h")
        return tf.tanh(h)

    return Case(
        name=f"seed_outputs_{tf.as_dtype(dtype).name}",
        fn=forward,
        input_signature=[tf.TensorSpec([None, 10], dtype)],
        make_args=lambda r: [tensor(r, (6, 10), dtype)],
        cuts=["h"],
        variables=[W, b],
        dtype=tf.as_dtype(dtype),
    )


# -- topologies --------------------------------------------------------------------------------


def mlp(dtype: tf.DType = tf.float64, depth: int = 4, width: int = 8, seed: int = 0) -> Case:
    """``depth`` tanh layers ``h1 .. h{depth}`` (each a ``gsc.mark``), then a squared error."""
    rng = np.random.default_rng(seed)
    weights = [variable(rng, (6 if k == 0 else width, width), dtype, f"W{k + 1}")
               for k in range(depth)]
    biases = [variable(rng, (width,), dtype, f"b{k + 1}") for k in range(depth)]
    head = variable(rng, (width, 3), dtype, "head")
    names: dict = {}

    @tf.function
    def loss(x, target):
        h = x
        for k, (W, b) in enumerate(zip(weights, biases)):
            h = gsc.mark(tf.tanh(tf.matmul(h, W) + b), f"h{k + 1}")
            names[f"h{k + 1}"] = h.name
        return tf.reduce_mean(tf.square(tf.matmul(h, head) - target))

    return Case(
        name=f"mlp{depth}",
        fn=loss,
        input_signature=[tf.TensorSpec([None, 6], dtype), tf.TensorSpec([None, 3], dtype)],
        make_args=lambda r: [tensor(r, (5, 6), dtype), tensor(r, (5, 3), dtype)],
        cuts=[f"h{k + 1}" for k in range(depth - 1)],
        variables=[*weights, *biases, head],
        names=names,
        dtype=tf.as_dtype(dtype),
    )


def parallel_branches(dtype: tf.DType = tf.float64, seed: int = 0) -> Case:
    """Two branches from ``x``, ``a_branch`` and ``b_branch``, joined after both."""
    rng = np.random.default_rng(seed)
    Wa = variable(rng, (6, 8), dtype, "Wa")
    Wb = variable(rng, (6, 8), dtype, "Wb")
    Wc = variable(rng, (16, 2), dtype, "Wc")
    names: dict = {}

    @tf.function
    def loss(x):
        a = gsc.mark(tf.tanh(tf.matmul(x, Wa)), "a_branch")
        b = gsc.mark(tf.sigmoid(tf.matmul(x, Wb)), "b_branch")
        names["a_branch"], names["b_branch"] = a.name, b.name
        joined = tf.concat([a * b, a - b], axis=1)
        return tf.reduce_mean(tf.tanh(tf.matmul(joined, Wc)) ** 2)

    return Case(
        name="parallel_branches",
        fn=loss,
        input_signature=[tf.TensorSpec([None, 6], dtype)],
        make_args=lambda r: [tensor(r, (5, 6), dtype)],
        cuts=[["a_branch", "b_branch"]],
        variables=[Wa, Wb, Wc],
        names=names,
        dtype=tf.as_dtype(dtype),
    )


def skip_connection(crosses: int, dtype: tf.DType = tf.float64, seed: int = 0) -> Case:
    """A chain ``h1 -> h2 -> ... -> h{crosses + 1}`` cut at ``h2 .. h{crosses + 1}``, and a
    skip connection from ``h1`` to the output that crosses all ``crosses`` cuts."""
    rng = np.random.default_rng(seed)
    depth = crosses + 1
    weights = [variable(rng, (6 if k == 0 else 8, 8), dtype, f"W{k + 1}") for k in range(depth)]
    out = variable(rng, (8, 8), dtype, "out")
    names: dict = {}

    @tf.function
    def loss(x):
        h1 = h = gsc.mark(tf.tanh(tf.matmul(x, weights[0])), "h1")
        names["h1"] = h1.name
        for k in range(1, depth):
            h = gsc.mark(tf.tanh(tf.matmul(h, weights[k])), f"h{k + 1}")
            names[f"h{k + 1}"] = h.name
        y = tf.tanh(tf.matmul(h, out)) + h1
        return tf.reduce_mean(y * y)

    return Case(
        name=f"skip_over_{crosses}",
        fn=loss,
        input_signature=[tf.TensorSpec([None, 6], dtype)],
        make_args=lambda r: [tensor(r, (5, 6), dtype)],
        cuts=[f"h{k + 1}" for k in range(1, depth)],
        variables=[*weights, out],
        names=names,
        dtype=tf.as_dtype(dtype),
    )


def multi_use(dtype: tf.DType = tf.float64, seed: int = 0) -> Case:
    """``h1`` (stage 0) is read by stages 1, 2 and 3: its cotangents must be summed."""
    rng = np.random.default_rng(seed)
    W1, W2, W3, W4 = (variable(rng, (6 if k == 0 else 8, 8), dtype, f"W{k + 1}")
                      for k in range(4))
    names: dict = {}

    @tf.function
    def loss(x):
        h1 = gsc.mark(tf.tanh(tf.matmul(x, W1)), "h1")
        h2 = gsc.mark(tf.tanh(tf.matmul(h1, W2)), "h2")
        h3 = gsc.mark(tf.tanh(tf.matmul(h2, W3)) * h1, "h3")
        names.update(h1=h1.name, h2=h2.name, h3=h3.name)
        return tf.reduce_mean(tf.tanh(tf.matmul(h3, W4)) + tf.sin(h1))

    return Case(
        name="multi_use",
        fn=loss,
        input_signature=[tf.TensorSpec([None, 6], dtype)],
        make_args=lambda r: [tensor(r, (5, 6), dtype)],
        cuts=["h1", "h2", "h3"],
        variables=[W1, W2, W3, W4],
        names=names,
        dtype=tf.as_dtype(dtype),
    )


def shared_variable(dtype: tf.DType = tf.float64, seed: int = 0) -> Case:
    """One weight ``W`` used in all three stages (cuts ``h1``, ``h2``); ``c`` in stage 0 only."""
    rng = np.random.default_rng(seed)
    W = variable(rng, (8, 8), dtype, "W")
    c = variable(rng, (8,), dtype, "c")

    @tf.function
    def loss(x):
        h1 = gsc.mark(tf.tanh(tf.matmul(x, W) + c), "h1")
        h2 = gsc.mark(tf.tanh(tf.matmul(h1, W)), "h2")
        return tf.reduce_mean(tf.square(tf.matmul(h2, W)))

    return Case(
        name="shared_variable",
        fn=loss,
        input_signature=[tf.TensorSpec([None, 8], dtype)],
        make_args=lambda r: [tensor(r, (5, 8), dtype)],
        cuts=["h1", "h2"],
        variables=[W, c],
        dtype=tf.as_dtype(dtype),
    )


def unconnected_variables(dtype: tf.DType = tf.float64, seed: int = 0) -> Case:
    """``fn`` reads ``frozen`` through ``tf.stop_gradient`` and reads ``unused`` without using
    the value: the value depends on neither, so both gradients are zeros."""
    rng = np.random.default_rng(seed)
    W = variable(rng, (6, 8), dtype, "W")
    frozen = variable(rng, (8,), dtype, "frozen")
    unused = variable(rng, (3, 2), dtype, "unused")
    U = variable(rng, (8, 2), dtype, "U")

    @tf.function
    def loss(x):
        unused.read_value()
        h1 = gsc.mark(tf.tanh(tf.matmul(x, W) + tf.stop_gradient(frozen)), "h1")
        return tf.reduce_mean(tf.square(tf.matmul(h1, U)))

    return Case(
        name="unconnected_variables",
        fn=loss,
        input_signature=[tf.TensorSpec([None, 6], dtype)],
        make_args=lambda r: [tensor(r, (5, 6), dtype)],
        cuts=["h1"],
        variables=[W, frozen, unused, U],
        dtype=tf.as_dtype(dtype),
    )


def integer_labels(dtype: tf.DType = tf.float64, classes: int = 4, seed: int = 0) -> Case:
    """Features cut at ``features``; integer ``labels`` flow past the cut into a softmax
    cross-entropy (``tf.one_hot``) weighted per class (``tf.gather`` of a variable)."""
    rng = np.random.default_rng(seed)
    W1 = variable(rng, (6, 8), dtype, "W1")
    W2 = variable(rng, (8, classes), dtype, "W2")
    class_weight = variable(rng, (classes,), dtype, "class_weight")
    names: dict = {}

    @tf.function
    def loss(x, labels):
        features = gsc.mark(tf.tanh(tf.matmul(x, W1)), "features")
        logits = tf.matmul(features, W2)
        per_example = tf.nn.softmax_cross_entropy_with_logits(
            tf.one_hot(labels, classes, dtype=logits.dtype), logits)
        names["labels"] = labels.name
        return tf.reduce_mean(per_example * tf.gather(class_weight, labels))

    return Case(
        name="integer_labels",
        fn=loss,
        input_signature=[tf.TensorSpec([None, 6], dtype), tf.TensorSpec([None], tf.int32)],
        make_args=lambda r: [tensor(r, (6, 6), dtype),
                             tf.constant(r.integers(0, classes, size=6), tf.int32)],
        cuts=["features"],
        variables=[W1, W2, class_weight],
        names=names,
        dtype=tf.as_dtype(dtype),
    )


def counted_mlp(dtype: tf.DType = tf.float64, seed: int = 0) -> Case:
    """A two-layer MLP whose first stage also counts its own calls (``steps.assign_add(1)``),
    a side effect like a batch-norm statistics update: it must run once per step."""
    rng = np.random.default_rng(seed)
    W1 = variable(rng, (6, 8), dtype, "W1")
    W2 = variable(rng, (8, 3), dtype, "W2")
    steps = tf.Variable(tf.zeros([], dtype), name="steps")
    names: dict = {}

    @tf.function
    def loss(x, target):
        steps.assign_add(tf.ones([], dtype))
        h1 = gsc.mark(tf.tanh(tf.matmul(x, W1)), "h1")
        names["h1"] = h1.name
        return tf.reduce_mean(tf.square(tf.matmul(h1, W2) - target))

    return Case(
        name="counted_mlp",
        fn=loss,
        input_signature=[tf.TensorSpec([None, 6], dtype), tf.TensorSpec([None, 3], dtype)],
        make_args=lambda r: [tensor(r, (5, 6), dtype), tensor(r, (5, 3), dtype)],
        cuts=["h1"],
        variables=[W1, W2, steps],
        names=names,
        dtype=tf.as_dtype(dtype),
    )


# -- control flow ------------------------------------------------------------------------------


def nested_functions(dtype: tf.DType = tf.float64, seed: int = 0) -> Case:
    """``loss`` calls the ``tf.function`` ``inner``, which calls ``innermost``; each inner
    function holds a ``gsc.mark`` (``inner_mark``, ``innermost_mark``) and a named op
    (``inner_tanh``, ``innermost_sin``)."""
    rng = np.random.default_rng(seed)
    W1, W2, W3, W4 = (variable(rng, (6 if k == 0 else 8, 8), dtype, f"W{k + 1}")
                      for k in range(4))

    @tf.function
    def innermost(z):
        return gsc.mark(tf.sin(tf.matmul(z, W3), name="innermost_sin"), "innermost_mark") * 2

    @tf.function
    def inner(h):
        z = gsc.mark(tf.tanh(tf.matmul(h, W2), name="inner_tanh"), "inner_mark")
        return innermost(z) + z

    @tf.function
    def loss(x):
        h = tf.tanh(tf.matmul(x, W1))
        return tf.reduce_mean(tf.tanh(tf.matmul(inner(h), W4)) ** 2)

    return Case(
        name="nested_functions",
        fn=loss,
        input_signature=[tf.TensorSpec([None, 6], dtype)],
        make_args=lambda r: [tensor(r, (5, 6), dtype)],
        cuts=["inner_mark", "innermost_mark"],
        variables=[W1, W2, W3, W4],
        dtype=tf.as_dtype(dtype),
    )


def cond_between_cuts(dtype: tf.DType = tf.float64, seed: int = 0) -> Case:
    """``h1 -> tf.cond(flag, tanh branch, sin branch) -> h2``, cut at ``h1`` and ``h2`` so
    the ``If`` sits in the middle stage. The true branch holds ``gsc.mark(.., "in_cond")``."""
    rng = np.random.default_rng(seed)
    W1, W2, W3 = (variable(rng, (6 if k == 0 else 8, 8), dtype, f"W{k + 1}") for k in range(3))
    names: dict = {}

    def true_branch(h1):
        t = tf.tanh(tf.matmul(h1, W2), name="cond_tanh")
        names["cond_tanh"] = t.name  # TF's own name inside the branch: "cond/cond_tanh:0"
        return gsc.mark(t, "in_cond")

    @tf.function
    def loss(x, flag):
        h1 = gsc.mark(tf.tanh(tf.matmul(x, W1)), "h1")
        h = tf.cond(flag, lambda: true_branch(h1), lambda: tf.sin(tf.matmul(h1, W2)) * h1)
        h2 = gsc.mark(h, "h2")
        return tf.reduce_mean(tf.tanh(tf.matmul(h2, W3)) ** 2)

    return Case(
        name="cond_between_cuts",
        fn=loss,
        input_signature=[tf.TensorSpec([None, 6], dtype), tf.TensorSpec([], tf.bool)],
        make_args=lambda r: [tensor(r, (5, 6), dtype), tf.constant(True)],
        cuts=["h1", "h2"],
        variables=[W1, W2, W3],
        names=names,
        dtype=tf.as_dtype(dtype),
    )


def while_between_cuts(dtype: tf.DType = tf.float64, iterations: int = 3, seed: int = 0) -> Case:
    """``h1 -> tf.while_loop(3 x tanh(h W2), maximum_iterations=3) -> h2``, cut at ``h1`` and
    ``h2``. The body holds ``gsc.mark(.., "in_while")``."""
    rng = np.random.default_rng(seed)
    W1, W2, W3 = (variable(rng, (6 if k == 0 else 8, 8), dtype, f"W{k + 1}") for k in range(3))
    names: dict = {}

    def body(i, h):
        t = tf.tanh(tf.matmul(h, W2), name="while_tanh")
        names["while_tanh"] = t.name  # TF's own name inside the body: "while/while_tanh:0"
        return i + 1, gsc.mark(t, "in_while")

    @tf.function
    def loss(x):
        h1 = gsc.mark(tf.tanh(tf.matmul(x, W1)), "h1")
        _, h = tf.while_loop(lambda i, h: i < iterations, body, [tf.constant(0), h1],
                             maximum_iterations=iterations)
        h2 = gsc.mark(h, "h2")
        return tf.reduce_mean(tf.tanh(tf.matmul(h2, W3)) ** 2)

    return Case(
        name="while_between_cuts",
        fn=loss,
        input_signature=[tf.TensorSpec([None, 6], dtype)],
        make_args=lambda r: [tensor(r, (5, 6), dtype)],
        cuts=["h1", "h2"],
        variables=[W1, W2, W3],
        names=names,
        dtype=tf.as_dtype(dtype),
    )


# -- Keras -------------------------------------------------------------------------------------


def _keras_case(name: str, model: Any, input_shape: Sequence[int], classes: int, batch: int,
                cuts: list, dtype: tf.DType, crossentropy: bool) -> Case:
    import keras

    @tf.function
    def loss(x, y):
        # Keras reads its floatx when the model is called, too: trace in the case's dtype
        # whatever default another test of this worker left.
        with keras_floatx(tf.as_dtype(dtype).name):
            out = model(x, training=True)
        if crossentropy:
            return tf.reduce_mean(keras.losses.categorical_crossentropy(y, out))
        return tf.reduce_mean(tf.square(out - y))

    def make_args(r):
        x = tensor(r, (batch, *input_shape), dtype)
        if crossentropy:
            y = tf.constant(np.eye(classes)[r.integers(0, classes, size=batch)], dtype)
        else:
            y = tensor(r, (batch, classes), dtype)
        return [x, y]

    return Case(
        name=name,
        fn=loss,
        input_signature=[tf.TensorSpec([None, *input_shape], dtype),
                         tf.TensorSpec([None, classes], dtype)],
        make_args=make_args,
        cuts=cuts,
        variables=list(model.variables),
        dtype=tf.as_dtype(dtype),
        model=model,
    )


def keras_small_functional(dtype: tf.DType = tf.float64, seed: int = 0) -> Case:
    """A functional model with two BatchNormalization layers and a Dropout(0.0), in training
    mode, cut at the layers ``drop_a`` (no ops of its own) and ``bn_b``."""
    import keras

    keras.utils.set_random_seed(seed)
    layers = keras.layers
    with keras_floatx(tf.as_dtype(dtype).name):
        inputs = keras.Input((8,), name="x")
        h = layers.Dense(16, name="dense_a")(inputs)
        h = layers.BatchNormalization(name="bn_a")(h)
        h = layers.Activation("tanh", name="act_a")(h)
        h = layers.Dropout(0.0, name="drop_a")(h)
        h = layers.Dense(16, name="dense_b")(h)
        h = layers.BatchNormalization(name="bn_b")(h)
        h = layers.Activation("tanh", name="act_b")(h)
        out = layers.Dense(3, name="head")(h)
        model = keras.Model(inputs, out, name="small")
    return _keras_case("keras_small_functional", model, (8,), 3, 6, ["drop_a", "bn_b"],
                       dtype, crossentropy=False)


def keras_small_sequential(dtype: tf.DType = tf.float64, seed: int = 0) -> Case:
    """A Sequential model with BatchNormalization, cut at ``seq_bn`` and ``seq_dense_b``."""
    import keras

    keras.utils.set_random_seed(seed)
    layers = keras.layers
    with keras_floatx(tf.as_dtype(dtype).name):
        model = keras.Sequential([
            keras.Input((8,)),
            layers.Dense(16, activation="tanh", name="seq_dense_a"),
            layers.BatchNormalization(name="seq_bn"),
            layers.Dropout(0.0, name="seq_drop"),
            layers.Dense(16, activation="tanh", name="seq_dense_b"),
            layers.Dense(3, name="seq_head"),
        ], name="small_sequential")
    return _keras_case("keras_small_sequential", model, (8,), 3, 6,
                       ["seq_bn", "seq_dense_b"], dtype, crossentropy=False)


RESNET50_CUTS = ["conv2_block3_out", "conv3_block4_out", "conv4_block6_out"]
MOBILENETV2_CUTS = ["block_2_add", "block_6_project_BN", "block_13_expand_relu"]


def resnet50(dtype: tf.DType = tf.float64, batch: int = 2, seed: int = 0) -> Case:
    """ResNet50 (no weights, 32x32 inputs, 10 classes) in training mode, cut at three blocks."""
    import keras

    keras.utils.set_random_seed(seed)
    with keras_floatx(tf.as_dtype(dtype).name):
        model = keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3), classes=10)
    return _keras_case("resnet50", model, (32, 32, 3), 10, batch, list(RESNET50_CUTS), dtype,
                       crossentropy=True)


def mobilenetv2(dtype: tf.DType = tf.float64, batch: int = 2, seed: int = 0) -> Case:
    """MobileNetV2 (no weights, alpha 0.35, 32x32 inputs, 10 classes) in training mode."""
    import keras

    keras.utils.set_random_seed(seed)
    with keras_floatx(tf.as_dtype(dtype).name):
        model = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3),
                                               classes=10, alpha=0.35)
    return _keras_case("mobilenetv2", model, (32, 32, 3), 10, batch, list(MOBILENETV2_CUTS),
                       dtype, crossentropy=True)


def as_tf_variable(variable: Any) -> tf.Variable:
    """The ``tf.Variable`` behind a Keras 3 variable (what ``split.variables`` holds)."""
    import keras

    return variable.value if isinstance(variable, keras.Variable) else variable


def batchnorm_statistics(model: Any) -> list[tf.Variable]:
    """The moving mean and variance of every BatchNormalization layer of ``model``."""
    import keras

    found = []
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.BatchNormalization):
            found += [layer.moving_mean, layer.moving_variance]
    return found


# The small programs, for tests that run over all of them.
SMALL_BUILDERS = {
    "seed": lambda: seed_model(tf.float64),
    "mlp": mlp,
    "parallel_branches": parallel_branches,
    "skip_over_1": lambda: skip_connection(1),
    "skip_over_3": lambda: skip_connection(3),
    "multi_use": multi_use,
    "shared_variable": shared_variable,
    "unconnected_variables": unconnected_variables,
    "integer_labels": integer_labels,
    "counted_mlp": counted_mlp,
}

CONTROL_FLOW_BUILDERS = {
    "nested_functions": nested_functions,
    "cond_between_cuts": cond_between_cuts,
    "while_between_cuts": while_between_cuts,
}

KERAS_SMALL_BUILDERS = {
    "keras_small_functional": keras_small_functional,
    "keras_small_sequential": keras_small_sequential,
}
