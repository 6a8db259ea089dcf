"""`gradsplit` on the command line: the demo runs end to end, prints its numbers, draws.

These run the installed console script in a subprocess, as a user would.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

GRADSPLIT = Path(sys.executable).parent / "gradsplit"
# TensorFlow's C++ runtime prints these at import, before `main` runs (gradsplit_compiler
# imports TensorFlow when the package loads); they are not the command's output.
TF_IMPORT_LOG = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog|[IWE]\d{4} |"
    r"To enable the following instructions)"
)


def gradsplit(*args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    assert GRADSPLIT.exists(), f"{GRADSPLIT} missing: pip install -e '.[test,render]'"
    return subprocess.run([str(GRADSPLIT), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))


def own_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line and not TF_IMPORT_LOG.match(line)]


def table_row(stdout: str, label: str) -> str:
    rows = [line for line in stdout.splitlines() if line.startswith(label)]
    assert len(rows) == 1, f"no single row {label!r} in:\n{stdout}"
    return rows[0]


def floats(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"\d\.\de[+-]\d\d", text)]


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    where = tmp_path_factory.mktemp("demo")
    result = gradsplit("demo", "--quick", "-o", "graph.png", cwd=where)
    return result, where / "graph.png"


def test_demo_exits_zero_without_errors(quick_demo):
    result, _ = quick_demo
    assert result.returncode == 0, result.stdout + result.stderr
    assert own_lines(result.stderr) == []


def test_demo_states_the_problem_before_anything_else(quick_demo):
    result, _ = quick_demo
    head = "\n".join(result.stdout.splitlines()[:4])
    assert "tf.gradients(loss, y) and tf.gradients(y, W) don't chain" in head
    assert "tf.gradients sums its" in head


def test_demo_composed_gradient_matches_gradient_tape_in_float32_and_float64(quick_demo):
    result, _ = quick_demo
    f32, f64 = floats(table_row(result.stdout, "gradsplit: 2 stages"))
    assert f32 <= 1e-5
    assert f64 <= 1e-12
    assert "gsc.verify: OK in float32" in result.stdout
    assert "OK in float64" in result.stdout


def test_demo_shows_the_thread_answers_with_cost_and_error(quick_demo):
    result, _ = quick_demo
    for label in ("(a) tf.gradients per scalar of y", "(b) GradientTape.jacobian"):
        row = table_row(result.stdout, label)
        assert "65" in row  # 64 elements of y: 64 backward passes + one for dL/dy
        assert re.search(r"\d+\.\dx", row), row  # cost relative to the monolithic gradient
        f32, f64 = floats(row)
        assert f32 <= 1e-5 and f64 <= 1e-12


def test_demo_prints_the_stage_table_and_the_boundary(quick_demo):
    result, _ = quick_demo
    assert re.search(r"^stage\s+ops\s+inputs\s+outputs\s+variables\s+residuals", result.stdout,
                     re.M)
    assert re.search(r"^0\s+\d+\s+x\s+y\s+W \(256, 16\), b \(16,\)", result.stdout, re.M)
    assert "Boundary of cut 0: y0 [4,16] (an argument a later stage reads), y [4,16]" \
        in result.stdout


def test_demo_shows_progress_one_line_per_step(quick_demo):
    result, _ = quick_demo
    steps = re.findall(r"^\[(\d)/(\d)\] .* \d+\.\d s$", result.stdout, re.M)
    assert [int(k) for k, _ in steps] == list(range(1, 7))


def test_demo_writes_the_picture_as_a_png(quick_demo):
    import matplotlib.image

    result, picture = quick_demo
    assert picture.exists(), result.stdout
    pixels = matplotlib.image.imread(picture)
    height, width, channels = pixels.shape
    assert width >= 600 and height >= 300 and channels in (3, 4)
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_help_shows_an_example(tmp_path):
    result = gradsplit("demo", "--help", cwd=tmp_path)
    assert result.returncode == 0
    assert "examples:" in result.stdout and "gradsplit demo --quick" in result.stdout
    assert "--cut-size" in result.stdout and "-o PNG" in result.stdout


def test_help_lists_the_demo_command(tmp_path):
    result = gradsplit("--help", cwd=tmp_path)
    assert result.returncode == 0
    assert re.search(r"^\s+demo\s+the seed problem", result.stdout, re.M)


def test_bad_option_is_one_line_and_exit_status_2(tmp_path):
    result = gradsplit("demo", "--no-such-option", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert own_lines(result.stderr) == [
        "gradsplit demo: error: unrecognized arguments: --no-such-option "
        "(see gradsplit demo --help)"
    ]


def test_cut_size_that_does_not_fit_the_width_is_a_usage_error(tmp_path):
    result = gradsplit("demo", "--cut-size", "100", cwd=tmp_path)
    assert result.returncode == 2
    lines = own_lines(result.stderr)
    assert len(lines) == 1 and "--cut-size 100 must be a multiple of --width 16" in lines[0]


def test_failure_while_running_is_one_line_without_traceback(tmp_path):
    (tmp_path / "taken").mkdir()  # the picture path is a directory: writing it fails
    result = gradsplit("demo", "--quick", "-o", "taken", cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = own_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("gradsplit demo: error: IsADirectoryError")
    assert "--debug" in lines[0]
