"""Installing never replaces the user's TensorFlow; importing says what to install.

TensorFlow is an extra (``[cpu]``, ``[gpu]``), not a dependency, so ``import
gradsplit_compiler`` checks from package metadata, without importing TensorFlow, that one is
installed and recent enough.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import gradsplit_compiler
from gradsplit_compiler import _check_tensorflow, _installed_tensorflow

ROOT = Path(__file__).resolve().parents[1]


def _import_in_fresh_process(prelude: str, pythonpath: list[str] | None = None):
    """``import gradsplit_compiler`` in a new interpreter after running ``prelude``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*(pythonpath or []), str(ROOT)])
    code = f"{prelude}\nimport gradsplit_compiler\nprint('imported')\n"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)


def test_missing_tensorflow_names_both_extras_and_bringing_your_own():
    with pytest.raises(ImportError) as info:
        _check_tensorflow(None)
    message = str(info.value)
    assert 'pip install "gradsplit-compiler[cpu]"' in message
    assert 'pip install "gradsplit-compiler[gpu]"' in message
    assert "install TensorFlow yourself" in message
    assert ">= 2.16" in message


@pytest.mark.parametrize("found", [("tensorflow-cpu", "2.15.1"), ("tensorflow", "2.9.0"),
                                   ("tf-nightly", "2.15.0.dev20231001"), ("tensorflow", "1.15.5")])
def test_tensorflow_older_than_2_16_is_refused_naming_what_is_installed(found):
    dist, version = found
    with pytest.raises(ImportError) as info:
        _check_tensorflow(found)
    message = str(info.value)
    assert f"{dist} {version} is installed" in message
    assert f'pip install --upgrade "{dist}>=2.16"' in message


@pytest.mark.parametrize("found", [("tensorflow", "2.16.0"), ("tensorflow-cpu", "2.21.0"),
                                   ("tensorflow", "2.16.0rc0"), ("tensorflow", "3.0.0"),
                                   ("tf-nightly", "2.22.0.dev20260101"), ("unknown", "")])
def test_tensorflow_2_16_or_later_and_source_builds_are_accepted(found):
    _check_tensorflow(found)


def test_the_lookup_finds_the_tensorflow_this_process_runs():
    import tensorflow as tf

    dist, version = _installed_tensorflow()
    assert version == tf.__version__, (dist, version)


def test_importing_the_package_does_not_import_tensorflow():
    result = _import_in_fresh_process(
        "import atexit, sys; atexit.register(lambda: print('tf', 'tensorflow' in sys.modules))")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["imported", "tf", "False"]


def test_import_without_tensorflow_raises_the_message():
    # sys.modules[name] = None is how Python marks a module as not importable.
    result = _import_in_fresh_process("import sys; sys.modules['tensorflow'] = None")
    assert result.returncode != 0 and "imported" not in result.stdout
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: gradsplit_compiler needs TensorFlow >= 2.16, and none")
    assert 'pip install "gradsplit-compiler[cpu]"' in last


def test_import_with_an_old_tensorflow_raises_the_message(tmp_path):
    # A TensorFlow 2.15 that package metadata reports first on the path.
    (tmp_path / "tensorflow").mkdir()
    (tmp_path / "tensorflow" / "__init__.py").write_text("")
    info = tmp_path / "tensorflow-2.15.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tensorflow\nVersion: 2.15.0\n")
    result = _import_in_fresh_process("", [str(tmp_path)])
    assert result.returncode != 0 and "imported" not in result.stdout
    last = result.stderr.strip().splitlines()[-1]
    assert "tensorflow 2.15.0 is installed" in last, result.stderr


def test_tensorflow_is_an_extra_not_a_dependency():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.lower().startswith(("tensorflow", "tf-"))]
    extras = project["optional-dependencies"]
    assert extras["cpu"] == ["tensorflow-cpu>=2.16"]
    assert extras["gpu"] == ["tensorflow[and-cuda]>=2.16"]
    minimum = ".".join(map(str, gradsplit_compiler._MINIMUM_TENSORFLOW))
    assert all(spec.endswith(f">={minimum}") for spec in extras["cpu"] + extras["gpu"])


# Run before the code under test: sys.meta_path's finders, except that no `tensorflow` module
# exists (find_spec answers None, as in an environment without it).
_WITHOUT_TENSORFLOW = '''
import sys
class _WithoutTensorFlow:
    def __init__(self, finders):
        self.finders = finders
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "tensorflow":
            return None
        for finder in self.finders:
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                return spec
        return None
sys.meta_path[:] = [_WithoutTensorFlow(list(sys.meta_path))]
'''


def _gradsplit_without_tensorflow(tmp_path, *argv: str):
    """The `gradsplit` command as pip's console script runs it (the entry point declared in
    pyproject.toml), in a process where TensorFlow is not installed."""
    tomllib = pytest.importorskip("tomllib")
    entry = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"][
        "gradsplit"]
    module, function = entry.split(":")
    script = tmp_path / "gradsplit"
    script.write_text(f"{_WITHOUT_TENSORFLOW}\nfrom {module} import {function}\n"
                      f"sys.exit({function}())\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(script), *argv], env=env, capture_output=True,
                          text=True, timeout=120)


def test_gradsplit_help_without_tensorflow_says_what_to_install(tmp_path):
    result = _gradsplit_without_tensorflow(tmp_path, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: gradsplit"), result.stdout
    for command in ("demo", "inspect", "split", "verify", "render"):
        assert f"    {command}  " in result.stdout
    said = " ".join(result.stdout.split())
    assert "The commands cannot run here: gradsplit_compiler needs TensorFlow >= 2.16" in said
    assert 'pip install "gradsplit-compiler[cpu]"' in said
    assert 'pip install "gradsplit-compiler[gpu]"' in said
    assert "Traceback" not in result.stderr


def test_gradsplit_subcommand_help_without_tensorflow(tmp_path):
    result = _gradsplit_without_tensorflow(tmp_path, "split", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: gradsplit split"), result.stdout
    assert 'pip install "gradsplit-compiler[cpu]"' in " ".join(result.stdout.split())


def test_gradsplit_commands_without_tensorflow_fail_in_one_line(tmp_path):
    result = _gradsplit_without_tensorflow(
        tmp_path, "inspect", "gradsplit_compiler.examples:mlp_loss")
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("gradsplit inspect: error: gradsplit_compiler needs "
                               "TensorFlow >= 2.16, and none is installed.")
    assert 'pip install "gradsplit-compiler[cpu]"' in lines[0]


def test_the_library_still_refuses_after_the_command_line_imported_it():
    code = ("import gradsplit_compiler.cli\nimport gradsplit_compiler as gsc\n"
            "try:\n    gsc.split\nexcept ImportError as e:\n    print('refused:', e)\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", _WITHOUT_TENSORFLOW + code], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("refused: gradsplit_compiler needs TensorFlow >= 2.16")
