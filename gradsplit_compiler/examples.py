"""Small programs to try ``gradsplit`` on; the examples in ``gradsplit COMMAND --help`` use them.

* ``mlp_loss``: a ``tf.function`` with an ``input_signature``, ``(x [None,8], target [None,4])
  -> mean squared error`` of a two-layer perceptron, with ``gsc.mark(..., "hidden")``.
* ``mlp_model``: a Keras ``Sequential`` model, ``Dense -> BatchNormalization -> Dense ->
  Dense(softmax)``, layers ``dense1``, ``bn``, ``dense2``, ``head``, saved without a loss.

Their weights are drawn from fixed seeds, so every run prints the same numbers. The model is
``gradsplit_compiler.zoo.keras_mlp()``; the zoo holds the other programs the tests and
benchmarks use.

Example
-------
>>> # gradsplit split gradsplit_compiler.examples:mlp_loss --cut hidden
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from gradsplit_compiler.frontend.mark import mark
from gradsplit_compiler.zoo import keras_mlp

__all__ = ["W1", "W2", "b1", "b2", "mlp_loss", "mlp_model"]

_rng = np.random.default_rng(0)
W1 = tf.Variable((_rng.normal(size=(8, 16)) / np.sqrt(8)).astype(np.float32), name="W1")
b1 = tf.Variable(np.zeros(16, np.float32), name="b1")
W2 = tf.Variable((_rng.normal(size=(16, 4)) / 4).astype(np.float32), name="W2")
b2 = tf.Variable(np.zeros(4, np.float32), name="b2")


@tf.function(input_signature=[tf.TensorSpec([None, 8], tf.float32),
                              tf.TensorSpec([None, 4], tf.float32)])
def mlp_loss(x, target):
    hidden = mark(tf.tanh(x @ W1 + b1), "hidden")
    return tf.reduce_mean(tf.square(hidden @ W2 + b2 - target))


mlp_model = keras_mlp().model
