"""The model of the training tests, in-process and on a cluster: four stages cut at the
marks ``c1``, ``c2``, ``c3``, a variable read by the first and the last stage (tied weights),
and a non-trainable variable read in the forward. Float64, normal weights from ``seed``."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

import gradsplit_compiler as gsc

BATCH, WIDTH = 16, 8

__all__ = ["BATCH", "OPTIMIZERS", "WIDTH", "TiedModel"]

# The optimizers every training test runs, a learning-rate schedule among them.
OPTIMIZERS = {
    "sgd-momentum": lambda: keras.optimizers.SGD(0.05, momentum=0.9),
    "adam": lambda: keras.optimizers.Adam(0.01),
    "adamw-schedule": lambda: keras.optimizers.AdamW(
        keras.optimizers.schedules.ExponentialDecay(0.02, decay_steps=4, decay_rate=0.7),
        weight_decay=0.05),
}


class TiedModel:
    """Four stages; ``embed`` is read by the first and the last (tied weights); ``scale`` is
    non-trainable and read in the forward (it has a gradient, which must not be applied)."""

    def __init__(self, seed: int = 0, dtype=tf.float64):
        rng = np.random.default_rng(seed)
        self.dtype = dtype

        def var(shape, name, scale=0.4, trainable=True):
            return tf.Variable(rng.normal(size=shape) * scale, dtype=dtype, name=name,
                               trainable=trainable)
        self.embed = var((WIDTH, WIDTH), "embed")
        self.w = [var((WIDTH, WIDTH), f"layer{i}/kernel") for i in range(3)]
        self.b = [var((WIDTH,), f"layer{i}/bias", 0.1) for i in range(3)]
        self.scale = var((WIDTH,), "scale", 0.5, trainable=False)
        self.variables = [self.embed, *self.w, *self.b, self.scale]

    def loss(self, x, y):
        h = tf.tanh(x @ self.embed)
        h = gsc.mark(tf.tanh(h @ self.w[0] + self.b[0]), "c1")
        h = gsc.mark(tf.tanh(h @ self.w[1] + self.b[1]) * (1.0 + self.scale), "c2")
        h = gsc.mark(tf.tanh(h @ self.w[2] + self.b[2]), "c3")
        out = h @ tf.transpose(self.embed)
        return tf.reduce_mean(tf.reduce_sum((out - y) ** 2, axis=1))

    def split(self, cuts=("c1", "c2", "c3")):
        spec = tf.TensorSpec([None, WIDTH], self.dtype)
        return gsc.split(self.loss, [spec, spec], cuts=list(cuts))


def tape_training(model: TiedModel, optimizer, batches, clip=None) -> list[float]:
    """The oracle: ``optimizer`` on tape gradients of the whole batch, on the model's own
    trainable variables (clipped by their global norm when ``clip`` is given); the losses."""
    trainable = [v for v in model.variables if v.trainable]
    losses = []
    for x, y in batches:
        with tf.GradientTape() as tape:
            loss = model.loss(tf.constant(x), tf.constant(y))
        grads = tape.gradient(loss, trainable)
        if clip is not None:
            grads, _ = tf.clip_by_global_norm(grads, clip)
        optimizer.apply(grads, trainable)
        losses.append(float(loss))
    return losses
