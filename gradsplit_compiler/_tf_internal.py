"""Every private TensorFlow API gradsplit_compiler touches, in one place.

Checked on TensorFlow 2.16 to 2.21. Each helper names the API it wraps; tests in
``tests/test_tf_internal.py`` pin their behaviour so an upgrade that breaks one shows here.
"""

from __future__ import annotations

import tensorflow as tf
from tensorflow.python.framework import function_def_to_graph as _fdef_to_graph


def function_body_graph_def(fdef):
    """``function_def_to_graph.function_def_to_graph_def``: a FunctionDef as a GraphDef.

    Returns ``(graph_def, flat_names)``: arguments become ``Placeholder`` nodes named after
    the input args, and ``flat_names`` maps FunctionDef tensor names (``op:out_arg:i``) to
    GraphDef names (``op:j``).
    """
    return _fdef_to_graph.function_def_to_graph_def(fdef)


def capture_in_current_graph(tensor: tf.Tensor) -> tf.Tensor:
    """``FuncGraph.capture``: the placeholder standing for eager ``tensor`` in the trace."""
    graph = tf.compat.v1.get_default_graph()
    return graph.capture(tensor)
