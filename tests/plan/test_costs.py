"""The cost model: FLOPs and bytes from op types and static shapes, summaries, calibration."""

import models
import numpy as np
import pytest
import tensorflow as tf

import gradsplit_compiler as gsc
import passes
from gradsplit_compiler.frontend.capture import capture
from gradsplit_compiler.plan import costs


def _graph(fn, signature):
    program = passes.run(capture(tf.function(fn), signature), "analysis")
    return program.graph


def _only(g, op_type):
    (node,) = [n for n in g.nodes if g.nodes[n]["op"] == op_type]
    return node


def test_matmul_flops_are_two_m_n_k_with_none_as_the_batch():
    W = tf.Variable(np.ones((6, 4), np.float32))
    g = _graph(lambda x: tf.matmul(x, W), [tf.TensorSpec([None, 6])])
    assert costs.op_cost(g, _only(g, "MatMul"), batch_size=10).flops == 2 * 10 * 4 * 6
    assert costs.op_cost(g, _only(g, "MatMul")).flops == 2 * 1 * 4 * 6  # per example


def test_transposed_matmul_counts_the_same_flops():
    W = tf.Variable(np.ones((4, 6), np.float32))
    g = _graph(lambda x: tf.matmul(x, W, transpose_b=True), [tf.TensorSpec([None, 6])])
    assert costs.op_cost(g, _only(g, "MatMul"), batch_size=3).flops == 2 * 3 * 4 * 6


def test_conv2d_flops_are_two_per_multiply_add_of_the_output():
    K = tf.Variable(np.ones((3, 3, 4, 8), np.float32))
    g = _graph(lambda x: tf.nn.conv2d(x, K, 1, "SAME"), [tf.TensorSpec([None, 5, 5, 4])])
    assert costs.op_cost(g, _only(g, "Conv2D"), batch_size=2).flops == 2 * (2 * 5 * 5 * 8) * 36


def test_depthwise_conv_flops_are_two_times_the_kernel_per_output():
    K = tf.Variable(np.ones((3, 3, 4, 2), np.float32))
    g = _graph(lambda x: tf.nn.depthwise_conv2d(x, K, [1, 1, 1, 1], "VALID"),
               [tf.TensorSpec([None, 6, 6, 4])])
    node = _only(g, "DepthwiseConv2dNative")
    assert costs.op_cost(g, node, batch_size=1).flops == 2 * (4 * 4 * 8) * 9


def test_batch_matmul_reads_adj_x_for_the_inner_dimension():
    g = _graph(lambda a, b: tf.linalg.matmul(a, b, adjoint_a=True),
               [tf.TensorSpec([None, 7, 3]), tf.TensorSpec([None, 7, 5])])
    node = [n for n in g.nodes if g.nodes[n]["op"].startswith("BatchMatMul")][0]
    assert costs.op_cost(g, node, batch_size=2).flops == 2 * (2 * 3 * 5) * 7


def test_einsum_flops_parse_the_equation_including_an_ellipsis():
    g = _graph(lambda a, b: tf.einsum("...ij,jk->...ik", a, b),
               [tf.TensorSpec([None, 4, 5]), tf.TensorSpec([5, 6])])
    assert costs.op_cost(g, _only(g, "Einsum"), batch_size=3).flops == 2 * 3 * 4 * 5 * 6
    assert costs.einsum_flops("bij,bjk->bik", [[8, 4, 5], [8, 5, 6]]) == 2 * 8 * 4 * 5 * 6
    assert costs.einsum_flops("ij->ji", [[3, 4]]) == 12


def test_an_elementwise_op_costs_the_bytes_it_reads_and_writes():
    g = _graph(lambda x: tf.tanh(x), [tf.TensorSpec([None, 10], tf.float64)])
    cost = costs.op_cost(g, _only(g, "Tanh"), batch_size=4)
    assert cost.flops == 0 and cost.nbytes == 2 * 4 * 10 * 8


