"""TARGET: what the ``gradsplit`` command works on, turned into ``fn`` and ``input_signature``.

A TARGET is one of

* ``package.module:function`` (or ``path/to/file.py:function``): a ``tf.function`` with an
  ``input_signature``, or any callable given ``--signature``. A dotted attribute path works
  (``module:model.loss``). When the attribute is a ``keras.Model``, it is treated as below.
* ``model.keras``: a saved Keras model. ``fn(*inputs, labels)`` is the mean over the batch of
  a Keras loss of ``model(*inputs, training=...)``: the loss the model was compiled with, or
  ``--loss NAME``; ``--loss none`` differentiates the model's outputs themselves.
* a SavedModel directory: its signature ``--signature-key`` (default ``serving_default``),
  called with its inputs in the signature's order; ``--loss`` as for Keras models.

Signature syntax (``--signature`` and ``--labels``): specs separated by commas, each
``[dims]`` or ``[dims]:dtype``; a dimension is an integer or ``None`` (unknown, such as the
batch); the dtype defaults to ``float32``. ``"[None,10]:float32,[None,5]"`` is two arguments,
``"[]:float64"`` a scalar.

Example
-------
>>> from gradsplit_compiler.cli.targets import parse_signature
>>> parse_signature("[None,10]:float64, [None]:int32")  # doctest: +SKIP
[TensorSpec(shape=(None, 10), dtype=tf.float64, name=None), TensorSpec(shape=(None,), ...)]
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradsplit_compiler.errors import GradSplitError, close_names

__all__ = ["COMMON_LOSSES", "NO_LOSS", "SAVED_MODEL_KEY", "SIGNATURE_HELP", "FlagError",
           "Target", "TargetError", "format_spec", "load_target", "parse_signature",
           "random_args"]

SIGNATURE_HELP = (
    "specs separated by commas, each [dims]:dtype, a dim an integer or None, the dtype "
    "float32 when left out; e.g. \"[None,10]:float32,[None,5]:float32\""
)
SAVED_MODEL_KEY = "serving_default"
COMMON_LOSSES = ("mse", "mae", "categorical_crossentropy", "sparse_categorical_crossentropy",
                 "binary_crossentropy", "huber")
NO_LOSS = "none"

_SPEC = re.compile(r"\s*\[(?P<dims>[^\[\]]*)\]\s*(?::\s*(?P<dtype>[A-Za-z0-9_]+))?\s*")


class TargetError(GradSplitError):
    """A TARGET (or one of the flags that describe it) cannot be loaded as given."""


class FlagError(TargetError):
    """A flag does not fit the TARGET or cannot be read: wrong usage of the command line."""


@dataclass
class Target:
    """A loaded TARGET: ``fn`` and its ``input_signature``, and what the CLI says about it.

    ``labels`` is the index of the labels argument (Keras and SavedModel targets with a
    loss), ``labels_kind`` how random labels are drawn: ``one-hot``, ``binary``, ``sparse``
    (integers below ``classes``) or ``normal``.
    """

    text: str
    kind: str  # "function", "keras" or "saved_model"
    fn: Callable
    input_signature: list
    arg_labels: list[str]
    description: str
    training: bool | None = None
    labels: int | None = None
    labels_kind: str = "normal"
    classes: int = 0
    keep_alive: list = field(default_factory=list)  # a loaded SavedModel owns its variables


# -- signatures ----------------------------------------------------------------------------


def parse_signature(text: str, flag: str = "--signature") -> list:
    """``"[None,10]:float32,[None]:int32"`` -> a list of ``tf.TensorSpec``."""
    import tensorflow as tf

    specs, position = [], 0
    text = text.strip()
    if not text:
        raise FlagError(f"{flag} is empty; write {SIGNATURE_HELP}.")
    while position < len(text):
        match = _SPEC.match(text, position)
        if match is None:
            raise FlagError(
                f"{flag} {text!r}: cannot read a spec at character {position + 1} "
                f"({text[position:position + 12]!r}); write {SIGNATURE_HELP}."
            )
        dims = [d.strip() for d in match["dims"].split(",")] if match["dims"].strip() else []
        shape = []
        for d in dims:
            if d in ("None", "none", "?", "-1"):
                shape.append(None)
            elif d.isdigit():
                shape.append(int(d))
            else:
                raise FlagError(
                    f"{flag} {text!r}: dimension {d!r} is neither an integer nor None."
                )
        name = match["dtype"] or "float32"
        try:
            dtype = tf.as_dtype(name)
        except TypeError:
            raise FlagError(
                f"{flag} {text!r}: {name!r} is not a TensorFlow dtype (float32, float64, "
                "int32, int64, bool, ...)."
            ) from None
        specs.append(tf.TensorSpec(shape, dtype))
        position = match.end()
        if position < len(text):
            if text[position] != ",":
                raise FlagError(
                    f"{flag} {text!r}: expected ',' between specs at character "
                    f"{position + 1}; write {SIGNATURE_HELP}."
                )
            position += 1
    return specs


def format_spec(spec: Any) -> str:
    """``TensorSpec([None, 10], float32)`` -> ``"[None,10]:float32"`` (the syntax above)."""
    dims = "?" if spec.shape.rank is None else ",".join(
        "None" if d is None else str(d) for d in spec.shape.as_list()
    )
    return f"[{dims}]:{spec.dtype.name}"


# -- loading -------------------------------------------------------------------------------


def load_target(text: str, *, signature: str | None = None, loss: str | None = None,
                labels: str | None = None, training: bool = False,
                signature_key: str | None = None, output_key: str | None = None,
                float64: bool = False) -> Target:
    """Turn TARGET ``text`` and its flags into a ``Target``; ``TargetError`` when it can't."""
    if os.path.isdir(text):
        _refuse(f"a SavedModel (TARGET {text})", signature=signature, training=training,
                float64=float64)
        return _saved_model_target(text, signature_key or SAVED_MODEL_KEY, loss, labels,
                                   output_key)
    if text.endswith((".keras", ".h5")):
        if not os.path.exists(text):
            raise TargetError(f"TARGET {text}: no such file.")
        _refuse(f"a Keras model (TARGET {text})", signature=signature,
                signature_key=signature_key, output_key=output_key)
        return _keras_target(text, _load_keras_file(text), loss, labels, training, float64)
    if ":" not in text:
        raise TargetError(
            f"TARGET {text!r} is neither package.module:function, a .keras file nor a "
            "SavedModel directory (no such file or directory)."
        )
    obj = _import_attribute(text)
    if _is_keras_model(obj):
        _refuse(f"a Keras model (TARGET {text})", signature=signature,
                signature_key=signature_key, output_key=output_key)
        return _keras_target(text, obj, loss, labels, training, float64)
    _refuse(f"a function (TARGET {text}), which computes its own value", loss=loss,
            labels=labels, training=training, signature_key=signature_key,
            output_key=output_key)
    if float64:
        raise FlagError(
            f"--float64 rebuilds a Keras model in float64; TARGET {text} is a function: "
            "declare float64 in its input_signature (or --signature) and its variables."
        )
    return _function_target(text, obj, signature)


