"""auto_split: balanced stages with the fewest bytes across each cut, on real TensorFlow
programs (checked by verify) and on programs built straight into the IR (checked against
brute force and against the split semantics)."""

import importlib.util
import itertools
from pathlib import Path

import models
import numpy as np
import pytest
import tensorflow as tf

import gradsplit_compiler as gsc
import passes
from gradsplit_compiler.frontend.capture import capture
from gradsplit_compiler.plan import autosplit, costs

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_autosplit",
                                                  ROOT / "tools" / "bench_autosplit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _verify(split, case):
    with models.grappler_off():
        report = gsc.verify(split, *case.args(), jit_compile=False)
    assert report.ok, report
    return report


# -- real programs: the result passes verify and split keeps the planned stages ----------------


def test_auto_split_of_an_mlp_passes_verify_and_keeps_the_planned_stages():
    case = models.mlp(depth=6)
    split = gsc.auto_split(case.fn, case.input_signature, 3, batch_size=5)
    assert len(split.stages) == 3
    assert split.plan.mismatches == []
    assert split.plan.bottleneck <= 1.03 * split.plan.lower_bound * (1 + 1e-9)
    _verify(split, case)


def test_auto_split_of_a_skip_connection_sends_the_skip_across_every_cut_it_spans():
    case = models.skip_connection(3)
    split = gsc.auto_split(case.fn, case.input_signature, 3, batch_size=5)
    h1 = case.names["h1"]
    assert all(h1 in boundary for boundary in split.boundaries)
    # the plan's bytes are what split's boundaries carry, h1 at both cuts (a linear pipeline
    # relays it), arguments aside (the caller feeds them)
    carried = [sum(costs.tensor_bytes(split.spec(n).dtype, split.spec(n).shape, 5)
                   for n in boundary if n not in split.arg_names)
               for boundary in split.boundaries]
    assert carried == split.plan.cut_bytes
    # the summary counts what each stage reads: h1 enters only the last stage
    rows = split.summary(batch_size=5)
    assert [r["boundary_bytes"] for r in rows] == [0, 320, 640]
    assert split.plan.mismatches == []
    _verify(split, case)


def test_auto_split_of_a_small_resnet_passes_verify_with_batch_norm_in_training():
    case = models.keras_small_resnet()
    split = gsc.auto_split(case.fn, case.input_signature, 3, batch_size=4)
    assert split.plan.mismatches == []
    # statistics updates stay beside their layer: each stage writes what its layers own
    assert split.plan.imbalance < 1.2
    _verify(split, case)


def test_the_cuts_handed_to_split_are_float_tensors_made_in_their_stage():
    case = models.parallel_branches()
    split = gsc.auto_split(case.fn, case.input_signature, 3, batch_size=5)
    for k, cut in enumerate(split.plan.cuts):
        for name in cut:
            op = name.rpartition(":")[0]
            assert split.graph.nodes[op]["stage"] == k
            assert split.spec(name).dtype.is_floating
    _verify(split, case)


@pytest.mark.parametrize("name", sorted({**models.SMALL_BUILDERS,
                                         **models.CONTROL_FLOW_BUILDERS}))
def test_auto_split_of_every_small_program_passes_verify_as_planned(name):
    case = {**models.SMALL_BUILDERS, **models.CONTROL_FLOW_BUILDERS}[name]()
    split = gsc.auto_split(case.fn, case.input_signature, 3, batch_size=5)
    assert split.plan.mismatches == []
    _verify(split, case)


# -- the search, against brute force ------------------------------------------------------------


def _brute(cp, xp, k, eps):
    best_b, options = np.inf, []
    for cuts in itertools.combinations(range(1, len(cp) - 1), k - 1):
        bounds = (0, *cuts, len(cp) - 1)
        worst = max(cp[bounds[i + 1]] - cp[bounds[i]] for i in range(k))
        options.append((worst, sum(xp[c] for c in cuts)))
        best_b = min(best_b, worst)
    cap = best_b * (1 + eps)
    return best_b, min(b for w, b in options if w <= cap * (1 + 1e-12))