def test_backward_multiplies_flops_by_the_backward_factor():
    model = costs.CostModel(flops_per_second=1e9, bytes_per_second=1e30, op_seconds=0.0)
    forward_only = costs.OpCost(flops=1e9, nbytes=8.0, backward=False)
    both = costs.OpCost(flops=1e9, nbytes=8.0, backward=True)
    assert forward_only.seconds(model) == pytest.approx(1.0)
    assert both.seconds(model) == pytest.approx(1.0 + model.backward_flops)


def test_ops_off_the_gradient_path_have_no_backward():
    v = tf.Variable(np.ones(3, np.float32))

    def fn(x):
        v.assign_add(tf.reduce_mean(x, axis=0))  # a side effect, as batch-norm statistics
        return tf.reduce_sum(tf.tanh(x))

    g = _graph(fn, [tf.TensorSpec([None, 3])])
    with_backward = costs.gradient_ops(g, ["Identity"])
    assert _only(g, "Tanh") in with_backward
    means = [n for n in g.nodes if g.nodes[n]["op"] == "Mean"]
    assert means and not set(means) & with_backward


def test_views_constants_and_reads_cost_nothing():
    W = tf.Variable(np.ones((2, 3), np.float32))
    g = _graph(lambda x: tf.reshape(x, [-1, 2]) @ W, [tf.TensorSpec([None, 4])])
    for op in ("Reshape", "ReadVariableOp", "Const"):
        for node in [n for n in g.nodes if g.nodes[n]["op"] == op]:
            assert costs.op_cost(g, node, 8).seconds() == 0.0


def test_a_kernel_larger_than_its_input_is_a_slow_convolution_under_xla_cpu():
    K = tf.Variable(np.ones((3, 3, 64, 64), np.float32))
    small = _graph(lambda x: tf.nn.conv2d(x, K, 1, "SAME"), [tf.TensorSpec([None, 2, 2, 64])])
    large = _graph(lambda x: tf.nn.conv2d(x, K, 1, "SAME"), [tf.TensorSpec([None, 3, 3, 64])])
    slow = costs.op_cost(small, _only(small, "Conv2D"), 64)
    assert slow.slow and not costs.op_cost(large, _only(large, "Conv2D"), 64).slow
    assert slow.seconds(costs.XLA_CPU) > 10 * slow.seconds(costs.DEFAULT_MODEL)


def test_op_costs_agree_with_op_cost():
    K = tf.Variable(np.ones((3, 3, 2, 4), np.float32))
    W = tf.Variable(np.ones((4, 5), np.float32))
    stat = tf.Variable(np.zeros(4, np.float32))

    def fn(x):
        h = tf.nn.relu(tf.nn.conv2d(x, K, 1, "SAME"))
        mean, var = tf.nn.moments(h, axes=[0, 1, 2])
        stat.assign(0.9 * stat + 0.1 * mean)
        h = (h - mean) * tf.math.rsqrt(var + 1e-3)
        y = tf.einsum("bhwc,cd->bhwd", h, W)
        return tf.reduce_mean(tf.square(y))

    g = _graph(fn, [tf.TensorSpec([None, 6, 6, 2])])
    fast = costs.op_costs(g, ["Identity"], batch_size=6)
    with_backward = costs.gradient_ops(g, ["Identity"])
    for node in g.nodes:
        slow = costs.op_cost(g, node, 6, node in with_backward).seconds()
        assert fast[node] == pytest.approx(slow, rel=1e-12, abs=1e-18)


def test_tensor_bytes_counts_none_as_the_batch_and_handles_as_nothing():
    assert costs.tensor_bytes(tf.float32, tf.TensorShape([None, 3]), 5) == 60
    assert costs.tensor_bytes(tf.float64, tf.TensorShape([2, 3])) == 48
    assert costs.tensor_bytes(tf.resource, tf.TensorShape([])) == 0
    assert costs.tensor_bytes(tf.float32, tf.TensorShape(None), 5) == 0


def test_residuals_follow_the_gradient_functions():
    W = tf.Variable(np.ones((3, 3), np.float32))
    g = _graph(lambda x: tf.reduce_sum(tf.nn.relu(x @ W) + x), [tf.TensorSpec([None, 3])])
    mm, relu, add = _only(g, "MatMul"), _only(g, "Relu"), _only(g, "AddV2")
    assert set(costs.residual_tensors(g, mm)) == {"x:0", f"{mm}/ReadVariableOp:0"}
    assert costs.residual_tensors(g, relu) == [f"{relu}:0"]
    assert costs.residual_tensors(g, add) == []


