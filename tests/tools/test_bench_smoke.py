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
    (name, stages, times), = speed
    assert stages == 2 and all(t > 0 for t in times.values())
    assert set(cuts[0][1]) == {"mono", "ours", "jacobian", "per_scalar"}
    assert np.isclose(cuts[0][1]["mono"], 1.0)
    assert "| 16 |" in text and "MLP" in text
