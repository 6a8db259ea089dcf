"""Write a split's graphs where TensorBoard's graph dashboard finds them.

``write_graphs(split, logdir)`` writes one run per graph (TensorBoard shows one graph per
run; pick it in the dashboard's "Run" menu):

* ``program``: the whole program after the passes, every op placed on device
  ``/job:stage<k>``, so "Color: Device" paints each stage in its own colour;
* ``stage<k>.forward`` and ``stage<k>.backward``: the graphs of each stage's two traced
  functions, as a pipeline runs them.

Only ``tf.summary`` is used: TensorBoard itself is not needed to write the files, only to
look at them (``tensorboard --logdir DIR``). ``graph_runs(logdir)`` reads them back.

Example
-------
>>> from gradsplit_compiler.show.tensorboard_graphs import write_graphs, graph_runs
>>> write_graphs(split, "/tmp/tb")  # doctest: +SKIP
['program', 'stage0.forward', 'stage0.backward', 'stage1.forward', 'stage1.backward']
>>> {run: len(g.node) for run, g in graph_runs("/tmp/tb").items()}  # doctest: +SKIP
"""

from __future__ import annotations

import glob
import os
from typing import Any

__all__ = ["PROGRAM_RUN", "graph_runs", "program_graph_def", "stage_device", "write_graphs"]

PROGRAM_RUN = "program"


def stage_device(stage: int | None) -> str:
    return "" if stage is None else f"/job:stage{stage}"


def program_graph_def(split: Any) -> Any:
    """``split.graph`` as a GraphDef whose ops sit on ``/job:stage<k>`` for their stage."""
    from gradsplit_compiler.ir import from_networkx

    graph_def = from_networkx(split.graph)
    for node in graph_def.node:
        attrs = split.graph.nodes[node.name] if node.name in split.graph else {}
        device = stage_device(attrs.get("stage"))
        if device:
            node.device = device
    return graph_def


def write_graphs(split: Any, logdir: str | os.PathLike) -> list[str]:
    """Write the program and every stage's forward and backward graphs; returns the runs."""
    import tensorflow as tf

    logdir = os.fspath(logdir)
    graphs = [(PROGRAM_RUN, program_graph_def(split))]
    for stage in split.stages:
        graphs.append((f"stage{stage.index}.forward",
                       stage.forward.get_concrete_function().graph))
        graphs.append((f"stage{stage.index}.backward",
                       stage.backward.get_concrete_function().graph))
    for run, graph in graphs:
        writer = tf.summary.create_file_writer(os.path.join(logdir, run))
        with writer.as_default():
            tf.summary.graph(graph)
        writer.flush()
        writer.close()
    return [run for run, _ in graphs]


def graph_runs(logdir: str | os.PathLike) -> dict[str, Any]:
    """``{run: GraphDef}`` for every run under ``logdir`` whose event files hold a graph."""
    import tensorflow as tf
    from tensorflow.core.util import event_pb2

    found = {}
    for path in sorted(glob.glob(os.path.join(os.fspath(logdir), "*", "events.out.tfevents.*"))):
        run = os.path.basename(os.path.dirname(path))
        for record in tf.data.TFRecordDataset(path):
            event = event_pb2.Event.FromString(record.numpy())
            if event.HasField("graph_def"):
                found[run] = tf.compat.v1.GraphDef.FromString(event.graph_def)
    return found