@pytest.mark.parametrize("k", [2, 3, 4])
def test_bottleneck_search_and_bytes_dp_match_brute_force(k):
    rng = np.random.default_rng(k)
    for _ in range(40):
        m = int(rng.integers(k + 1, 13))
        cp = np.r_[0.0, np.cumsum(rng.uniform(0.1, 3.0, m - 1))]
        xp = rng.integers(1, 100, m).astype(float)
        eps = float(rng.choice([0.0, 0.05, 0.3]))
        want_b, want_bytes = _brute(cp, xp, k, eps)
        got_b = autosplit._bottleneck(cp, k, None)
        assert got_b == pytest.approx(want_b, rel=1e-8)
        cuts = autosplit._fewest_bytes(cp, xp, k, got_b * (1 + eps), None)
        assert sum(xp[c] for c in cuts) == want_bytes


def test_a_tensor_counts_once_per_cut_it_spans_however_many_readers():
    b = _bench()._Builder()
    x = b.op("x", "Placeholder", outputs=[(tf.float32, [None, 4])])
    t = b.op("t", "Tanh", [x], [(tf.float32, [None, 4])])
    chain = t
    readers = []
    for i in range(4):
        chain = b.op(f"c{i}", "Sin", [chain], [(tf.float32, [None, 2])])
        readers.append(b.op(f"r{i}", "Mul", [chain, t], [(tf.float32, [None, 2])]))
    total = b.op("sum", "AddN", readers, [(tf.float32, [None, 2])])
    program = _program(b, x, total)
    ix = autosplit._Indexed(program)
    gr = autosplit._coarsen(program, ix, dict.fromkeys(program.graph, 1.0), 1, False)
    _, crossing = autosplit._prefix(gr, np.arange(len(gr.members)))
    before = {ix.names[members[0]]: i for i, members in enumerate(gr.members)}
    # before c2: t (16 B, read by r2 and r3: once), c1 (8 B) and r0, r1 (waiting for the sum)
    assert crossing[before["c2"]] == 16 + 8 + 8 + 8


def _program(b, x, out, control=()):
    from gradsplit_compiler.ir.program import Program

    outputs = b.g.nodes[out]["outputs"]
    final = b.op("Identity", "Identity", [out], outputs)
    return Program(graph=b.g, arg_names=[f"{x}:0"], arg_specs=[],
                   output_names=[f"{final}:0"], output_structure=f"{final}:0",
                   control_outputs=list(control), variables=[],
                   variable_placeholders=dict(b.variable_placeholders), other_captures={})


def _interleaved_branches():
    """Two chains from x, A and B, created interleaved (A1 B1 A2 B2 ...), joined at the end.
    Cutting a prefix of that order crosses a big tensor; {A1, A2, A3, B1} crosses two tiny
    ones."""
    b = _bench()._Builder()
    x = b.op("x", "Placeholder", outputs=[(tf.float32, [None, 8])])
    widths = {"A": [1000, 1000, 1, 1000], "B": [1, 1000, 1000, 1000]}
    heads = {"A": x, "B": x}
    for i in range(4):
        for branch in "AB":
            heads[branch] = b.op(f"{branch}{i + 1}", "Tanh" if branch == "A" else "Sin",
                                 [heads[branch]],
                                 [(tf.float32, [None, widths[branch][i]])])
    join = b.op("J", "AddV2", [heads["A"], heads["B"]], [(tf.float32, [None, 1000])])
    return _program(b, x, join)


def test_min_cut_polish_finds_a_cheaper_cut_than_any_prefix_of_the_order():
    program = _interleaved_branches()
    seconds = {n: 0.0 if n == "Identity" else 1.0 for n in program.graph}
    kwargs = dict(op_seconds=seconds, eps=0.25)
    plain = autosplit.plan_partition(program, 2, polish=False, **kwargs)
    polished = autosplit.plan_partition(program, 2, polish=True, **kwargs)
    assert plain.cut_bytes == [4 * 1001]
    assert polished.cut_bytes == [4 * 2] and polished.polished == [0]
    assert sorted(polished.cuts[0]) == ["A3:0", "B1:0"]
    assert polished.bottleneck <= 1.25 * polished.lower_bound
    # The polish is local: the window around the cut is where either stage stays under the
    # cap, and ops before it stay put. Over every predecessor-closed set, {A1, A2, A3} alone
    # (4 bytes) would be better still; it moves B1, which sits before the window.
    assert _brute_closed_sets(program, seconds, 1.25 * polished.lower_bound) == 4