def _refuse(what: str, **flags: Any) -> None:
    given = [name for name, value in flags.items() if value not in (None, False)]
    if given:
        raise FlagError(f"--{given[0].replace('_', '-')} does not apply to {what}.")


def _import_attribute(text: str) -> Any:
    module_name, _, attribute = text.rpartition(":")
    if not module_name or not attribute:
        raise TargetError(f"TARGET {text!r}: write it as package.module:function.")
    try:
        if module_name.endswith(".py"):
            if not os.path.exists(module_name):
                raise TargetError(f"TARGET {text}: no such file {module_name}.")
            name = "gradsplit_target_" + re.sub(r"\W", "_", os.path.basename(module_name)[:-3])
            spec = importlib.util.spec_from_file_location(name, module_name)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.insert(0, os.getcwd())  # as `python -m` would
            module = importlib.import_module(module_name)
    except TargetError:
        raise
    except ImportError as exc:
        raise TargetError(
            f"TARGET {text}: cannot import {module_name!r} ({exc}); is its directory on "
            "PYTHONPATH or the current directory?"
        ) from exc
    except Exception as exc:
        raise TargetError(
            f"TARGET {text}: importing {module_name!r} failed: {type(exc).__name__}: "
            f"{_first_line(exc)}"
        ) from exc
    obj = module
    for part in attribute.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = close_names(part, names)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise TargetError(f"TARGET {text}: {module_name} has no attribute {part!r}.{hint}")
        obj = getattr(obj, part)
    return obj