# -- summaries ---------------------------------------------------------------------------------


def test_summary_of_a_manual_split_has_one_row_per_stage_with_every_key():
    case = models.mlp()
    split = gsc.split(case.fn, case.input_signature, case.cuts)
    rows = split.summary(batch_size=5)
    assert [r["index"] for r in rows] == [0, 1, 2, 3]
    keys = {"ops", "cost", "variable_bytes", "boundary_tensors", "boundary_bytes",
            "residual_bytes"}
    assert all(keys <= set(r) for r in rows)
    # each hidden layer (5 x 8 float64) enters the next stage; the first stage gets only x
    assert [r["boundary_tensors"] for r in rows] == [0, 1, 1, 1]
    assert [r["boundary_bytes"] for r in rows] == [0, 320, 320, 320]
    # every variable is read in exactly one stage here
    total = sum(v.shape.num_elements() * 8 for v in case.variables)
    assert sum(r["variable_bytes"] for r in rows) == total
    assert all(r["cost"] > 0 and r["ops"] == s.num_ops for r, s in zip(rows, split.stages))
    # residuals scale with the batch; variables do not
    per_example = split.summary()
    assert rows[1]["residual_bytes"] == 5 * per_example[1]["residual_bytes"]
    assert rows[1]["variable_bytes"] == per_example[1]["variable_bytes"]


def test_summary_counts_a_skip_connection_in_every_stage_it_enters():
    case = models.skip_connection(2)
    split = gsc.split(case.fn, case.input_signature, case.cuts)
    rows = split.summary(batch_size=5)
    # stage 2 reads h3 from stage 1 and the skip h1 from stage 0
    assert rows[2]["boundary_tensors"] == 2 and rows[2]["boundary_bytes"] == 2 * 5 * 8 * 8


# -- calibration -------------------------------------------------------------------------------


def test_calibrate_times_each_stage_under_xla_and_sets_it_beside_the_estimate():
    case = models.mlp(tf.float32, depth=2, width=16)
    split = gsc.split(case.fn, case.input_signature, ["h1"])
    rows = costs.calibrate(split, case.args(), repeats=2, warmup=1)
    assert [r["index"] for r in rows] == [0, 1]
    for r in rows:
        assert r["measured"] > 0 and r["estimated"] > 0
        assert r["rel_error"] == pytest.approx(r["estimated"] / r["measured"] - 1)
        assert sum(r["parts"].values()) == pytest.approx(r["estimated"])


def test_fit_recovers_the_rates_that_made_the_times():
    truth = costs.CostModel(flops_per_second=3e10, bytes_per_second=2e9,
                            op_seconds=costs.XLA_CPU.op_seconds, slow_conv_flops_per_second=1e9)
    start = costs.XLA_CPU
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(12):
        flops, slow, nbytes, ops = rng.uniform(1e8, 1e9), rng.uniform(0, 1e7), \
            rng.uniform(1e6, 1e8), rng.integers(10, 1000)
        parts = {"compute": flops / start.flops_per_second,
                 "slow_conv": slow / start.slow_conv_flops_per_second,
                 "memory": nbytes / start.bytes_per_second,
                 "overhead": ops * start.op_seconds}
        measured = (flops / truth.flops_per_second + slow / truth.slow_conv_flops_per_second
                    + nbytes / truth.bytes_per_second + ops * truth.op_seconds)
        rows.append({"parts": parts, "measured": measured})
    fitted = costs.fit(rows, start)
    assert fitted.flops_per_second == pytest.approx(truth.flops_per_second, rel=1e-6)
    assert fitted.bytes_per_second == pytest.approx(truth.bytes_per_second, rel=1e-6)
    assert fitted.slow_conv_flops_per_second == pytest.approx(1e9, rel=1e-6)
    assert fitted.op_seconds == start.op_seconds  # kept: it is what the rows subtract
