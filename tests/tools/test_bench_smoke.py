"""The benchmark runs (timings live in BENCHMARKS.md, never in tests)."""

import importlib.util
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "tools" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_benchmark_measures_and_writes_its_report(tmp_path):
    bench = _bench()

    def tiny_mlp(rng):
        return bench.mlp(rng, layers=4, width=16, batch=8, stages=2)

    speed = bench.figure_speed([tiny_mlp], repeats=1)
    cuts = bench.figure_cut_size([16], per_scalar_limit=16, jacobian_limit=16, repeats=1)
    out = tmp_path / "BENCH.md"
    bench.write_report(out, "smoke", speed, [], [], cuts)
    text = out.read_text()
    (name, stages, times, profile, paired), = speed
    assert stages == 2 and all(t > 0 for t in times.values())
    # section 11's plain stages, checked against the tape, timed in the same loop
    assert set(times) == {"mono", "composed", "stages", "hand", "plain"}
    assert {side: row["calls"] for side, row in profile.items()} == {
        "mono": 1, "run_stages": 4, "plain": 4}
    assert all(row["xla"] > 0 and row["step"] >= row["xla"] for row in profile.values())
    assert "the same stages in plain TensorFlow (section 11's program) |" in text
    # run_stages over the plain stages: the median of each round's ratio, with quartiles
    ratio, low, high = paired
    assert low <= ratio <= high
    assert f"`run_stages` took **{ratio:.3f}x**" in text
    assert f"(quartiles {low:.3f}-{high:.3f}; their medians' ratio " in text
    assert "| programs called | 1 | 4 | 4 |" in text
    assert set(cuts[0][1]) == {"mono", "ours", "jacobian", "per_scalar"}
    assert np.isclose(cuts[0][1]["mono"], 1.0)
    assert "| 16 |" in text and "MLP" in text


def test_a_run_of_some_figures_replaces_only_their_sections():
    bench = _bench()
    previous = ("# Benchmarks\n\nMade by `python tools/bench.py` on 2026-01-01.\n\n"
                "Machine: x.\n\n## 1-2. Speed\n\nold speed\n\n## 5. Cut size\n\nold cut\n\n"
                "## 6. Cluster\n\nold cluster\n")
    new = "# Benchmarks\n\nMade by `x` on 2026-02-02.\n\n## 5. Cut size\n\nnew cut\n"
    merged = bench.merge_report(previous, new, "python tools/bench.py --only 5")
    assert "old speed" in merged and "old cluster" in merged and "new cut" in merged
    assert "old cut" not in merged
    assert merged.index("## 1-2.") < merged.index("## 5.") < merged.index("## 6.")
    assert "Made by `python tools/bench.py` on 2026-01-01." in merged
    assert "Section 5 made again by `python tools/bench.py --only 5`" in merged
    assert bench.merge_report(merged, new, "python tools/bench.py --only 5") == merged
    # a later run of other sections keeps the note of the sections it did not make again
    newer = "# Benchmarks\n\nMade by `x` on 2026-02-03.\n\n## 6. Cluster\n\nnew cluster\n"
    again = bench.merge_report(merged, newer, "python tools/bench.py --only 6")
    assert "Section 5 made again by `python tools/bench.py --only 5`" in again
    assert "Section 6 made again by `python tools/bench.py --only 6`" in again
    both = "# Benchmarks\n\nMade by `x` on 2026-02-04.\n\n## 5. Cut size\n\nnewest\n"
    last = bench.merge_report(again, both, "python tools/bench.py --only 5 6")
    assert last.count("Section 5 made again") == 1 and "--only 5`" not in last


def test_each_schedules_simulated_idle_share_is_its_papers_formula():
    """Figure 9's first table: with equal-time actions the simulator gives GPipe's and
    1F1B's (K-1)/(M+K-1), ZB-H1's (K-1)/(3M+K-1), interleaved 1F1B's (K-1)/(vM+K-1) and
    ZB-V's (K-1)/(6M+K-1)."""
    rows = _bench().schedule_idle_rows(4, 2, (4, 8, 16))
    assert [name for name, _, _ in rows] == ["gpipe", "1f1b", "zb-h1", "interleaved-1f1b",
                                             "zb-v"]
    for name, _, cells in rows:
        for simulated, formula in cells:
            assert abs(simulated - formula) < 1e-12, name


def test_figure_10_counts_each_kind_of_bytes_as_the_grid_predicts():
    """Figure 10 on a tiny chain: activations, cotangents and the all-reduce per step equal
    their predictions from the split, for the 1-D pipelines and the 2 x 2 grid."""
    rows = _bench().grid_rows({"width": 16, "batch": 8, "microbatches": 2, "repeats": 1,
                               "warmup": 0, "jit_compile": False})
    assert [(r["stages"], r["replicas"]) for r in rows] == [(2, 1), (4, 1), (2, 2)]
    for r in rows:
        for kind in ("activations", "cotangents", "allreduce"):
            assert r[kind] == r[f"p_{kind}"], (r["layout"], kind, r)
        assert r["step"] > 0
    assert rows[2]["allreduce"] == 2 * 8 * 16 * 16 * 4  # 2 (R - 1) x every kernel's bytes
    assert rows[0]["allreduce"] == 0


