"""The checks the tests share, and the programs they cut (re-exported from the zoo).

The programs live in ``gradsplit_compiler.zoo`` (shared with ``tools/``): every builder there
returns a ``Case`` (the function to split, its ``input_signature``, random arguments from a
seeded ``numpy`` generator, never zeros, the suggested cuts, the variables it owns and
``names`` recorded while tracing). This module re-exports them, so ``from models import mlp``
keeps working, and adds what only tests need: the tape reference, relative errors, the
asserts, snapshots of variables, Grappler off.

The reference is always ``tf.GradientTape`` on the original ``fn``, compiled the same way as
the composed stages (``jit_compile`` on both sides or on neither): compare like with like.
Errors are measured one way, by :func:`rel_errors` (and :func:`max_rel_error`,
:func:`value_rel_error`): every test and driver uses these.

The Keras builders re-exported here (``keras_small_functional``, ``keras_small_sequential``,
``keras_small_resnet``, ``resnet50``, ``mobilenetv2``, ``KERAS_SMALL_BUILDERS``) give every
variable random values no initialiser produces (:func:`randomize_model`: biases, batch-norm
``beta``/``gamma`` and moving statistics included), so a zero bias or an identity batch norm
cannot hide a bug.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pytest
import tensorflow as tf

import gradsplit_compiler as gsc
from gradsplit_compiler import zoo
from gradsplit_compiler.core.verify import reference_value_and_grads
from gradsplit_compiler.zoo import (  # noqa: F401 - the programs, for the tests
    CONTROL_FLOW_BUILDERS,
    MOBILENETV2_CUTS,
    RESNET50_CUTS,
    SMALL_BUILDERS,
    Case,
    cond_between_cuts,
    counted_mlp,
    integer_labels,
    keras_case,
    keras_floatx,
    mlp,
    multi_use,
    nested_functions,
    normal,
    parallel_branches,
    seed_model,
    seed_outputs_model,
    shared_variable,
    skip_connection,
    skip_net,
    tensor,
    unconnected_variables,
    variable,
    while_between_cuts,
)

# Relative tolerance by dtype, as docs/api.md states for gsc.verify.
RTOL = {tf.float32: 1e-5, tf.float64: 1e-12}

# Both sides under XLA, or both in graph mode.
MODES = pytest.mark.parametrize("jit_compile", [True, False], ids=["xla", "graph"])


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


# -- Keras helpers -----------------------------------------------------------------------------


def as_tf_variable(var: Any) -> tf.Variable:
    """The ``tf.Variable`` behind a Keras 3 variable (what ``split.variables`` holds)."""
    import keras

    return var.value if isinstance(var, keras.Variable) else var


def batchnorm_statistics(model: Any) -> list[tf.Variable]:
    """The moving mean and variance of every BatchNormalization layer of ``model``."""
    import keras

    found = []
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.BatchNormalization):
            found += [layer.moving_mean, layer.moving_variance]
    return found


# -- random, non-default weights ---------------------------------------------------------------

# Variables Keras initialises to ones (a scale, a variance): redrawn in [0.5, 1.5], positive.
_POSITIVE = ("gamma", "variance", "scale")


def randomize_variables(variables: Sequence, seed: int | np.random.Generator = 0,
                        scale: float = 0.1) -> None:
    """Give every variable random values that no initialiser produces.

    Keras' defaults hide bugs: a zero bias, a batch norm with mean 0 and variance 1 is an
    identity that a wrong residual or a missed variable passes through unchanged. A variable
    that holds one value everywhere (biases, ``beta`` and ``moving_mean`` zeros; ``gamma`` and
    ``moving_variance`` ones) is redrawn: normal times ``scale``, or uniform in [0.5, 1.5] for
    scales and variances. A variable already random (a kernel) is redrawn with its own
    standard deviation, so the activations of a deep network keep their size. Integer
    variables (counters, seeds) are left alone.
    """
    rng = np.random.default_rng(seed)
    for var in variables:
        var = as_tf_variable(var)
        if not var.dtype.is_floating:
            continue
        current = var.numpy()
        shape, np_dtype = current.shape, current.dtype
        name = var.name.rsplit("/", 1)[-1].lower()
        if any(word in name for word in _POSITIVE):
            new = rng.uniform(0.5, 1.5, size=shape)
        elif current.size > 1 and float(np.std(current)) > 0.0:
            new = rng.normal(size=shape) * float(np.std(current))
        else:
            new = rng.normal(size=shape) * scale
        new = np.where(np.abs(new) < 1e-3 * scale, 1e-3 * scale, new)
        var.assign(new.astype(np_dtype))


def randomize_model(model: Any, seed: int | np.random.Generator = 0) -> Any:
    """:func:`randomize_variables` on every variable of a Keras model (trainable or not:
    batch-norm moving statistics included); returns the model."""
    randomize_variables(model.variables, seed)
    return model


def assert_no_default_values(variables: Sequence) -> None:
    """No floating-point variable holds one value everywhere (zeros, ones): what
    :func:`randomize_variables` guarantees, checked where a test relies on it."""
    for var in variables:
        var = as_tf_variable(var)
        values = var.numpy()
        if var.dtype.is_floating and values.size > 1:
            assert np.unique(values).size > 1, f"{var.name} holds {values.flat[0]} everywhere"


def _randomized(build: Callable) -> Callable:
    """``build`` (a zoo Keras builder), then :func:`randomize_model` on its model, seeded by
    the builder's ``seed``."""
    def wrapper(*args, **kwargs):
        case = build(*args, **kwargs)
        randomize_model(case.model, np.random.default_rng([1_000, kwargs.get("seed", 0)]))
        return case

    wrapper.__name__ = build.__name__
    wrapper.__doc__ = f"``zoo.{build.__name__}`` with random, non-default weights."
    return wrapper


