"""A stage can read stand-in variables (replicas on its own device) instead of the originals."""

import numpy as np
import tensorflow as tf

import gradsplit_compiler as gsc


def _drive(split, x, replicas, device):
    """The hand-driven procedure of docs/api.md, each stage reading its replicas on ``device``."""
    env = {split.arg_names[0]: x}
    residuals = []
    with tf.device(device):
        for stage, own in zip(split.stages, replicas):
            forward, _ = stage.compiled(True, variables=own)
            outs, res = forward(*[env[n] for n in stage.inputs])
            env.update(zip(stage.outputs, outs))
            residuals.append(res)
        value = env[split.output_names[0]]
        cots = {split.output_names[0]: tf.ones_like(value)}
        grads = {}
        for stage, own in zip(reversed(split.stages), reversed(replicas)):
            _, backward = stage.compiled(True, variables=own)
            out_cots = [cots.get(n, tf.zeros_like(env[n])) for n in stage.outputs]
            in_cots, var_grads = backward(residuals[stage.index], out_cots)
            for n, c in zip(stage.inputs, in_cots):
                if c is not None:
                    cots[n] = cots[n] + c if n in cots else c
            for i, g in zip(stage.variable_indices, var_grads):
                grads[i] = grads[i] + g if i in grads else g
    return value, [grads[i] for i in range(len(split.variables))]


def test_compiled_stages_read_replicas_on_another_device_and_give_the_same_gradients():
    rng = np.random.default_rng(0)
    w1 = tf.Variable(rng.normal(size=(4, 4)))
    w2 = tf.Variable(rng.normal(size=(4, 1)))

    @tf.function
    def loss(x):
        h = gsc.mark(tf.tanh(x @ w1), "h")
        return tf.reduce_sum(tf.sin(h @ w2) * h[:, :1] * w1[0, 0])

    split = gsc.split(loss, [tf.TensorSpec([None, 4], tf.float64)], ["h"])
    x = tf.constant(rng.normal(size=(3, 4)))
    expected_value, expected = split.value_and_gradients(x, jit_compile=False)
    device = tf.config.list_logical_devices("CPU")[-1].name
    with tf.device(device):
        replicas = [[tf.Variable(v) for v in stage.variables] for stage in split.stages]
    assert len(split.stages[1].variables) == 2  # w1 is read in both stages
    value, grads = _drive(split, x, replicas, device)
    assert abs(float(value) - float(expected_value)) <= 1e-12 * abs(float(expected_value))
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
    replicas[1][0].assign_add(tf.ones_like(replicas[1][0]))  # the replicas are what is read
    assert float(_drive(split, x, replicas, device)[0]) != float(value)