def test_section_4_tables_show_each_phase_of_each_split_and_the_compilers_share():
    import tensorflow as tf

    import gradsplit_compiler as gsc

    bench = _bench()
    name, body, sig, cuts, _ = bench.chain(8, np.random.default_rng(0))
    split = gsc.split(tf.function(body), sig, cuts)
    phases = bench.profile_phases(split.profile)
    assert "stages: gradients" in phases and not any(p.startswith("stage ") for p in phases)
    assert abs(sum(phases.values()) - split.profile.total) < 1e-9
    row = {"name": name, "nodes": split.graph.number_of_nodes(), "trace": 1.0, "step": 2.0,
           "split": split.profile.total + 0.35, "phases": phases, "first_call": None,
           "split_collect": 0.25, "step_collect": 0.5, "ratios": [1.25, 1.0]}
    text = "\n".join(bench.split_time_markdown([row]))
    assert f"| {name} | {row['nodes']} | 1.00 s | 2.00 s |" in text
    assert "| stages: gradients | " in text and "| **the compiler's" in text
    # the collection on resuming is what is left of the split; gc.collect() beside the step's
    assert "resumes its collector (outside `Split.profile`) | 0.10 s (" in text
    assert "| 0.25 s (" in text and "(0.50 s) |" in text
    assert f"round by round: {name} 1.25, 1.00." in text
    # the ratio is the median of the rounds' own ratios, with their quartiles
    assert "| **1.125** (1.06-1.19) |" in text
    one_round = dict(row, ratios=[1.25])
    one_text = "\n".join(bench.split_time_markdown([one_round]))
    assert f"| {row['split'] / 2.0:.3f} (1 round) |" in one_text


def _separate_programs():
    spec = importlib.util.spec_from_file_location(
        "xla_separate_programs", ROOT / "tools" / "xla_separate_programs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_section_11_times_the_stages_as_plain_programs_and_writes_its_tables(tmp_path):
    """Figure 11's measurement on a tiny MLP (every stage side checked against the tape
    before timing), XLA's HLO counted from a dump, and the section's tables."""
    xsp = _separate_programs()
    config = {"layers": 4, "width": 8, "batch": 4, "repeats": 1, "stages": [2]}
    got = xsp.measure(config)  # raises if a side's gradients are not the tape's
    assert list(got["times"]) == ["mono", "2 stages", "2 stages, input copied",
                                  "2 stages, remat", "empty program",
                                  "2 stages, one at a time"]
    assert got["programs"]["2 stages"] == 4 and all(t > 0 for t in got["times"].values())

    dump = tmp_path / "dump"
    dump.mkdir()
    (dump / "module_0001.a_inference_forward_12__XlaMustCompile_true.1.cpu_after_optimizations"
            ".txt").write_text(
        "HloModule m\n\n%fused (p: f32[2]) -> f32[2] {\n  %p = f32[2]{0} parameter(0)\n}\n\n"
        "ENTRY %main (a: f32[2,2], b: f32[2]) -> (f32[2,2], f32[2]) {\n"
        "  %a = f32[2,2]{1,0} parameter(0)\n  %b = f32[2]{0} parameter(1)\n"
        "  %d = f32[2,2]{1,0} dot(%a, %a), lhs_contracting_dims={1}\n"
        "  %f = f32[2,2]{1,0} fusion(%d, %b), kind=kLoop, calls=%fused\n"
        "  %c = f32[2]{0} copy(%b)\n"
        "  ROOT %t = (f32[2,2]{1,0}, /*index=1*/f32[2]{0}) tuple(%f, %c)\n}\n")
    counts = xsp.hlo_counts(dump)
    assert counts == {"forward": [{"instructions": 6, "fusions": 1, "dots": 1, "copies": 1,
                                   "parameters": 2}]}

    got.update(config=config, settings=[
        {"setting": "defaults", "mono": 0.01, "stages": 0.011, "ratio": 1.1},
        {"setting": "broken", "mono": None, "stages": None, "ratio": None}],
        profile={"steps": {"mono": {"step": 0.01, "xla": 0.009, "runtime": 0.0005,
                                    "host": 0.0005, "calls": 1},
                           "4 stages": {"step": 0.011, "xla": 0.009, "runtime": 0.001,
                                        "host": 0.001, "calls": 8}},
                 "hlo": {"step": counts["forward"], **counts}})
    text = _bench().separate_programs_markdown(got)
    assert text.startswith("\n## 11. Separate XLA programs on XLA:CPU")
    assert "| 2 stages | 4 |" in text and "| broken | failed | - |" in text
    assert "| programs called | 1 | 8 |" in text and "| one program | 1 |" in text
    assert "took 1.00x the one program's" in text and "1.00 ms more per step" in text
    assert "| stage forwards | 1 | 6 | 1 | 1 | 1 |" in text


def test_section_4s_floor_exports_and_imports_in_plain_tensorflow():
    """``tools/split_floor.py`` on a small chain: every part measured, the imported loss's
    gradients built (it checks a variable got one), the table written; and it never imports
    this package (its floor holds for any design that exports and imports back)."""
    spec = importlib.util.spec_from_file_location("split_floor",
                                                  ROOT / "tools" / "split_floor.py")
    floor = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(floor)
    assert "gradsplit_compiler" not in (ROOT / "tools" / "split_floor.py").read_text() \
        .split('"""', 2)[2]
    row = floor.measure(lambda: floor.chain(6), rounds=1)
    assert row["name"] == "chain of 6 layers"
    assert all(row[p] > 0 for p in ("step", *floor.PARTS))
    assert abs(row["floor"] - sum(row[p] for p in floor.PARTS)) < 1e-12
    text = "\n".join(_bench().split_time_markdown([], [row]))
    assert "| chain of 6 layers |" in text and "tools/split_floor.py" in text