def _brute_closed_sets(program, seconds, cap):
    g = program.graph
    ops = [n for n in g if n not in ("x", "Identity")]
    best = np.inf
    for r in range(1, len(ops)):
        for chosen in itertools.combinations(ops, r):
            s = set(chosen)
            if any(p in ops and p not in s for n in s for p in g.predecessors(n)):
                continue
            if sum(seconds[n] for n in s) > cap or sum(seconds[n] for n in ops if n not in s) \
                    > cap:
                continue
            crossing = sum(costs.tensor_bytes(*g.nodes[n]["outputs"][0], 1) for n in s
                           if any(w not in s for w in g.successors(n)))
            best = min(best, crossing)
    return best


def test_polished_cuts_of_interleaved_branches_pass_verify():
    Wa = [tf.Variable(np.random.default_rng(i).normal(size=(6, 6)) * 0.5) for i in range(4)]
    Wb = [tf.Variable(np.random.default_rng(9 + i).normal(size=(6, 6)) * 0.5)
          for i in range(4)]

    @tf.function
    def loss(x):
        a = b = x
        for i in range(4):  # traced interleaved: A1 B1 A2 B2 ...
            a = tf.tanh(a @ Wa[i])
            b = tf.sin(b @ Wb[i])
        return tf.reduce_mean(a * b)

    case = models.Case("interleaved", loss, [tf.TensorSpec([None, 6], tf.float64)],
                       lambda r, n: [models.tensor(r, (n, 6), tf.float64)], [],
                       variables=Wa + Wb)
    split = gsc.auto_split(loss, case.input_signature, 3, batch_size=5)
    assert split.plan.mismatches == []
    _verify(split, case)


# -- objectives and limits ------------------------------------------------------------------------


def _chain(widths, variable_elements=None):
    b = _bench()._Builder()
    x = b.op("x", "Placeholder", outputs=[(tf.float32, [None, 4])])
    h = x
    for i, w in enumerate(widths):
        inputs = [h]
        if variable_elements is not None:
            inputs.append(b.variable(f"v{i}", [variable_elements[i]]))
        h = b.op(f"c{i}", "Mul" if variable_elements is not None else "Tanh", inputs,
                 [(tf.float32, [None, w])])
    return _program(b, x, h)


def test_microbatches_trade_balance_for_bytes_only_when_the_pipeline_is_short():
    program = _chain([8, 1, 8, 8, 8, 8, 8, 8])  # c1 is the narrow place to cut
    seconds = {n: 0.0 if n == "Identity" else 1.0 for n in program.graph}
    slow_link = costs.CostModel(link_bytes_per_second=100.0)
    one = autosplit.plan_partition(program, 2, microbatches=1, op_seconds=seconds,
                                   model=slow_link, polish=False)
    many = autosplit.plan_partition(program, 2, microbatches=1000, op_seconds=seconds,
                                    model=slow_link, polish=False)
    assert one.cuts == [["c1:0"]]  # one micro-batch: no overlap, only bytes matter
    assert one.pipeline_time == pytest.approx(8 + 2 * 4 / 100.0)
    assert many.cuts == [["c3:0"]]  # many: the bottleneck dominates
    assert many.bottleneck == 4.0


def test_memory_limit_is_respected_per_stage_and_an_impossible_one_names_the_smallest():
    elements = [1000, 10, 10, 10, 10, 10, 10, 1000]
    program = _chain([4] * 8, variable_elements=elements)
    seconds = {n: 0.0 if n == "Identity" else 1.0 for n in program.graph}
    free = autosplit.plan_partition(program, 2, op_seconds=seconds, memory_limit=1e9)
    assert free.positions == [4]
    with pytest.raises(gsc.GradSplitError, match=r"memory_limit=.*smallest limit that works"
                                                  r" is .*\((\d+) bytes\)") as info:
        autosplit.plan_partition(program, 2, op_seconds=seconds, memory_limit=4000)
    smallest = int(info.value.args[0].rsplit("(", 1)[1].split()[0])
    fits = autosplit.plan_partition(program, 2, op_seconds=seconds, memory_limit=smallest)
    assert max(fits.stage_memory) <= smallest
    # the two big variables can't share a stage; alone, each stage holds one of them
    assert all(m >= 4000 for m in fits.stage_memory)


