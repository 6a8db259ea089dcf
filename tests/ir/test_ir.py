"""The networkx IR: lossless both ways, parallel edges and control edges kept."""

import tensorflow as tf

import gradsplit_compiler as gsc
from gradsplit_compiler import ir


def _graph_def(add_shapes=False):
    @tf.function
    def f(x):
        a, b = tf.split(x, 2, axis=1)
        y = a * a + b  # a used twice by one op: parallel edges
        with tf.control_dependencies([tf.debugging.assert_all_finite(y, "finite")]):
            y = tf.identity(y)
        return tf.reduce_sum(y)

    return f.get_concrete_function(tf.TensorSpec([None, 4])).graph.as_graph_def(
        add_shapes=add_shapes)


def test_round_trip_is_exact_with_and_without_shapes():
    for add_shapes in (False, True):
        gd = _graph_def(add_shapes)
        assert gsc.from_networkx(gsc.to_networkx(gd)) == gd


def test_parallel_edges_and_control_edges_survive():
    g = gsc.to_networkx(_graph_def())
    mul = next(n for n in g if g.nodes[n]["op"] == "Mul")
    assert [src for src, _ in ir.data_inputs(g, mul)] == ["split", "split"]
    controlled = [n for n in g if any(a["control"] for _, _, a in g.in_edges(n, data=True))]
    assert controlled


def test_node_defs_keep_attributes_and_lose_inputs_only_to_the_edges():
    gd = _graph_def()
    g = gsc.to_networkx(gd)
    for nd in gd.node:
        stored = g.nodes[nd.name]["node_def"]
        assert stored.attr == nd.attr and stored.op == nd.op and stored.device == nd.device
        assert ir.node_inputs(g, nd.name) == list(nd.input)


def test_multi_source_ancestors_match_networkx():
    import networkx as nx

    g = gsc.to_networkx(_graph_def())
    sinks = [n for n in g if g.out_degree(n) == 0]
    expected = set(sinks).union(*(nx.ancestors(g, s) for s in sinks))
    assert ir.ancestors(g, sinks) == expected