def _function_target(text: str, fn: Any, signature: str | None) -> Target:
    if not callable(fn):
        raise TargetError(f"TARGET {text} is a {type(fn).__name__}, not a function.")
    if signature is not None:
        specs = parse_signature(signature)
    else:
        specs = getattr(fn, "input_signature", None)
        if specs is None:
            raise FlagError(
                f"TARGET {text} has no input_signature; give one with --signature, "
                f"{SIGNATURE_HELP}."
            )
        specs = list(specs)
    labels = _parameter_names(fn, len(specs))
    described = ", ".join(f"{n} {format_spec(s)}" for n, s in zip(labels, _flat(specs)))
    return Target(text=text, kind="function", fn=fn, input_signature=specs, arg_labels=labels,
                  description=f"{text}({described})")


def _parameter_names(fn: Any, count: int) -> list[str]:
    import inspect

    target = getattr(fn, "python_function", fn)
    try:
        params = [p.name for p in inspect.signature(target).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    if len(params) < count:
        params += [f"arg{i}" for i in range(len(params), count)]
    return params[:count]


def _flat(specs: Sequence) -> list:
    import tensorflow as tf

    return tf.nest.flatten(list(specs))


# -- Keras models --------------------------------------------------------------------------


def _is_keras_model(obj: Any) -> bool:
    try:
        import keras
    except ImportError:  # pragma: no cover - keras ships with tensorflow >= 2.16
        return False
    return isinstance(obj, keras.Model)


def _load_keras_file(path: str) -> Any:
    import keras

    try:
        return keras.models.load_model(path)
    except Exception as exc:
        raise TargetError(
            f"cannot load the Keras model {path}: {type(exc).__name__}: {_first_line(exc)}"
        ) from exc


def _keras_target(text: str, model: Any, loss: str | None, labels: str | None,
                  training: bool, float64: bool) -> Target:
    import tensorflow as tf

    if not getattr(model, "inputs", None):
        raise TargetError(
            f"{text}: the model has no known inputs (a subclassed model?); call it from a "
            "tf.function with an input_signature and give that function as TARGET."
        )
    if float64:
        model = _as_float64(text, model)
    if len(model.outputs) != 1 and loss != NO_LOSS:
        raise FlagError(
            f"{text}: the model has {len(model.outputs)} outputs; --loss handles a model with "
            "one. Give --loss none to differentiate every output, or write a function "
            "(module:function) that computes your loss."
        )
    dtype = tf.float64 if float64 else tf.float32
    input_labels = _unique_names([getattr(t, "name", None) or f"input{i}"
                                  for i, t in enumerate(model.inputs)] + ["labels"])
    input_specs = [tf.TensorSpec(t.shape, dtype if _floating(t.dtype) else tf.as_dtype(t.dtype),
                                 name=label)
                   for t, label in zip(model.inputs, input_labels)]
    output_spec = tf.TensorSpec(model.outputs[0].shape, dtype)
    loss_name, loss_fn = _loss(text, loss if loss is not None else _compiled_loss(model))

    # ``model`` itself is a closure cell of the function split traces: that is how
    # capture finds the Keras model, so that a cut can name one of its layers.
    def call(*inputs):
        return model(list(inputs) if len(inputs) > 1 else inputs[0], training=training)

    mode = f"training={training}"
    if loss_fn is None:
        return Target(text=text, kind="keras", fn=call, input_signature=input_specs,
                      arg_labels=input_labels[:-1], training=training,
                      description=f"{text}: {model.name}({', '.join(input_labels[:-1])}, "
                                  f"{mode})")

    labels_spec, kind, classes = _labels_spec(loss_name, output_spec, labels, input_labels[-1])

    def mean_loss(*args):
        inputs = args[:-1]
        outputs = model(list(inputs) if len(inputs) > 1 else inputs[0], training=training)
        return tf.reduce_mean(loss_fn(args[-1], outputs))

    description = (f"{text}: mean {loss_name}({input_labels[-1]}, {model.name}"
                   f"({', '.join(input_labels[:-1])}, {mode}))")
    return Target(text=text, kind="keras", fn=mean_loss,
                  input_signature=input_specs + [labels_spec],
                  arg_labels=input_labels, description=description,
                  training=training, labels=len(input_specs), labels_kind=kind,
                  classes=classes)


def _floating(dtype: Any) -> bool:
    import tensorflow as tf

    return tf.as_dtype(dtype).is_floating


def _as_float64(text: str, model: Any) -> Any:
    """A copy of ``model`` whose layers compute in float64, with the same weights."""
    import keras

    def clone_layer(layer):
        config = layer.get_config()
        config["dtype"] = "float64"
        return layer.__class__.from_config(config)

    try:
        copy = keras.models.clone_model(model, clone_function=clone_layer)
        copy.set_weights([w.astype(np.float64) if np.issubdtype(w.dtype, np.floating) else w
                          for w in model.get_weights()])
    except Exception as exc:
        raise TargetError(
            f"{text}: --float64 could not rebuild the model in float64 ({type(exc).__name__}: "
            f"{_first_line(exc)}); it works for functional and Sequential models."
        ) from exc
    return copy


def _compiled_loss(model: Any) -> Any:
    found = getattr(model, "loss", None)
    if found is None:
        raise FlagError(
            f"the model {model.name!r} was saved without a loss; name one with --loss "
            f"({', '.join(COMMON_LOSSES)}), or --loss none to differentiate its outputs."
        )
    return found


def _loss(text: str, loss: Any) -> tuple[str, Callable | None]:
    import keras

    if isinstance(loss, str) and loss.lower() == NO_LOSS:
        return NO_LOSS, None
    try:
        fn = keras.losses.get(loss)
    except (ValueError, TypeError):
        fn = None
    if fn is None:
        raise FlagError(
            f"--loss {loss!r} is not a Keras loss; try one of {', '.join(COMMON_LOSSES)}, or "
            "none to differentiate the outputs."
        )
    name = loss if isinstance(loss, str) else getattr(fn, "name", None) or type(fn).__name__
    return name, fn


def _labels_spec(loss_name: str, output_spec: Any, labels: str | None, name: str):
    """``(spec, kind, classes)`` of the labels argument, named ``name``."""
    import tensorflow as tf

    key = loss_name.lower().replace("_", "")
    classes = output_spec.shape[-1] if output_spec.shape.rank else 0
    if "sparse" in key:
        kind = "sparse"
        default = tf.TensorSpec(output_spec.shape[:-1], tf.int32, name=name)
    else:
        kind = ("one-hot" if "categorical" in key or "kldivergence" in key
                else "binary" if "binary" in key or "hinge" in key else "normal")
        default = tf.TensorSpec(output_spec.shape, output_spec.dtype, name=name)
    if labels is None:
        return default, kind, int(classes or 0)
    specs = parse_signature(labels, flag="--labels")
    if len(specs) != 1:
        raise FlagError(f"--labels {labels!r} must be one spec, e.g. \"[None,10]:float32\".")
    return tf.TensorSpec(specs[0].shape, specs[0].dtype, name=name), kind, int(classes or 0)


def _unique_names(names: list[str]) -> list[str]:
    """Valid, distinct graph names (they name the argument placeholders)."""
    out: list[str] = []
    for name in names:
        name = re.sub(r"[^A-Za-z0-9_.\-]", "_", name) or "arg"
        if not re.match(r"[A-Za-z0-9.]", name):
            name = "arg" + name
        candidate, k = name, 1
        while candidate in out:
            candidate, k = f"{name}_{k}", k + 1
        out.append(candidate)
    return out


# -- SavedModels ---------------------------------------------------------------------------


def _saved_model_target(path: str, key: str, loss: str | None, labels: str | None,
                        output: str | None) -> Target:
    """``output`` is the output key (``--output-key``) the loss applies to."""
    import tensorflow as tf

    if not os.path.exists(os.path.join(path, "saved_model.pb")):
        raise TargetError(f"TARGET {path} is a directory without saved_model.pb: not a "
                          "SavedModel.")
    try:
        loaded = tf.saved_model.load(path)
    except Exception as exc:
        raise TargetError(
            f"cannot load the SavedModel {path}: {type(exc).__name__}: {_first_line(exc)}"
        ) from exc
    signatures = dict(loaded.signatures)
    if key not in signatures:
        have = ", ".join(sorted(signatures)) or "none"
        raise FlagError(f"the SavedModel {path} has no signature {key!r}; its signatures: "
                          f"{have}. Choose one with --signature-key.")
    function = signatures[key]
    _, kwargs = function.structured_input_signature
    # kwargs has no reliable order; the function type lists the parameters as declared.
    declared = list(getattr(getattr(function, "function_type", None), "parameters", None) or [])
    names = [n for n in declared if n in kwargs] + sorted(n for n in kwargs if n not in declared)
    labels_name = _unique_names(names + ["labels"])[-1]
    specs = [tf.TensorSpec(kwargs[n].shape, kwargs[n].dtype, name=g)
             for n, g in zip(names, _unique_names(names))]
    outputs = function.structured_outputs
    keys = list(outputs) if isinstance(outputs, dict) else []
    if output is not None and output not in keys:
        raise FlagError(f"the signature {key!r} has no output {output!r}; its outputs: "
                          f"{', '.join(keys)}.")
    if output is None and len(keys) == 1:
        output = keys[0]

    def call(*args):
        result = function(**dict(zip(names, args)))
        return result[output] if output is not None else result

    where = f"{path} [{key}]"
    if loss is None or loss.lower() == NO_LOSS:
        return Target(text=path, kind="saved_model", fn=call, input_signature=specs,
                      arg_labels=names, keep_alive=[loaded],
                      description=f"{where}: {output or 'outputs'}({', '.join(names)})")
    if output is None:
        raise FlagError(f"the signature {key!r} has outputs {', '.join(keys)}; choose the "
                          "one --loss applies to with --output-key.")
    loss_name, loss_fn = _loss(path, loss)
    output_spec = outputs[output]
    labels_spec, kind, classes = _labels_spec(loss_name, output_spec, labels, labels_name)

    def mean_loss(*args):
        return tf.reduce_mean(loss_fn(args[-1], call(*args[:-1])))

    return Target(text=path, kind="saved_model", fn=mean_loss,
                  input_signature=specs + [labels_spec], arg_labels=names + [labels_name],
                  description=f"{where}: mean {loss_name}(labels, {output}"
                              f"({', '.join(names)}))",
                  labels=len(specs), labels_kind=kind, classes=classes, keep_alive=[loaded])


# -- random arguments ----------------------------------------------------------------------


INT_HIGH = 2  # integer arguments are drawn from [0, INT_HIGH): valid indices for any table


def random_args(target: Target, batch: int, seed: int) -> list:
    """Seeded random arguments for ``target``; every ``None`` dimension is ``batch``.

    Floats are standard normal; integers are drawn from ``[0, INT_HIGH)``; labels follow the
    loss: one-hot rows for categorical losses, 0/1 for binary ones, class indices for sparse
    ones, standard normal otherwise.
    """
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    args = []
    for i, spec in enumerate(_flat(target.input_signature)):
        if spec.shape.rank is None:
            raise TargetError(f"argument {target.arg_labels[i]} has an unknown rank; give its "
                              "shape with --signature.")
        shape = [batch if d is None else d for d in spec.shape.as_list()]
        dtype = spec.dtype
        if i == target.labels:
            value = _random_labels(rng, shape, target)
        elif dtype.is_floating:
            value = rng.standard_normal(shape)
        elif dtype.is_bool:
            value = rng.integers(0, 2, size=shape).astype(bool)
        elif dtype.is_integer:
            value = rng.integers(0, INT_HIGH, size=shape)
        else:
            raise TargetError(f"argument {target.arg_labels[i]} has dtype {dtype.name}; random "
                              "values are drawn for floats, integers and booleans only.")
        args.append(tf.constant(np.asarray(value).astype(dtype.as_numpy_dtype)))
    return tf.nest.pack_sequence_as(list(target.input_signature), args)


def _random_labels(rng: np.random.Generator, shape: list[int], target: Target) -> np.ndarray:
    classes = max(target.classes, 1)
    if target.labels_kind == "sparse":
        return rng.integers(0, classes, size=shape)
    if target.labels_kind == "one-hot":
        return np.eye(shape[-1])[rng.integers(0, shape[-1], size=shape[:-1])]
    if target.labels_kind == "binary":
        return rng.integers(0, 2, size=shape)
    return rng.standard_normal(shape)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
