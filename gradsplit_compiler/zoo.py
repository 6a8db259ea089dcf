"""The model zoo: every program the tests cut and the benchmarks time, built in one place.

Each builder returns a :class:`Case`: the function to split (``fn``), its
``input_signature``, ``make_args`` (random arguments of any batch from a ``numpy``
generator), the suggested ``cuts``, the ``variables`` it owns, and ``names``: graph tensor
names recorded while ``fn`` was traced (filled on the first trace), so a caller can name a
tensor the way TensorFlow does. Keras cases also carry the ``model``.

Builders are parametrised by ``dtype`` and size, and take ``seed``: an ``int``, or a
``numpy.random.Generator`` whose stream they continue (a benchmark that draws weights and then
inputs from one stream passes the same generator to the builder and to :meth:`Case.args`).
Numbers are fixed by the seed: the tests in ``tests/`` and the figures in ``BENCHMARKS.md``
and ``docs/autosplit.md`` are made from these builders.

Families
--------
* Small programs, float64 by default (the tests): :func:`seed_model`,
  :func:`seed_outputs_model`, :func:`mlp`, :func:`parallel_branches`,
  :func:`skip_connection`, :func:`multi_use`, :func:`shared_variable`,
  :func:`unconnected_variables`, :func:`integer_labels`, :func:`counted_mlp`; with control
  flow: :func:`nested_functions`, :func:`cond_between_cuts`, :func:`while_between_cuts`;
  :func:`skip_net` for pipelines. Registries: ``SMALL_BUILDERS``, ``CONTROL_FLOW_BUILDERS``.
* Dense chains of any size (the benchmarks): :func:`dense_chain`.
* Keras, in training mode: :func:`keras_mlp`, :func:`keras_small_functional`,
  :func:`keras_small_sequential` (``KERAS_SMALL_BUILDERS``), :func:`keras_small_resnet`,
  :func:`resnet50`, :func:`mobilenetv2`, :func:`transformer`; :func:`keras_case` wraps any
  model with a loss.

Keras reads its default float type (``floatx``) when layers are built and when a model is
called: the builders set it only inside :func:`keras_floatx`, which restores it.

Example
-------
>>> import tensorflow as tf
>>> from gradsplit_compiler import zoo
>>> case = zoo.seed_model(tf.float64)
>>> case.cuts
['y']
>>> [tuple(a.shape) for a in case.args(seed=0, batch=3)]
[(3, 10), (3, 5)]
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tensorflow as tf

from gradsplit_compiler.frontend.mark import mark

__all__ = [
    "CONTROL_FLOW_BUILDERS",
    "KERAS_SMALL_BUILDERS",
    "MOBILENETV2_CUTS",
    "RESNET50_CUTS",
    "SMALL_BUILDERS",
    "Case",
    "cond_between_cuts",
    "counted_mlp",
    "dense_chain",
    "integer_labels",
    "keras_case",
    "keras_floatx",
    "keras_mlp",
    "keras_small_functional",
    "keras_small_resnet",
    "keras_small_sequential",
    "mlp",
    "mobilenetv2",
    "multi_use",
    "nested_functions",
    "normal",
    "parallel_branches",
    "resnet50",
    "seed_model",
    "seed_outputs_model",
    "shared_variable",
    "skip_connection",
    "skip_net",
    "tensor",
    "transformer",
    "unconnected_variables",
    "variable",
    "while_between_cuts",
]

Seed = int | np.random.Generator  # a generator is used as it is: its stream continues


@dataclass
class Case:
    """One program to split.

    Attributes
    ----------
    name : str
        A short name (test ids, report rows).
    fn : callable
        The function to split (a ``tf.function``, or a plain function for ``skip_net``).
    input_signature : list of tf.TensorSpec
        Its arguments; the batch dimension is ``None``.
    make_args : callable
        ``make_args(rng, batch) -> list`` of argument tensors.
    cuts : list
        Suggested cuts for ``gsc.split``.
    variables : list
        The variables ``fn`` reads, in creation order.
    names : dict
        Graph tensor names recorded while ``fn`` was traced.
    dtype : tf.DType
        The float type of the program.
    model : keras.Model or None
        The model, for Keras cases.
    batch : int
        The batch :meth:`args` draws when none is given.
    extras : dict
        What a caller may need beyond the loss (the seed model's ``y_of``, a chain's
        ``weights`` and ``biases``).
    """

    name: str
    fn: Callable
    input_signature: list
    make_args: Callable[[np.random.Generator, int], list]
    cuts: list
    variables: list = field(default_factory=list)
    names: dict = field(default_factory=dict)
    dtype: tf.DType = tf.float64
    model: Any = None
    batch: int = 5
    extras: dict = field(default_factory=dict)

    def args(self, seed: Seed = 0, batch: int | None = None) -> list:
        """Random arguments for ``fn``: ``batch`` examples (``self.batch`` by default) from
        ``numpy.random.default_rng(seed)``."""
        return self.make_args(np.random.default_rng(seed),
                              self.batch if batch is None else batch)

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
    """A ``tf.Variable`` of :func:`normal` values times ``scale``."""
    return tf.Variable(normal(rng, shape, dtype, scale), name=name)


def tensor(rng: np.random.Generator, shape: Sequence[int], dtype: tf.DType) -> tf.Tensor:
    """A constant of :func:`normal` values."""
    return tf.constant(normal(rng, shape, dtype))


@contextlib.contextmanager
def keras_floatx(dtype: str) -> Iterator[None]:
    """Build (and call) Keras layers in ``dtype``; the previous defaults come back afterwards.

    Sets Keras' ``floatx`` and its global dtype policy: Keras 3 fixes the policy the first time
    a layer is made without a ``dtype`` (from the floatx of that moment, per thread), after
    which ``set_floatx`` alone no longer changes the type of new layers.
    """
    import keras

    try:
        from keras.src.backend.common import global_state
    except ImportError:  # pragma: no cover - another Keras layout: restore the policy by name
        global_state = None
    previous = keras.backend.floatx()
    previous_policy = (global_state.get_global_attribute("dtype_policy", None)
                       if global_state is not None else keras.config.dtype_policy())
    keras.backend.set_floatx(dtype)
    keras.config.set_dtype_policy(dtype)
    try:
        yield
    finally:
        keras.backend.set_floatx(previous)
        if global_state is not None:
            global_state.set_global_attribute("dtype_policy", previous_policy)
        else:  # pragma: no cover
            keras.config.set_dtype_policy(previous_policy)


# -- the seed problem --------------------------------------------------------------------------


def seed_model(dtype: tf.DType = tf.float32, marked: bool = True, seed: Seed = 0, *,
               features: int = 10, width: int = 5, batch: int = 6,
               scale: float = 0.5) -> Case:
    """``h = W x + b; y = tanh(h); loss = mse(y, y0)``, cut at ``y``.

    Parameters
    ----------
    dtype : tf.DType
        Float type of the variables and arguments.
    marked : bool
        ``True`` names ``y`` with ``gsc.mark(..., "y")``; ``False`` leaves TF's own name,
        ``Tanh:0``, which the cut then uses.
    seed : int or numpy.random.Generator
        Draws ``W`` then ``b`` (normal values times ``scale``).
    features, width, batch : int
        ``x`` is ``[batch, features]``, ``y`` is ``[batch, width]``: the cut holds
        ``batch * width`` elements.

    ``extras["y_of"]`` is ``x -> y`` (the part before the cut), for the Jacobian baselines.
    """
    rng = np.random.default_rng(seed)
    W = variable(rng, (features, width), dtype, "W", scale)
    b = variable(rng, (width,), dtype, "b", scale)
    names: dict = {}

    def y_of(x):
        return tf.tanh(tf.matmul(x, W) + b)

    @tf.function
    def loss(x, y0):
        y = y_of(x)
        names["tanh"] = y.name
        if marked:
            y = mark(y, "y")
        names["y"] = y.name
        return tf.reduce_mean(tf.square(y - y0))

    return Case(
        name=f"seed_{'marked' if marked else 'graph_name'}_{tf.as_dtype(dtype).name}",
        fn=loss,
        input_signature=[tf.TensorSpec([None, features], dtype),
                         tf.TensorSpec([None, width], dtype)],
        make_args=lambda r, n: [tensor(r, (n, features), dtype), tensor(r, (n, width), dtype)],
        batch=batch,
        cuts=["y"] if marked else ["Tanh:0"],
        variables=[W, b],
        names=names,
        dtype=tf.as_dtype(dtype),
        extras={"y_of": y_of},
    )


def seed_outputs_model(dtype: tf.DType = tf.float64, seed: int = 0) -> Case:
    """The seed model returning ``y = tanh(W x + b)`` itself (not a scalar), cut at ``h``."""
    rng = np.random.default_rng(seed)
    W = variable(rng, (10, 5), dtype, "W")
    b = variable(rng, (5,), dtype, "b")

    @tf.function
    def forward(x):
        h = mark(tf.matmul(x, W) + b, "h")
        return tf.tanh(h)

    return Case(
        name=f"seed_outputs_{tf.as_dtype(dtype).name}",
        fn=forward,
        input_signature=[tf.TensorSpec([None, 10], dtype)],
        make_args=lambda r, n: [tensor(r, (n, 10), dtype)],
        batch=6,
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
            h = mark(tf.tanh(tf.matmul(h, W) + b), f"h{k + 1}")
            names[f"h{k + 1}"] = h.name
        return tf.reduce_mean(tf.square(tf.matmul(h, head) - target))

    return Case(
        name=f"mlp{depth}",
        fn=loss,
        input_signature=[tf.TensorSpec([None, 6], dtype), tf.TensorSpec([None, 3], dtype)],
        make_args=lambda r, n: [tensor(r, (n, 6), dtype), tensor(r, (n, 3), dtype)],
        batch=5,
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
        a = mark(tf.tanh(tf.matmul(x, Wa)), "a_branch")
        b = mark(tf.sigmoid(tf.matmul(x, Wb)), "b_branch")
        names["a_branch"], names["b_branch"] = a.name, b.name
        joined = tf.concat([a * b, a - b], axis=1)
        return tf.reduce_mean(tf.tanh(tf.matmul(joined, Wc)) ** 2)

    return Case(
        name="parallel_branches",
        fn=loss,
        input_signature=[tf.TensorSpec([None, 6], dtype)],
        make_args=lambda r, n: [tensor(r, (n, 6), dtype)],
        batch=5,
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
        h1 = h = mark(tf.tanh(tf.matmul(x, weights[0])), "h1")
        names["h1"] = h1.name
        for k in range(1, depth):
            h = mark(tf.tanh(tf.matmul(h, weights[k])), f"h{k + 1}")
            names[f"h{k + 1}"] = h.name
        y = tf.tanh(tf.matmul(h, out)) + h1
        return tf.reduce_mean(y * y)

    return Case(
        name=f"skip_over_{crosses}",
        fn=loss,
        input_signature=[tf.TensorSpec([None, 6], dtype)],
        make_args=lambda r, n: [tensor(r, (n, 6), dtype)],
        batch=5,
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
        h1 = mark(tf.tanh(tf.matmul(x, W1)), "h1")
        h2 = mark(tf.tanh(tf.matmul(h1, W2)), "h2")
        h3 = mark(tf.tanh(tf.matmul(h2, W3)) * h1, "h3")
        names.update(h1=h1.name, h2=h2.name, h3=h3.name)
        return tf.reduce_mean(tf.tanh(tf.matmul(h3, W4)) + tf.sin(h1))

    return Case(
        name="multi_use",
        fn=loss,
        input_signature=[tf.TensorSpec([None, 6], dtype)],
        make_args=lambda r, n: [tensor(r, (n, 6), dtype)],
        batch=5,
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
        h1 = mark(tf.tanh(tf.matmul(x, W) + c), "h1")
        h2 = mark(tf.tanh(tf.matmul(h1, W)), "h2")
        return tf.reduce_mean(tf.square(tf.matmul(h2, W)))

    return Case(
        name="shared_variable",
        fn=loss,
        input_signature=[tf.TensorSpec([None, 8], dtype)],
        make_args=lambda r, n: [tensor(r, (n, 8), dtype)],
        batch=5,
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
        h1 = mark(tf.tanh(tf.matmul(x, W) + tf.stop_gradient(frozen)), "h1")
        return tf.reduce_mean(tf.square(tf.matmul(h1, U)))

    return Case(
        name="unconnected_variables",
        fn=loss,
        input_signature=[tf.TensorSpec([None, 6], dtype)],
        make_args=lambda r, n: [tensor(r, (n, 6), dtype)],
        batch=5,
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
        features = mark(tf.tanh(tf.matmul(x, W1)), "features")
        logits = tf.matmul(features, W2)
        per_example = tf.nn.softmax_cross_entropy_with_logits(
            tf.one_hot(labels, classes, dtype=logits.dtype), logits)
        names["labels"] = labels.name
        return tf.reduce_mean(per_example * tf.gather(class_weight, labels))

    return Case(
        name="integer_labels",
        fn=loss,
        input_signature=[tf.TensorSpec([None, 6], dtype), tf.TensorSpec([None], tf.int32)],
        make_args=lambda r, n: [tensor(r, (n, 6), dtype),
                             tf.constant(r.integers(0, classes, size=n), tf.int32)],
        batch=6,
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
        h1 = mark(tf.tanh(tf.matmul(x, W1)), "h1")
        names["h1"] = h1.name
        return tf.reduce_mean(tf.square(tf.matmul(h1, W2) - target))

    return Case(
        name="counted_mlp",
        fn=loss,
        input_signature=[tf.TensorSpec([None, 6], dtype), tf.TensorSpec([None, 3], dtype)],
        make_args=lambda r, n: [tensor(r, (n, 6), dtype), tensor(r, (n, 3), dtype)],
        batch=5,
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
        return mark(tf.sin(tf.matmul(z, W3), name="innermost_sin"), "innermost_mark") * 2

    @tf.function
    def inner(h):
        z = mark(tf.tanh(tf.matmul(h, W2), name="inner_tanh"), "inner_mark")
        return innermost(z) + z

    @tf.function
    def loss(x):
        h = tf.tanh(tf.matmul(x, W1))
        return tf.reduce_mean(tf.tanh(tf.matmul(inner(h), W4)) ** 2)

    return Case(
        name="nested_functions",
        fn=loss,
        input_signature=[tf.TensorSpec([None, 6], dtype)],
        make_args=lambda r, n: [tensor(r, (n, 6), dtype)],
        batch=5,
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
        return mark(t, "in_cond")

    @tf.function
    def loss(x, flag):
        h1 = mark(tf.tanh(tf.matmul(x, W1)), "h1")
        h = tf.cond(flag, lambda: true_branch(h1), lambda: tf.sin(tf.matmul(h1, W2)) * h1)
        h2 = mark(h, "h2")
        return tf.reduce_mean(tf.tanh(tf.matmul(h2, W3)) ** 2)

    return Case(
        name="cond_between_cuts",
        fn=loss,
        input_signature=[tf.TensorSpec([None, 6], dtype), tf.TensorSpec([], tf.bool)],
        make_args=lambda r, n: [tensor(r, (n, 6), dtype), tf.constant(True)],
        batch=5,
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
        return i + 1, mark(t, "in_while")

    @tf.function
    def loss(x):
        h1 = mark(tf.tanh(tf.matmul(x, W1)), "h1")
        _, h = tf.while_loop(lambda i, h: i < iterations, body, [tf.constant(0), h1],
                             maximum_iterations=iterations)
        h2 = mark(h, "h2")
        return tf.reduce_mean(tf.tanh(tf.matmul(h2, W3)) ** 2)

    return Case(
        name="while_between_cuts",
        fn=loss,
        input_signature=[tf.TensorSpec([None, 6], dtype)],
        make_args=lambda r, n: [tensor(r, (n, 6), dtype)],
        batch=5,
        cuts=["h1", "h2"],
        variables=[W1, W2, W3],
        names=names,
        dtype=tf.as_dtype(dtype),
    )


def skip_net(reduction: str = "mean", replicated: bool = False, slow: int = 0,
             batch: int = 16, seed: Seed = 0) -> Case:
    """Four tanh layers cut at ``c1``, ``c2``, ``c3`` (float64), for pipelines: a skip from the
    input to layer 3 and from layer 1 to the loss, ``W2`` shared by layers 2 and 3.

    Parameters
    ----------
    reduction : {"mean", "sum"}
        How the per-example losses combine (``loss_reduction`` of ``gsc.pipeline``).
    replicated : bool
        Add two arguments every micro-batch gets whole: ``scale`` (a scalar multiplying the
        output) and ``shift`` (``[4]``, added to layer 1's pre-activation).
    slow : int
        That many 600x600 matmuls in stage 1's forward (outside the gradient), so a step
        takes long enough to kill a worker in it.
    batch : int
        The batch :meth:`Case.args` draws.
    seed : int or numpy.random.Generator
        Draws ``W1``, ``b1``, ``W2``, ``V``, ``W3`` (normal values times 0.5).

    ``fn`` is a plain Python function.
    """
    rng = np.random.default_rng(seed)
    v = {name: tf.Variable(rng.normal(size=shape) * 0.5, name=name)
         for name, shape in [("W1", (4, 4)), ("b1", (4,)), ("W2", (4, 4)), ("V", (4, 4)),
                             ("W3", (4, 2))]}
    reduce = tf.reduce_mean if reduction == "mean" else tf.reduce_sum

    def layers(x, shift=None):
        pre = x @ v["W1"] + v["b1"]
        h1 = mark(tf.tanh(pre if shift is None else pre + shift), "c1")
        h2 = tf.tanh(h1 @ v["W2"])
        if slow:
            b = tf.tile(tf.stop_gradient(v["W2"]), [150, 150]) * 0.01
            for _ in range(slow):
                b = tf.tanh(b @ b)
            h2 = h2 + 1e-300 * tf.reduce_sum(b)
        h2 = mark(h2, "c2")
        h3 = mark(tf.tanh(h2 @ v["W2"] + x @ v["V"]), "c3")
        return (h3 + h1) @ v["W3"]

    signature = [tf.TensorSpec([None, 4], tf.float64), tf.TensorSpec([None, 2], tf.float64)]
    if replicated:
        def fn(x, y, scale, shift):
            out = layers(x, shift) * scale
            return reduce(tf.reduce_sum((out - y) ** 2, axis=1))

        signature += [tf.TensorSpec([], tf.float64), tf.TensorSpec([4], tf.float64)]
    else:
        def fn(x, y):
            return reduce(tf.reduce_sum((layers(x) - y) ** 2, axis=1))

    def make_args(r, n):
        args = [tf.constant(r.normal(size=(n, 4))), tf.constant(r.normal(size=(n, 2)))]
        if replicated:
            args += [tf.constant(1.5, tf.float64), tf.constant(r.normal(size=(4,)))]
        return args

    return Case(name=f"skip_net_{reduction}", fn=fn, input_signature=signature,
                make_args=make_args, cuts=["c1", "c2", "c3"], variables=list(v.values()),
                batch=batch, extras={"by_name": v})


# -- dense chains of any size (the benchmarks) --------------------------------------------------

CHAIN_LOSSES = ("mse", "mean_square", "sum_square")


def dense_chain(depth: int = 8, width: int = 512, *, activation: str = "relu",
                bias: bool = False, loss: str = "mse", stages: int | None = None,
                cut_after: Sequence[int] = (), skip: bool = False, scale: float | None = None,
                dtype: tf.DType = tf.float32, batch: int = 128, seed: Seed = 0) -> Case:
    """``depth`` layers ``h = activation(h @ W [+ b])`` of ``width`` units, then a loss.

    Parameters
    ----------
    depth, width : int
        Layers, and units per layer (the input has ``width`` features too).
    activation : {"relu", "tanh"}
    bias : bool
        A zero-initialised bias per layer (created after all the weights).
    loss : {"mse", "mean_square", "sum_square"}
        ``mean((h - y) ** 2)`` against a target ``y`` (a second argument), ``mean(h * h)`` or
        ``sum(h ** 2)``.
    stages : int, optional
        Mark ``stages - 1`` evenly spaced cuts: after layers ``depth // stages - 1``,
        ``2 * depth // stages - 1``, ...
    cut_after : sequence of int
        Mark cuts after these layers instead. Cut ``l{i}`` is the output of layer ``i``.
    skip : bool
        The loss reads ``h + h1`` (``h1`` the first layer's output): a skip connection over
        every cut.
    scale : float, optional
        Weights are normal values times ``scale``; by default divided by ``sqrt(width)``.
    dtype : tf.DType
    batch : int
        The batch :meth:`Case.args` draws (plain normal values: ``x``, then ``y``).
    seed : int or numpy.random.Generator
        Draws the weights, layer by layer.

    ``extras`` holds ``weights`` and ``biases`` (for hand-written baselines).
    """
    if loss not in CHAIN_LOSSES:
        raise ValueError(f"loss must be one of {CHAIN_LOSSES}, not {loss!r}")
    rng = np.random.default_rng(seed)
    np_dtype = tf.as_dtype(dtype).as_numpy_dtype

    def weight():
        w = rng.normal(size=(width, width)).astype(np_dtype)
        return w / width ** 0.5 if scale is None else w * scale

    weights = [tf.Variable(weight()) for _ in range(depth)]
    biases = [tf.Variable(np.zeros(width, np_dtype)) for _ in range(depth)] if bias else []
    act = {"relu": tf.nn.relu, "tanh": tf.tanh}[activation]
    if stages:
        per = depth // stages
        cut_after = range(per - 1, depth - 1, per)
    cut_after = list(cut_after)

    def forward(x):
        h = h1 = x
        for i in range(depth):
            h = h @ weights[i] + biases[i] if bias else h @ weights[i]
            h = act(h)
            if i == 0:
                h1 = h
            if i in cut_after:
                h = mark(h, f"l{i}")
        return h + h1 if skip else h

    if loss == "mse":
        def fn(x, y):
            return tf.reduce_mean((forward(x) - y) ** 2)
    elif loss == "mean_square":
        def fn(x):
            h = forward(x)
            return tf.reduce_mean(h * h)
    else:
        def fn(x):
            return tf.reduce_sum(forward(x) ** 2)

    n_args = 2 if loss == "mse" else 1
    return Case(
        name=f"{activation} chain {depth}x{width}",
        fn=tf.function(fn),
        input_signature=[tf.TensorSpec([None, width], dtype)] * n_args,
        make_args=lambda r, n: [tf.constant(r.normal(size=(n, width)).astype(np_dtype))
                                for _ in range(n_args)],
        cuts=[f"l{i}" for i in cut_after],
        variables=[*weights, *biases],
        dtype=tf.as_dtype(dtype),
        batch=batch,
        extras={"weights": weights, "biases": biases},
    )


# -- Keras -------------------------------------------------------------------------------------

KERAS_LOSSES = ("crossentropy", "mse", "mean_square")


def keras_case(name: str, model: Any, input_shape: Sequence[int],
               output_shape: Sequence[int], batch: int, cuts: list, dtype: tf.DType,
               loss: str = "crossentropy") -> Case:
    """``model(x, training=True)`` with a loss, as a :class:`Case`.

    Parameters
    ----------
    input_shape, output_shape : sequence of int
        One example's input and output shapes.
    loss : {"crossentropy", "mse", "mean_square"}
        Mean categorical cross-entropy against one-hot labels ``y`` (``output_shape`` is
        ``(classes,)``), ``mean(square(out - y))`` against a target ``y``, or
        ``mean(square(out))`` (``fn`` then takes ``x`` only).

    The model is called inside :func:`keras_floatx` of ``dtype``: Keras reads its floatx when
    a model is called, too, and the trace must not depend on what another caller left.
    """
    import keras

    if loss not in KERAS_LOSSES:
        raise ValueError(f"loss must be one of {KERAS_LOSSES}, not {loss!r}")
    output_shape = tuple(output_shape)

    floatx = tf.as_dtype(dtype).name

    # fn names ``model`` itself (not through a helper): gsc.split finds the Keras models a
    # function closes over, to resolve cuts named by layer.
    if loss == "mean_square":
        @tf.function
        def fn(x):
            with keras_floatx(floatx):
                out = model(x, training=True)
            return tf.reduce_mean(tf.square(out))
    else:
        @tf.function
        def fn(x, y):
            with keras_floatx(floatx):
                out = model(x, training=True)
            if loss == "crossentropy":
                return tf.reduce_mean(keras.losses.categorical_crossentropy(y, out))
            return tf.reduce_mean(tf.square(out - y))

    def make_args(r, n):
        x = tensor(r, (n, *input_shape), dtype)
        if loss == "mean_square":
            return [x]
        if loss == "crossentropy":
            classes = output_shape[-1]
            return [x, tf.constant(np.eye(classes)[r.integers(0, classes, size=n)], dtype)]
        return [x, tensor(r, (n, *output_shape), dtype)]

    signature = [tf.TensorSpec([None, *input_shape], dtype)]
    if loss != "mean_square":
        signature.append(tf.TensorSpec([None, *output_shape], dtype))
    return Case(name=name, fn=fn, input_signature=signature, make_args=make_args, cuts=cuts,
                variables=list(model.variables), dtype=tf.as_dtype(dtype), model=model,
                batch=batch)


def keras_mlp(inputs: int = 8, width: int = 16, classes: int = 4, *, dtype: str | None = None,
              sequential: bool = True, name: str = "mlp", batch: int = 5) -> Case:
    """``Dense(relu) -> BatchNormalization -> Dense(tanh) -> Dense(softmax)``, layers
    ``dense1``, ``bn``, ``dense2``, ``head``, kernels ``GlorotUniform(seed=0)``; the input
    is named ``x``. The loss is the cross-entropy, cut at ``bn`` and ``dense2``.

    Parameters
    ----------
    dtype : str, optional
        Spelled out on every layer (then Keras' floatx does not matter); by default the
        layers take Keras' floatx when built.
    sequential : bool
        A ``keras.Sequential`` model, or a functional ``keras.Model``.
    """
    import keras

    init = keras.initializers.GlorotUniform(seed=0)
    kw = {} if dtype is None else {"dtype": dtype}
    stack = [
        keras.layers.Dense(width, activation="relu", kernel_initializer=init, name="dense1",
                           **kw),
        keras.layers.BatchNormalization(name="bn", **kw),
        keras.layers.Dense(width, activation="tanh", kernel_initializer=init, name="dense2",
                           **kw),
        keras.layers.Dense(classes, activation="softmax", kernel_initializer=init,
                           name="head", **kw),
    ]
    if sequential:
        model = keras.Sequential([keras.Input((inputs,), name="x", **kw), *stack], name=name)
    else:
        h = x = keras.Input((inputs,), name="x", **kw)
        for layer in stack:
            h = layer(h)
        model = keras.Model(x, h, name=name)
    return keras_case(name, model, (inputs,), (classes,), batch, ["bn", "dense2"],
                      tf.as_dtype(dtype or keras.backend.floatx()))


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
    return keras_case("keras_small_functional", model, (8,), (3,), 6, ["drop_a", "bn_b"],
                      dtype, loss="mse")


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
    return keras_case("keras_small_sequential", model, (8,), (3,), 6,
                      ["seq_bn", "seq_dense_b"], dtype, loss="mse")


def keras_small_resnet(dtype: tf.DType = tf.float64, batch: int = 4, seed: int = 0,
                       loss: str = "crossentropy") -> Case:
    """A small convolutional ResNet on 8x8x3 inputs: a stem (``stem``, ``stem_bn``), three
    residual blocks of two 3x3 convolutions with batch norm (``block{b}_conv1`` ...
    ``block{b}_add``), global average pooling and ``head`` (3 outputs); no cuts suggested
    (it is what ``auto_split`` is tried on). ``loss`` as in :func:`keras_case`."""
    import keras

    keras.utils.set_random_seed(seed)
    layers = keras.layers
    with keras_floatx(tf.as_dtype(dtype).name):
        inputs = keras.Input((8, 8, 3))
        h = layers.Conv2D(8, 3, padding="same", name="stem")(inputs)
        h = layers.BatchNormalization(name="stem_bn")(h)
        h = layers.Activation("relu")(h)
        for b in range(3):
            r = layers.Conv2D(8, 3, padding="same", name=f"block{b}_conv1")(h)
            r = layers.BatchNormalization(name=f"block{b}_bn1")(r)
            r = layers.Activation("relu")(r)
            r = layers.Conv2D(8, 3, padding="same", name=f"block{b}_conv2")(r)
            r = layers.BatchNormalization(name=f"block{b}_bn2")(r)
            h = layers.Activation("relu")(layers.Add(name=f"block{b}_add")([h, r]))
        h = layers.GlobalAveragePooling2D()(h)
        out = layers.Dense(3, name="head")(h)
        model = keras.Model(inputs, out, name="small_resnet")
    return keras_case("small_resnet", model, (8, 8, 3), (3,), batch, [], dtype, loss=loss)


RESNET50_CUTS = ["conv2_block3_out", "conv3_block4_out", "conv4_block6_out"]
MOBILENETV2_CUTS = ["block_2_add", "block_6_project_BN", "block_13_expand_relu"]


def resnet50(dtype: tf.DType = tf.float64, batch: int = 2, seed: int = 0, *,
             resolution: int = 32, classes: int = 10) -> Case:
    """ResNet50 (``keras.applications``, no weights, ``resolution`` x ``resolution`` inputs)
    in training mode with a cross-entropy loss, cut at three blocks (``RESNET50_CUTS``)."""
    import keras

    keras.utils.set_random_seed(seed)
    shape = (resolution, resolution, 3)
    with keras_floatx(tf.as_dtype(dtype).name):
        model = keras.applications.ResNet50(weights=None, input_shape=shape, classes=classes)
    return keras_case("resnet50", model, shape, (classes,), batch, list(RESNET50_CUTS), dtype)


def mobilenetv2(dtype: tf.DType = tf.float64, batch: int = 2, seed: int = 0, *,
                resolution: int = 32, classes: int = 10, alpha: float = 0.35) -> Case:
    """MobileNetV2 (no weights, width ``alpha``) in training mode with a cross-entropy loss,
    cut at three blocks (``MOBILENETV2_CUTS``)."""
    import keras

    keras.utils.set_random_seed(seed)
    shape = (resolution, resolution, 3)
    with keras_floatx(tf.as_dtype(dtype).name):
        model = keras.applications.MobileNetV2(weights=None, input_shape=shape,
                                               classes=classes, alpha=alpha)
    return keras_case("mobilenetv2", model, shape, (classes,), batch,
                      list(MOBILENETV2_CUTS), dtype)


def transformer(dtype: tf.DType = tf.float32, batch: int = 16, seed: int = 0, *,
                blocks: int = 4, seq: int = 64, dim: int = 128, heads: int = 4,
                activation: str = "gelu", loss: str = "mse") -> Case:
    """``blocks`` post-norm transformer encoder blocks: ``MultiHeadAttention`` (``attn{i}``,
    einsum), ``LayerNormalization`` (``ln{i}a``), a dense MLP of ``4 * dim`` units
    (``ff{i}a`` with ``activation``, ``ff{i}b``) and a second ``LayerNormalization``
    (``block{i}``, the block's output). Cut after every block but the last.

    ``loss`` as in :func:`keras_case`: ``"mse"`` against a ``[seq, dim]`` target, or
    ``"mean_square"`` of the output.
    """
    import keras

    keras.utils.set_random_seed(seed)
    layers = keras.layers
    with keras_floatx(tf.as_dtype(dtype).name):
        inputs = keras.Input((seq, dim))
        h = inputs
        for i in range(blocks):
            a = layers.MultiHeadAttention(heads, dim // heads, name=f"attn{i}")(h, h)
            h = layers.LayerNormalization(name=f"ln{i}a")(h + a)
            f = layers.Dense(4 * dim, activation=activation, name=f"ff{i}a")(h)
            f = layers.Dense(dim, name=f"ff{i}b")(f)
            h = layers.LayerNormalization(name=f"block{i}")(h + f)
        model = keras.Model(inputs, h, name="transformer")
    return keras_case("transformer", model, (seq, dim), (seq, dim), batch,
                      [f"block{i}" for i in range(blocks - 1)], dtype, loss=loss)


# The small programs, for callers that run over all of them.
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
