"""Export a split's stages as SavedModels that another process drives by hand.

``export_split(split, directory)`` writes, for stage ``k``, ``directory/stage<k>/``: a
SavedModel of a ``tf.Module`` holding the stage's variables (``stage_variables``) and two
functions with input signatures,

* ``forward(*inputs) -> (outputs, residuals)``
* ``backward(residuals, output_cotangents) -> (input_cotangents, variable_grads)``

(residuals and cotangents are lists; a ``None`` batch dimension stays ``None``), and
``directory/manifest.json``, which says what to feed and what comes back: the program's
arguments and outputs, each stage's inputs, outputs and residuals (graph tensor names,
shapes, dtypes) and its variables (indices into the manifest's ``variables``).

Driving the stages needs only TensorFlow and the manifest (``run_exported`` below does just
this): put the arguments in a dictionary under the names in ``manifest["args"]``; run each
stage's ``forward`` on its ``inputs`` and store its ``outputs``; then, from a cotangent for
each program output (``1`` for a scalar loss), run each ``backward`` in reverse order with
its residuals and the cotangents of its outputs (zeros for an output nobody sent one to),
add each input cotangent into the entry of that name and each variable gradient into the
total of that variable. Loaded functions run in graph mode; wrap them in
``tf.function(..., jit_compile=True)`` to compile them with XLA.

Example
-------
>>> import numpy as np, tensorflow as tf
>>> import gradsplit_compiler as gsc
>>> from gradsplit_compiler.export import export_split, run_exported
>>> W = tf.Variable(np.ones((3, 2)))
>>> def loss(x):
...     return tf.reduce_sum(gsc.mark(tf.tanh(x @ W), "y") ** 2)
>>> s = gsc.split(loss, [tf.TensorSpec([None, 3], tf.float64)], cuts=["y"])
>>> manifest = export_split(s, "/tmp/stages")  # doctest: +SKIP
>>> value, grads = run_exported("/tmp/stages", [np.ones((4, 3))])  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from gradsplit_compiler.core.compose import compose

__all__ = ["FORMAT", "MANIFEST", "export_split", "load_manifest", "run_exported"]

MANIFEST = "manifest.json"
FORMAT = "gradsplit-export/1"


def _spec_json(name: str, spec: Any, label: str | None = None) -> dict:
    shape = None if spec.shape.rank is None else spec.shape.as_list()
    entry = {"name": name, "shape": shape, "dtype": spec.dtype.name}
    if label:
        entry["label"] = label
    return entry


def export_split(split: Any, directory: str | os.PathLike, *, description: str = "",
                 arg_labels: Sequence[str] | None = None, progress: Any = None) -> dict:
    """Write every stage of ``split`` as a SavedModel under ``directory``, and the manifest.

    Parameters
    ----------
    split : gsc.Split
    directory : str or PathLike
        Created if missing; ``stage<k>/`` and ``manifest.json`` inside are overwritten.
    description : str
        What was split, recorded in the manifest.
    arg_labels : list of str, optional
        Human names of the arguments, recorded beside their graph names.
    progress : callable, optional
        ``progress(text)`` returns a context manager around each stage's export (the CLI
        prints one line per stage with it).

    Returns
    -------
    dict
        The manifest, as written.
    """
    import tensorflow as tf

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    labels = list(arg_labels or [])
    variable_index = {id(v): i for i, v in enumerate(split.variables)}
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "description": description,
        "args": [_spec_json(n, s, labels[i] if i < len(labels) else None)
                 for i, (n, s) in enumerate(zip(split.arg_names, split.arg_specs))],
        "outputs": [_spec_json(n, split.spec(n)) for n in split.output_names],
        "variables": [{"name": v.name, "shape": v.shape.as_list(), "dtype": v.dtype.name,
                       "trainable": bool(v.trainable)} for v in split.variables],
        "boundaries": [list(b) for b in split.boundaries],
        "stages": [],
    }
    for stage in split.stages:
        path = f"stage{stage.index}"
        module = tf.Module()
        module.stage_variables = list(stage.variables)
        module.forward = stage.forward
        module.backward = stage.backward
        step = progress(f"exporting stage {stage.index} to {os.path.join(directory, path)}") \
            if progress else _nothing()
        with step:
            tf.saved_model.save(module, os.path.join(directory, path))
        manifest["stages"].append({
            "index": stage.index,
            "path": path,
            "inputs": [_spec_json(n, s) for n, s in zip(stage.inputs, stage.input_specs)],
            "outputs": [_spec_json(n, s) for n, s in zip(stage.outputs, stage.output_specs)],
            "residuals": [_spec_json(n, s) for n, s in zip(stage.residuals,
                                                             stage.residual_specs)],
            "variables": [variable_index[id(v)] for v in stage.variables],
        })
    with open(os.path.join(directory, MANIFEST), "w") as f:
        f.write(_compact_json(manifest) + "\n")
    return manifest


def _compact_json(value: Any, indent: str = "", width: int = 100) -> str:
    """JSON, one line per entry that fits in ``width`` characters, nested otherwise."""
    flat = json.dumps(value)
    if len(indent) + len(flat) <= width or not isinstance(value, (dict, list)) or not value:
        return flat
    inner = indent + "  "
    if isinstance(value, dict):
        items = [f"{inner}{json.dumps(k)}: {_compact_json(v, inner, width)}"
                 for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{indent}}}"
    items = [inner + _compact_json(v, inner, width) for v in value]
    return "[\n" + ",\n".join(items) + f"\n{indent}]"


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def load_manifest(directory: str | os.PathLike) -> dict:
    with open(os.path.join(os.fspath(directory), MANIFEST)) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{directory}: not a gradsplit export (format "
                         f"{manifest.get('format')!r}, expected {FORMAT!r})")
    return manifest


def run_exported(directory: str | os.PathLike, args: Sequence[Any],
                 output_cotangents: Sequence[Any] | None = None):
    """Drive exported stages by hand: ``(outputs, variable_grads)``.

    Loads each stage with ``tf.saved_model.load`` and follows the manifest (see the module
    docstring). ``output_cotangents`` default to ones for every floating-point output, which
    for a scalar loss gives its gradient. ``variable_grads`` align with
    ``manifest["variables"]``.
    """
    import tensorflow as tf

    directory = os.fspath(directory)
    manifest = load_manifest(directory)
    stages = [_ExportedStage(entry, tf.saved_model.load(os.path.join(directory, entry["path"])))
              for entry in manifest["stages"]]
    args = [tf.convert_to_tensor(v, dtype=a["dtype"]) for a, v in zip(manifest["args"], args)]
    if output_cotangents is not None:
        output_cotangents = [tf.convert_to_tensor(c, dtype=o["dtype"])
                             for o, c in zip(manifest["outputs"], output_cotangents)]
    else:  # ones for every floating-point output, once the outputs are known
        def output_cotangents(outputs):
            return [tf.ones_like(t) if t.dtype.is_floating else None for t in outputs]
    outputs, _, grads = compose(
        stages, [a["name"] for a in manifest["args"]], args,
        [o["name"] for o in manifest["outputs"]], output_cotangents,
        forward=lambda stage, inputs: stage.module.forward(*inputs),
        backward=lambda stage, residuals, cotangents: stage.module.backward(residuals,
                                                                            cotangents),
        variable_zeros=[lambda v=v: tf.zeros(v["shape"], v["dtype"])
                        for v in manifest["variables"]])
    return outputs, grads


class _ExportedStage:
    """A manifest entry and its loaded SavedModel, as the compose loop reads a stage."""

    def __init__(self, entry: dict, module: Any):
        self.inputs = [i["name"] for i in entry["inputs"]]
        self.outputs = [o["name"] for o in entry["outputs"]]
        self.variable_indices = list(entry["variables"])
        self.module = module