keras_small_functional = _randomized(zoo.keras_small_functional)
keras_small_sequential = _randomized(zoo.keras_small_sequential)
keras_small_resnet = _randomized(zoo.keras_small_resnet)
resnet50 = _randomized(zoo.resnet50)
mobilenetv2 = _randomized(zoo.mobilenetv2)
KERAS_SMALL_BUILDERS = {"keras_small_functional": keras_small_functional,
                        "keras_small_sequential": keras_small_sequential}


# -- the tape on the original function, and devices --------------------------------------------


def tape_value_and_gradients(fn: Callable, variables: Sequence[tf.Variable], args: Sequence,
                             jit_compile: bool = False) -> tuple:
    """``(value, grads)`` of ``tf.GradientTape`` on ``fn(*args)`` at the variables' current
    values (``reference_value_and_grads`` called once). The variables ``fn`` assigns are put
    back: the reference does not train the model."""
    variables = list(variables)
    start = snapshot(variables)
    try:
        return reference_value_and_grads(fn, variables, jit_compile)(*args)
    finally:
        restore(variables, start)


def assert_matches(value, grads, reference: tuple, rtol: float, what: str = "") -> None:
    """``value`` and ``grads`` within ``rtol`` of ``reference = (value, grads)`` (the tape's),
    by :func:`value_rel_error` and :func:`rel_errors`."""
    ref_value, ref_grads = reference
    value_error = value_rel_error(value, ref_value)
    assert value_error <= rtol, f"{what} value: relative error {value_error:.3g} > {rtol:g}"
    errors = rel_errors(grads, ref_grads)
    worst = max(errors, default=0.0)
    assert worst <= rtol, (f"{what} gradients: relative error {worst:.3g} > {rtol:g} "
                           f"(gradient {errors.index(worst)})")


def move_weights(variables: Sequence[tf.Variable], seed: int | np.random.Generator,
                 scale: float = 0.5) -> None:
    """Assign new random values (normal times ``scale``, never zero) to every floating-point
    variable: a multi-step test calls it between steps, so a stale copy of a weight anywhere
    (a replica on another device or task) gives a wrong gradient."""
    rng = np.random.default_rng(seed)
    for var in variables:
        var = as_tf_variable(var)
        if var.dtype.is_floating:
            var.assign(zoo.normal(rng, var.shape, var.dtype, scale))


NUM_CPU_DEVICES = 4  # tests/conftest.py configures this many logical CPUs


def cpu_devices(n: int) -> list[str]:
    """``["/CPU:0", ..., "/CPU:<n-1>"]``; fails (never skips) when fewer logical CPU devices
    exist: tests/conftest.py configures four before TensorFlow starts, and a test that needs
    them must not pass by not running."""
    found = len(tf.config.list_logical_devices("CPU"))
    assert found >= n, (
        f"this test needs {n} logical CPU devices, TensorFlow has {found}: tests/conftest.py "
        f"configures {NUM_CPU_DEVICES} before TensorFlow starts; something initialised "
        "TensorFlow before conftest ran")
    return [f"/CPU:{d}" for d in range(n)]