def test_memory_counts_residuals_once_per_micro_batch_in_flight():
    program = _chain([100] * 6)
    seconds = {n: 0.0 if n == "Identity" else 1.0 for n in program.graph}
    one = autosplit.plan_partition(program, 3, op_seconds=seconds, memory_limit=1e9,
                                   batch_size=2)
    four = autosplit.plan_partition(program, 3, op_seconds=seconds, memory_limit=1e9,
                                    batch_size=2, microbatches=4)
    # 1F1B keeps min(K - k, M) micro-batches in flight in stage k: 3, 2, 1
    assert [f / o for f, o in zip(four.stage_memory, one.stage_memory)] == [3, 2, 1]


# -- a 100,000-op program -------------------------------------------------------------------------


def test_a_100k_op_program_is_partitioned_correctly():
    program = _bench().synthetic_program(100_000)
    g = program.graph
    plan = autosplit.plan_partition(program, 4, batch_size=32)
    assert len(plan.stage_costs) == 4
    assert sum(plan.stage_costs) == pytest.approx(plan.total_cost)
    assert plan.total_cost / 4 <= plan.lower_bound * (1 + 1e-9)
    assert plan.bottleneck <= 1.03 * plan.lower_bound * (1 + 1e-9)
    # data never flows from a later stage to an earlier one
    stage = plan.stage_of
    for u, v in g.edges():
        if u in stage and v in stage:
            assert stage[u] <= stage[v], (u, v)
    # the plan's bytes are those of the tensors that cross, each once per cut it spans
    for k, expected in enumerate(plan.cut_bytes):
        crossing = set()
        for u, v, a in g.edges(data=True):
            if not a["control"] and u in stage and v in stage and stage[u] <= k < stage[v]:
                crossing.add((u, a["src_output"]))
        assert expected == sum(costs.tensor_bytes(*g.nodes[u]["outputs"][i], 32)
                               for u, i in crossing)
        named = {f"{u}:{i}" for u, i in crossing if stage[u] == k}
        assert set(plan.cuts[k]) == {n for n in named
                                     if g.nodes[n.rpartition(":")[0]]["outputs"][0][0]
                                     .is_floating}


# -- errors ---------------------------------------------------------------------------------------


def test_refusals_name_what_would_work():
    case = models.mlp(depth=2)
    with pytest.raises(gsc.GradSplitError, match="num_stages must be an integer of at least 2"):
        gsc.auto_split(case.fn, case.input_signature, 1)
    with pytest.raises(gsc.GradSplitError, match="microbatches must be a positive integer"):
        gsc.auto_split(case.fn, case.input_signature, 2, microbatches=0)
    with pytest.raises(gsc.GradSplitError, match="memory_limit must be a positive number"):
        gsc.auto_split(case.fn, case.input_signature, 2, memory_limit=-1)
    with pytest.raises(gsc.GradSplitError, match=r"ask for at most \d+ stages"):
        gsc.auto_split(case.fn, case.input_signature, 500)


# -- ResNet50: balance, and bytes against the usual recipes ---------------------------------------


@pytest.mark.heavy
def test_resnet50_four_stages_are_balanced_and_no_recipe_crosses_fewer_bytes_at_its_balance():
    case = models.resnet50(tf.float32, resolution=64)
    loss, signature = case.fn, case.input_signature
    program = passes.run(capture(loss, signature), "analysis")
    plan = autosplit.plan_partition(program, 4, batch_size=32)
    assert plan.imbalance <= 1.05
    for by in ("ops", "params"):
        base = autosplit.baseline_plan(program, 4, by, batch_size=32)
        assert plan.bottleneck < base.bottleneck
        # given the baseline's own bottleneck, the plan crosses no more bytes than it does
        matched = autosplit.plan_partition(program, 4, batch_size=32,
                                           max_stage_cost=base.bottleneck)
        assert matched.bottleneck <= base.bottleneck * (1 + 1e-9)
        assert matched.total_bytes <= base.total_bytes


def test_auto_split_is_exported():
    assert "auto_split" in gsc.__all__ and callable(gsc.auto_split)


def test_the_benchmark_times_the_partitioner_and_writes_its_report(tmp_path):
    bench = _bench()
    rows = bench.runtime([1_000], [4], repeats=1)
    out = tmp_path / "autosplit.md"
    bench.write_report(out, "smoke", [], rows, {}, [])
    text = out.read_text()
    assert "## Partitioner runtime" in text and "| 4 | yes |" in text
    assert all(r["imbalance"] < 1.2 for r in rows)
