"""The floor of a compiler that exports a traced program and imports it back, in plain TensorFlow.

``split()`` traces ``fn``, exports the trace as a GraphDef, and imports pieces of it back into
new traces in which it builds their gradients. Its target is TensorFlow's own trace of the
training step (the forward and ``tf.GradientTape``'s gradient in one ``tf.function``). This
program measures what TensorFlow alone charges for that data flow, with nothing of the
compiler (no networkx, no passes, no cutting), on the same programs as BENCHMARKS.md section
4, interleaved in one process:

- ``step``: ``tf.function(step).get_concrete_function(...)``, the training step's trace;
- ``trace``: the trace of ``fn`` alone;
- ``export``: ``graph.as_graph_def()`` of that trace;
- ``import``: ``tf.graph_util.import_graph_def`` of the whole GraphDef into a new function
  graph, arguments and variable handles mapped to placeholders of their own;
- ``gradients``: ``tf.gradients`` of the imported loss with respect to the arguments and the
  variable handles, in that graph (the public way to build it; ``split()`` records the
  imported ops on a ``tf.GradientTape`` instead, per stage, which costs less);
- ``collect``: ``gc.collect()`` of what they left (each side starts from a collected heap
  and pays for its own garbage).

It does not import gradsplit_compiler: the floor it shows holds for any design that exports
the trace and imports it back. Run: ``python tools/split_floor.py [--quick] [--json]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow.core.framework import graph_pb2  # noqa: E402

PARTS = ("trace", "export", "import", "gradients", "collect")


def resnet50(batch: int = 16):
    """Keras' ResNet50 at 64x64, 10 classes, float32, mean cross-entropy; random weights."""
    import keras

    model = keras.applications.ResNet50(weights=None, input_shape=(64, 64, 3), classes=10)

    def loss(x, y):
        out = model(x, training=True)
        return tf.reduce_mean(keras.losses.categorical_crossentropy(y, out))

    sig = [tf.TensorSpec([batch, 64, 64, 3], tf.float32), tf.TensorSpec([batch, 10], tf.float32)]
    return "ResNet50 64x64, batch 16", loss, sig


def chain(layers: int, width: int = 16, batch: int = 8):
    """``layers`` tanh layers of ``width`` units, ``sum(h ** 2)``."""
    rng = np.random.default_rng(0)
    weights = [tf.Variable(rng.normal(scale=0.2, size=(width, width)).astype(np.float32))
               for _ in range(layers)]

    def loss(x):
        h = x
        for w in weights:
            h = tf.tanh(h @ w)
        return tf.reduce_sum(h ** 2)

    return f"chain of {layers} layers", loss, [tf.TensorSpec([batch, width], tf.float32)]


def step_trace(loss, sig) -> float:
    """From a collected heap, the training step's trace and the collection of its garbage."""
    def step(*args):
        with tf.GradientTape() as tape:
            value = loss(*args)
        return tape.gradient(value, tape.watched_variables())

    gc.collect()
    t = time.perf_counter()
    concrete = tf.function(step).get_concrete_function(*sig)
    gc.collect()
    seconds = time.perf_counter() - t
    del concrete
    return seconds


def export_import(loss, sig) -> dict[str, float]:
    """The four parts of the data flow, in seconds."""
    times = {}
    gc.collect()
    t = time.perf_counter()
    concrete = tf.function(loss).get_concrete_function(*sig)
    times["trace"] = time.perf_counter() - t
    graph = concrete.graph
    t = time.perf_counter()
    graph_def = graph.as_graph_def()
    times["export"] = time.perf_counter() - t
    arg_names = [a.op.name for a in graph.inputs[: len(sig)]]
    handles = [(external, internal.op.name) for external, internal in graph.captures
               if external.dtype == tf.resource]
    # the inputs become placeholders of the new graph: every other node is imported
    inputs = set(arg_names) | {name for _, name in handles}
    body = graph_pb2.GraphDef()
    body.versions.CopyFrom(graph_def.versions)
    body.library.CopyFrom(graph_def.library)
    body.node.extend(n for n in graph_def.node if n.name not in inputs)
    output = concrete.outputs[0].name
    new = tf.Graph()
    with new.as_default():
        args = [tf.compat.v1.placeholder(s.dtype, s.shape) for s in sig]
        placeholders = []
        for external, _ in handles:
            ph = tf.compat.v1.placeholder(tf.resource, external.shape)
            placeholders.append(ph)
        input_map = {f"{name}:0": a for name, a in zip(arg_names, args)}
        input_map.update({f"{name}:0": ph for (_, name), ph in zip(handles, placeholders)})
        t = time.perf_counter()
        (value,) = tf.graph_util.import_graph_def(body, input_map=input_map,
                                                  return_elements=[output], name="")
        times["import"] = time.perf_counter() - t
        t = time.perf_counter()
        grads = tf.gradients(value, args + placeholders)
        times["gradients"] = time.perf_counter() - t
    t = time.perf_counter()
    gc.collect()  # the garbage of it all, as the step's side pays for its own
    times["collect"] = time.perf_counter() - t
    # the variables the loss reads get gradients (a batch norm's moving statistics do not)
    assert any(g is not None for g in grads[len(args):]), "no variable got a gradient"
    return times


def measure(build, rounds: int) -> dict:
    """Medians of ``rounds`` interleaved rounds: the step's trace, then the four parts."""
    name, loss, sig = build()
    steps, parts = [], {p: [] for p in PARTS}
    for _ in range(rounds):
        steps.append(step_trace(loss, sig))
        for part, seconds in export_import(loss, sig).items():
            parts[part].append(seconds)
    row = {"name": name, "step": float(np.median(steps))}
    row.update({p: float(np.median(v)) for p, v in parts.items()})
    row["floor"] = sum(row[p] for p in PARTS)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small programs, one round")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    opts = parser.parse_args()
    if opts.quick:
        cases = [(lambda: chain(20), 1)]
    else:
        cases = [(resnet50, 3), (lambda: chain(1000), 3)]
    rows = []
    for build, rounds in cases:
        row = measure(build, rounds)
        rows.append(row)
        print(f"{row['name']}: step trace {row['step']:.2f} s; trace {row['trace']:.2f}, "
              f"export {row['export']:.2f}, import {row['import']:.2f}, gradients "
              f"{row['gradients']:.2f}, collect {row['collect']:.2f}: "
              f"{row['floor'] / row['step']:.3f}x the step trace",
              file=sys.stderr, flush=True)
    if opts.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
