"""The networkx IR: lossless both ways, parallel edges and control edges kept."""

import networkx as nx
import pytest
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


def test_reach_within_and_data_only_match_networkx():
    import networkx as nx

    g = gsc.to_networkx(_graph_def())
    sinks = [n for n in g if g.out_degree(n) == 0]
    sources = [n for n in g if g.in_degree(n) == 0]
    data = nx.subgraph_view(g, filter_edge=lambda u, v, k: not g.edges[u, v, k]["control"])
    assert ir.ancestors(g, sinks, data_only=True) == set(sinks).union(
        *(nx.ancestors(data, s) for s in sinks))
    assert ir.descendants(g, sources) == set(sources).union(
        *(nx.descendants(g, s) for s in sources))
    within = {n for n in g if g.nodes[n]["op"] != "Split"}
    inside = g.subgraph(within)
    assert ir.descendants(g, sources, within=within) == {
        s for s in sources if s in within}.union(
        *(nx.descendants(inside, s) for s in sources if s in within))
    assert "split" not in ir.descendants(g, sources, within=within)


def test_topological_order_puts_every_node_after_its_inputs_and_finds_cycles():
    g = gsc.to_networkx(_graph_def())
    order = ir.topological_order(g)
    position = {n: i for i, n in enumerate(order)}
    assert sorted(order) == sorted(g)
    assert all(position[u] < position[v] for u, v in g.edges())
    mul = next(n for n in g if g.nodes[n]["op"] == "Mul")
    ir.add_control_edge(g, mul, "split")
    assert ir.topological_order(g) is None


def test_order_among_orders_some_nodes_by_the_edges_between_them_and_finds_cycles():
    g = gsc.to_networkx(_graph_def())
    some = [n for n in g if g.nodes[n]["op"] != "Const"]
    edges = [(u, v) for u, v in g.edges() if u in some and v in some]
    order = ir.order_among(some, edges)
    position = {n: i for i, n in enumerate(order)}
    assert sorted(order) == sorted(some) and edges
    assert all(position[u] < position[v] for u, v in edges)
    with pytest.raises(nx.NetworkXUnfeasible):
        ir.order_among(some, edges + [edges[-1][::-1]])


def test_a_dangling_input_is_named():
    gd = _graph_def()
    gd.node[-1].input.append("nowhere:1")
    with pytest.raises(ValueError, match=r"reads 'nowhere:1', which is not a node"):
        gsc.to_networkx(gd)
