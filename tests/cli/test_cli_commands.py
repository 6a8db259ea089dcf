"""`gradsplit inspect | split | verify | render` on a user's own program, as a user runs them.

The programs are made here: a saved Keras model (Dense, BatchNormalization, softmax head,
saved without a loss), a Python module with a `tf.function` that has an input_signature
(found through PYTHONPATH) and a SavedModel. Each command a test reads runs once in a
subprocess of the installed `gradsplit`, shared by every test (and xdist worker) that reads
it; the exported stages are driven by hand in a fresh Python process that never imports
gradsplit_compiler. Flag combinations and error messages that need no process of their own
run in-process through `cli.main`.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from models import randomize_model, rel_errors

from gradsplit_compiler import zoo
from gradsplit_compiler.cli import parser as cli
from gradsplit_compiler.show.render import BOUNDARY_COLOUR, STAGE_COLOURS

GRADSPLIT = Path(sys.executable).parent / "gradsplit"
STEP = re.compile(r"^\[(\d+)/(\d+)\] .+ \.\.\. \d+\.\d s$")
FAILED_STEP = re.compile(r"^\[(\d+)/(\d+)\] .+ \.\.\. failed$")
KERAS_LOSS = ["--loss", "categorical_crossentropy", "--training"]

USERPROG = '''\
import numpy as np
import tensorflow as tf

import gradsplit_compiler as gsc

_rng = np.random.default_rng(1)
W = tf.Variable(_rng.normal(size=(6, 5)), name="W")
V = tf.Variable(_rng.normal(size=(5, 3)), name="V")
E = tf.Variable(_rng.normal(size=(4, 5)), name="E")


@tf.function(input_signature=[tf.TensorSpec([None, 6], tf.float64),
                              tf.TensorSpec([None], tf.int32),
                              tf.TensorSpec([None, 3], tf.float64)])
def loss(x, ids, y0):
    h = gsc.mark(tf.tanh(x @ W + tf.gather(E, ids)), "h")
    y = tf.sin(h @ V) + x[:, :3]  # x skips the cut
    return tf.reduce_mean(tf.square(y - y0))


def plain(x, y0):  # no input_signature: needs --signature
    return tf.reduce_mean(tf.square(tf.tanh(x @ W) @ V - y0))


@tf.function(input_signature=[tf.TensorSpec([None, 6], tf.float64)])
def noisy(x):  # unseeded randomness: split and whole program draw different numbers
    h = gsc.mark(tf.tanh(x @ W), "h")
    return tf.reduce_mean(h * tf.random.uniform(tf.shape(h), dtype=tf.float64))
'''

# Loads exported stages and drives them by hand with the manifest, nothing else.
DRIVER = '''\
import json, sys
import numpy as np
import tensorflow as tf

def drive(directory, args):
    manifest = json.load(open(f"{directory}/manifest.json"))
    stages = [tf.saved_model.load(f"{directory}/{s['path']}") for s in manifest["stages"]]
    env = {a["name"]: tf.constant(v, dtype=a["dtype"]) for a, v in zip(manifest["args"], args)}
    residuals = []
    for entry, stage in zip(manifest["stages"], stages):
        outputs, res = stage.forward(*[env[t["name"]] for t in entry["inputs"]])
        env.update(zip([t["name"] for t in entry["outputs"]], outputs))
        residuals.append(res)
    (output,) = manifest["outputs"]
    cotangents = {output["name"]: tf.ones_like(env[output["name"]])}
    grads = {}
    for entry, stage, res in reversed(list(zip(manifest["stages"], stages, residuals))):
        out_cots = [cotangents.get(t["name"], tf.zeros_like(env[t["name"]]))
                    for t in entry["outputs"]]
        in_cots, var_grads = stage.backward(res, out_cots)
        for t, c in zip(entry["inputs"], in_cots):
            if c is not None:
                cotangents[t["name"]] = cotangents[t["name"]] + c if t["name"] in cotangents else c
        for i, g in zip(entry["variables"], var_grads):
            grads[i] = grads[i] + g if i in grads else g
    names = [v["name"] for v in manifest["variables"]]
    return {"value": float(env[output["name"]]),
            "grads": {names[i]: g.numpy().tolist() for i, g in grads.items()}}

jobs = json.load(open(sys.argv[1]))
results = {name: drive(job["dir"], [np.asarray(a) for a in job["args"]])
           for name, job in jobs.items()}
results["imported_gradsplit"] = any(m.startswith("gradsplit") for m in sys.modules)
json.dump(results, open(sys.argv[2], "w"))
'''


# -- running once per session, whichever xdist worker comes first ----------------------


@pytest.fixture(scope="session")
def shared(tmp_path_factory) -> Path:
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "cli-shared"
    root.mkdir(exist_ok=True)
    return root


def once(root: Path, name: str, make) -> Path:
    """``root/name``, made by ``make(path)`` the first time any worker asks for it."""
    path = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (root / f"{name}.done").exists():
                path.mkdir(exist_ok=True)
                make(path)
                (root / f"{name}.done").touch()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return path


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str

    @property
    def lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line]

    @property
    def messages(self) -> list[str]:
        """stderr without the progress lines."""
        return [line for line in self.lines
                if not STEP.match(line) and not FAILED_STEP.match(line)]


def gradsplit(*args: str, cwd: Path, timeout: float = 240) -> Run:
    assert GRADSPLIT.exists(), f"{GRADSPLIT} missing: pip install -e '.[test,render]'"
    env = dict(os.environ, PYTHONPATH=str(cwd))
    done = subprocess.run([str(GRADSPLIT), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)
    return Run(done.returncode, done.stdout, done.stderr)


def run_once(root: Path, programs: Path, name: str, *args: str) -> Run:
    def make(path: Path) -> None:
        result = gradsplit(*args, cwd=programs)
        (path / "run.json").write_text(json.dumps(result.__dict__))

    return Run(**json.loads((once(root, name, make) / "run.json").read_text()))


def in_process(capfd, *argv: str) -> tuple[int, str, str]:
    status = cli.main(list(argv))
    out, err = capfd.readouterr()
    return status, out, err


# -- the programs ------------------------------------------------------------------------


def make_programs(path: Path) -> None:
    # dtype spelled out: another test of the same worker may hold Keras' floatx at float64
    model = zoo.keras_mlp(6, 8, 3, dtype="float32", sequential=False, name="small").model
    randomize_model(model, 0)  # no zero biases, no identity batch norm
    model.save(path / "small.keras")
    (path / "userprog.py").write_text(USERPROG)

    class Regression(tf.Module):
        def __init__(self):
            rng = np.random.default_rng(2)
            self.W = tf.Variable(rng.normal(size=(6, 4)), name="W")
            self.V = tf.Variable(rng.normal(size=(4, 2)), name="V")

        @tf.function(input_signature=[tf.TensorSpec([None, 6], tf.float64, name="x"),
                                      tf.TensorSpec([None, 2], tf.float64, name="y0")])
        def loss(self, x, y0):
            h = tf.identity(tf.tanh(x @ self.W), name="hidden")
            return {"loss": tf.reduce_mean(tf.square(h @ self.V - y0))}

    module = Regression()
    tf.saved_model.save(module, str(path / "regression"),
                        signatures={"serving_default": module.loss})


@pytest.fixture(scope="session")
def programs(shared) -> Path:
    return once(shared, "programs", make_programs)


@pytest.fixture(scope="session")
def keras_split(shared, programs) -> Run:
    return run_once(shared, programs, "keras_split", "split", "small.keras", *KERAS_LOSS,
                    "--cut", "bn", "--cut", "dense2", "--export", "keras-stages")


@pytest.fixture(scope="session")
def function_split(shared, programs) -> Run:
    return run_once(shared, programs, "function_split", "split", "userprog:loss", "--cut", "h",
                    "--export", "function-stages")


@pytest.fixture(scope="session")
def rendered(shared, programs) -> Run:
    return run_once(shared, programs, "render", "render", "small.keras", *KERAS_LOSS,
                    "--cut", "bn", "--cut", "dense2", "-o", "small.png", "-o", "small.svg",
                    "--tensorboard", "tb")


# -- help ----------------------------------------------------------------------------------


def help_examples(command: str) -> list[list[str]]:
    """The runnable examples of ``gradsplit COMMAND --help`` (not the "your own" ones)."""
    text = subprocess.run([str(GRADSPLIT), command, "--help"], capture_output=True,
                          text=True, check=True).stdout
    block = text.split("examples:\n", 1)[1].split("\n\n", 1)[0].replace("\\\n", " ")
    return [shlex.split(line)[1:] for line in block.splitlines()
            if line.strip().startswith("gradsplit") and "your own" not in line]


@pytest.mark.parametrize("command", ["inspect", "split", "verify", "render"])
def test_help_examples_run(command, tmp_path, capfd):
    examples = help_examples(command)
    assert examples and all(argv[0] == command for argv in examples)
    for argv in examples:
        argv = [a.replace("/tmp/", f"{tmp_path}/") for a in argv]
        status, out, err = in_process(capfd, *argv, "--quiet")
        assert status == 0, f"gradsplit {' '.join(argv)}:\n{out}{err}"


def test_help_explains_target_and_signature_syntax(tmp_path):
    result = gradsplit("split", "--help", cwd=tmp_path)
    assert result.returncode == 0 and result.stderr == ""
    for text in ("package.module:function", "model.keras", "SAVED_MODEL_DIR",
                 '--signature "[None,10]:float32,[None,5]:float32"', "--export DIR",
                 "--cut NAME"):
        assert text in result.stdout


# -- inspect -------------------------------------------------------------------------------


def test_inspect_lists_tensors_with_layer_and_bytes_per_example(shared, programs):
    result = run_once(shared, programs, "inspect", "inspect", "small.keras", *KERAS_LOSS)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("small.keras: mean categorical_crossentropy(labels, small(x, "
                          "training=True))\narguments: x [None,6]:float32, labels "
                          "[None,3]:float32\n")
    row = r"^\S*{op}:0\s+{type}\s+float32\s+{shape}\s+{layer}\s+{nbytes}$"
    for op, op_type, shape, layer, nbytes in [
        ("dense1\\S*/Relu", "Relu", r"\[None,8\]", r"dense1 \(output\)", "32 B/ex"),
        ("dense1\\S*/MatMul", "MatMul", r"\[None,8\]", "dense1", "32 B/ex"),
        ("bn\\S*/moments/mean", "Mean", r"\[1,8\]", "bn", "32 B"),  # not per example
        ("head\\S*/Softmax", "Softmax", r"\[None,3\]", r"head \(output\)", "12 B/ex"),
    ]:
        pattern = row.format(op=op, type=op_type, shape=shape, layer=layer, nbytes=nbytes)
        assert re.search(pattern, out, re.M), f"no row {pattern} in:\n{out}"
    assert re.search(r"^\d+ more floating-point tensors no argument flows into", out, re.M)
    assert "or a Keras layer (dense1, bn, dense2, head)" in out
    steps = [STEP.match(line).groups() for line in result.lines]
    assert steps == [("1", "3"), ("2", "3"), ("3", "3")]


def test_inspect_filters_by_layer_pattern_and_layer_outputs(programs, capfd, monkeypatch):
    monkeypatch.chdir(programs)
    base = ["inspect", "small.keras", "--loss", "mse", "-q"]
    status, out, _ = in_process(capfd, *base, "--layer-outputs")
    assert status == 0
    layers = re.findall(r"^\S+:\d\s+\S+\s+float32\s+\S+\s+(\w+) \(output\)", out, re.M)
    assert layers == ["dense1", "bn", "dense2", "head"]
    status, out, _ = in_process(capfd, *base, "--layer", "bn")
    rows = re.findall(r"^(\S+:\d) ", out, re.M)
    assert status == 0 and rows and all("bn" in name.split("/")[1] for name in rows)
    status, out, _ = in_process(capfd, *base, "--filter", "relu|tanh$")
    assert re.findall(r"^\S+/(\w+):0 ", out, re.M) == ["Relu"]
    status, out, _ = in_process(capfd, *base, "--filter", "tanh")
    assert re.findall(r"^\S+/(\w+):0 ", out, re.M) == ["Tanh"]


def test_inspect_a_python_file_and_a_function_given_a_signature(programs, capfd):
    status, out, _ = in_process(capfd, "inspect", f"{programs}/userprog.py:plain", "-q",
                                "--signature", "[None,6]:float64, [None,3]:float64")
    assert status == 0
    assert "arguments: x [None,6]:float64, y0 [None,3]:float64" in out
    assert re.search(r"^Tanh:0\s+Tanh\s+float64\s+\[None,5\]\s+40 B/ex$", out, re.M)


@pytest.mark.parametrize("target, flags, cut", [
    ("small.keras", ["--loss", "mse", "--training"], "dense2"),
    ("userprog.py:plain", ["--signature", "[None,6]:float64, [None,3]:float64"], "Tanh:0"),
])
def test_inspect_cut_with_line_runs_as_printed(programs, capfd, monkeypatch, target, flags,
                                               cut):
    monkeypatch.chdir(programs)
    status, out, _ = in_process(capfd, "inspect", target, *flags, "-q")
    assert status == 0
    (hint,) = re.findall(r"^Cut with: (.+) --cut NAME, NAME a tensor above", out, re.M)
    words = shlex.split(hint)
    assert words[:3] == ["gradsplit", "split", target] and words[3:] == flags, hint
    status, out, err = in_process(capfd, *words[1:], "--cut", cut, "-q")
    assert status == 0, err
    assert re.search(r"^2 stages, ", out, re.M), out


# -- split and export ----------------------------------------------------------------------


def test_split_prints_one_row_per_stage(keras_split):
    assert keras_split.returncode == 0, keras_split.stderr
    out = keras_split.stdout
    assert "3 stages, 10 variables (187 parameters, 748 B)" in out
    header = r"^stage\s+ops\s+variables\s+parameters\s+inputs\s+outputs\s+residuals\s+" \
             r"residual bytes$"
    assert re.search(header, out, re.M)
    # dense1 (6x8 + 8) and bn (4 x 8): 88 parameters; dense2 and head: 72 + 27
    assert re.search(r"^0\s+\d+\s+6\s+88 \(352 B\)\s+x\s+bn\s+\d+\s+\d+ B/ex \+ \d+ B$", out,
                     re.M)
    assert re.search(r"^1\s+\d+\s+2\s+72 \(288 B\)\s+bn\s+dense2\s+", out, re.M)
    assert re.search(r"^2\s+\d+\s+2\s+27 \(108 B\)\s+labels, dense2\s+output\s+", out, re.M)


def test_split_prints_the_tensors_crossing_each_cut_with_bytes(keras_split):
    out = keras_split.stdout
    assert "cut 0: 2 tensors cross it, 44 B/ex" in out  # labels skip to the last stage
    assert re.search(r"^  labels:0\s+labels\s+\[None,3\]\s+float32\s+12 B/ex$", out, re.M)
    assert re.search(r"^  \S+bn\S+:0\s+bn\s+\[None,8\]\s+float32\s+32 B/ex$", out, re.M)
    assert "cut 1: 2 tensors cross it, 44 B/ex" in out
    assert re.search(r"^  \S+dense2\S+/Tanh:0\s+dense2\s+\[None,8\]\s+float32\s+32 B/ex$",
                     out, re.M)


def test_split_shows_progress_one_line_per_step(keras_split):
    steps = [STEP.match(line) for line in keras_split.lines]
    assert all(steps), keras_split.stderr
    assert [int(m.group(1)) for m in steps] == list(range(1, 7))  # 3 steps + 3 exports
    assert keras_split.lines[3].startswith("[4/6] exporting stage 0 to keras-stages/stage0")


def test_split_of_a_function_sends_skip_connections_across(function_split):
    assert function_split.returncode == 0, function_split.stderr
    out = function_split.stdout
    assert "userprog:loss(x [None,6]:float64, ids [None]:int32, y0 [None,3]:float64)" in out
    assert "cut 0: 3 tensors cross it, 112 B/ex" in out
    for name, label, nbytes in [("x:0", "x", 48), ("y0:0", "y0", 24),
                                ("gsc.mark.h.:0", "h", 40)]:
        assert re.search(rf"^  {re.escape(name)}\s+{label}\s+\S+\s+float64\s+{nbytes} B/ex$",
                         out, re.M)


def test_export_writes_a_manifest_of_stages_in_order(keras_split, programs):
    manifest = json.loads((programs / "keras-stages" / "manifest.json").read_text())
    assert [s["path"] for s in manifest["stages"]] == ["stage0", "stage1", "stage2"]
    assert [a["name"] for a in manifest["args"]] == ["x:0", "labels:0"]
    assert manifest["args"][0]["shape"] == [None, 6]
    known = {a["name"] for a in manifest["args"]}
    for stage in manifest["stages"]:
        assert {t["name"] for t in stage["inputs"]} <= known  # fed by args or earlier stages
        known |= {t["name"] for t in stage["outputs"]}
        assert (programs / "keras-stages" / stage["path"] / "saved_model.pb").exists()
    used = sorted(i for s in manifest["stages"] for i in s["variables"])
    assert used == list(range(10))
    assert manifest["variables"][0] == {"name": "dense1/kernel:0", "shape": [6, 8],
                                        "dtype": "float32", "trainable": True}


@pytest.fixture(scope="session")
def driven(shared, programs, keras_split, function_split):
    """The exported stages driven by hand in a fresh process, and the arguments it used."""
    rng = np.random.default_rng(7)
    args = {
        "keras": [rng.normal(size=(5, 6)).astype(np.float32),
                  np.eye(3, dtype=np.float32)[rng.integers(0, 3, size=5)]],
        "function": [rng.normal(size=(5, 6)), np.array([0, 1, 3, 2, 1], np.int32),
                     rng.normal(size=(5, 3))],
    }

    def make(path: Path) -> None:
        jobs = {"keras": {"dir": str(programs / "keras-stages"),
                          "args": [a.tolist() for a in args["keras"]]},
                "function": {"dir": str(programs / "function-stages"),
                             "args": [a.tolist() for a in args["function"]]}}
        (path / "jobs.json").write_text(json.dumps(jobs))
        (path / "driver.py").write_text(DRIVER)
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        env.pop("PYTHONPATH", None)
        subprocess.run([sys.executable, str(path / "driver.py"), str(path / "jobs.json"),
                        str(path / "results.json")], check=True, capture_output=True,
                       timeout=240, cwd=path, env=env)

    results = json.loads((once(shared, "driven", make) / "results.json").read_text())
    return results, args


def relative_errors(got: dict, reference: dict) -> dict[str, float]:
    """``models.rel_errors`` by variable name."""
    names = sorted(reference)
    return dict(zip(names, rel_errors([got[n] for n in names], [reference[n] for n in names])))


def test_exported_keras_stages_give_the_gradient_in_a_fresh_process(driven, programs):
    import keras

    results, args = driven
    assert results["imported_gradsplit"] is False
    model = keras.models.load_model(programs / "small.keras")
    variables = [v.value for v in model.variables]
    x, labels = (tf.constant(a) for a in args["keras"])
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(keras.losses.categorical_crossentropy(
            labels, model(x, training=True)))
    grads = tape.gradient(loss, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    reference = {v.name: g.numpy() for v, g in zip(variables, grads)}
    got = results["keras"]
    assert set(got["grads"]) == set(reference)
    assert abs(got["value"] - float(loss)) <= 1e-5 * abs(float(loss))
    errors = relative_errors(got["grads"], reference)
    assert max(errors.values()) <= 1e-5, errors


def test_exported_float64_function_stages_give_the_gradient_exactly(driven, programs,
                                                                     monkeypatch):
    monkeypatch.syspath_prepend(str(programs))
    import userprog

    results, args = driven
    variables = [userprog.W, userprog.V, userprog.E]
    with tf.GradientTape() as tape:
        loss = userprog.loss(*(tf.constant(a) for a in args["function"]))
    grads = tape.gradient(loss, variables)
    reference = {v.name: tf.convert_to_tensor(g).numpy() for v, g in zip(variables, grads)}
    got = results["function"]
    assert abs(got["value"] - float(loss)) <= 1e-12 * abs(float(loss))
    errors = relative_errors(got["grads"], reference)
    assert max(errors.values()) <= 1e-12, errors


# -- verify --------------------------------------------------------------------------------


def test_verify_prints_one_row_per_variable_and_exits_zero(shared, programs):
    result = run_once(shared, programs, "verify64", "verify", "small.keras", *KERAS_LOSS,
                      "--cut", "bn", "--float64", "--batch", "6", "--seed", "3")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "arguments: x [None,6]:float64, labels [None,3]:float64" in out
    assert "2 stages; random inputs: every None dimension 6, seed 3, labels one-hot" in out
    assert re.search(r"^OK: max relative error \S+ \(tolerance 1e-12\).*float64, XLA on both "
                     r"sides$", out, re.M)
    rows = re.findall(r"^(\S+:0)\s+\([\d, ]*\)\s+(\S+)\s+(\S+)$", out, re.M)
    assert [name for name, _, _ in rows] == [
        "dense1/kernel:0", "dense1/bias:0", "bn/moving_mean:0", "bn/moving_variance:0",
        "bn/gamma:0", "bn/beta:0", "dense2/kernel:0", "dense2/bias:0", "head/kernel:0",
        "head/bias:0"]
    assert all(float(rel) <= 1e-12 for _, _, rel in rows)
    assert [int(STEP.match(line).group(1)) for line in result.lines] == [1, 2, 3, 4]
    assert "verifying on random inputs (XLA" in result.lines[3]


def test_verify_cuts_inside_a_savedmodel_after_inlining(programs, capfd, tmp_path):
    status, out, _ = in_process(capfd, "inspect", str(programs / "regression"), "-q",
                                "--filter", "hidden")
    assert status == 0
    (hidden,) = re.findall(r"^(\S+/hidden:0) ", out, re.M)
    assert hidden.startswith("StatefulPartitionedCall/")  # a nested call's op, inlined
    result = gradsplit("verify", str(programs / "regression"), "--cut", hidden, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "regression [serving_default]: loss(x, y0)" in result.stdout
    assert re.search(r"^OK: .*float64, XLA on both sides$", result.stdout, re.M)
    assert re.findall(r"^(\w):0 ", result.stdout, re.M) == ["W", "V"]


def test_verify_of_unseeded_randomness_exits_one_with_one_line(shared, programs):
    """An unseeded stateful random op draws differently in every function instance, and
    under XLA in every program: verify refuses to compare, naming the op, instead of
    reporting a mismatch."""
    result = run_once(shared, programs, "verify_noisy", "verify", "userprog:noisy", "--cut",
                      "h")
    assert result.returncode == 1
    (message,) = result.messages
    assert "random" in message and "RandomUniform" in message
    result = run_once(shared, programs, "verify_noisy_graph", "verify", "userprog:noisy",
                      "--cut", "h", "--no-xla")
    assert result.returncode == 1
    (message,) = result.messages
    assert "without a seed" in message and "RandomUniform" in message


# -- render --------------------------------------------------------------------------------


def test_render_png_has_one_colour_per_stage(rendered, programs):
    import matplotlib.image

    assert rendered.returncode == 0, rendered.stderr
    assert "Wrote small.png, small.svg: 3 stages" in rendered.stdout
    path = programs / "small.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rgb = (matplotlib.image.imread(path)[..., :3] * 255).round().astype(np.uint8)
    colours, counts = np.unique(rgb.reshape(-1, 3), axis=0, return_counts=True)
    found = {"#" + "".join(f"{int(v):02x}" for v in c): int(n) for c, n in zip(colours, counts)}
    drawn = [c for c in STAGE_COLOURS if found.get(c, 0) >= 100]
    assert drawn == STAGE_COLOURS[:3]
    assert found.get(BOUNDARY_COLOUR, 0) >= 50


def test_render_svg_has_one_fill_per_stage(rendered, programs):
    root = ElementTree.parse(programs / "small.svg").getroot()
    assert root.tag.endswith("svg")
    styles = " ".join(e.get("style", "") for e in root.iter())
    fills = set(re.findall(r"fill:\s*(#[0-9a-f]{6})", styles))
    assert [c for c in STAGE_COLOURS if c in fills] == STAGE_COLOURS[:3]
    assert BOUNDARY_COLOUR in set(re.findall(r"stroke:\s*(#[0-9a-f]{6})", styles))
    assert "stage 2 (" in (programs / "small.svg").read_text()  # text kept as text


def test_render_writes_graphs_tensorboard_can_read(rendered, programs):
    from tensorflow.core.util import event_pb2

    graphs = {}
    for path in (programs / "tb").glob("*/events.out.tfevents.*"):
        for record in tf.data.TFRecordDataset(str(path)):
            event = event_pb2.Event.FromString(record.numpy())
            if event.HasField("graph_def"):
                graphs[path.parent.name] = tf.compat.v1.GraphDef.FromString(event.graph_def)
    assert set(graphs) == {"program"} | {f"stage{k}.{f}" for k in range(3)
                                         for f in ("forward", "backward")}
    assert all(len(g.node) > 5 for g in graphs.values())
    devices = {n.device for n in graphs["program"].node} - {""}
    assert devices == {"/job:stage0", "/job:stage1", "/job:stage2"}


def test_big_model_is_grouped_into_readable_boxes(tmp_path, capfd):
    """60 layers of 3 ops each: above --max-ops, scopes, then chains of scopes, merge."""
    module = tmp_path / "deep.py"
    module.write_text(textwrap.dedent('''\
        import tensorflow as tf
        import gradsplit_compiler as gsc
        ws = [tf.Variable(tf.eye(4) * 0.9, name=f"w{i}") for i in range(60)]
        @tf.function(input_signature=[tf.TensorSpec([None, 4])])
        def loss(x):
            for i, w in enumerate(ws):
                with tf.name_scope(f"layer{i}"):
                    x = tf.tanh(x @ w)
                if i == 29:
                    x = gsc.mark(x, "middle")
            return tf.reduce_sum(x)
    '''))
    status, out, _ = in_process(capfd, "render", f"{module}:loss", "--cut", "middle", "-q",
                                "-o", str(tmp_path / "deep.png"), "--max-ops", "40")
    assert status == 0
    boxes = int(re.search(r"in (\d+) boxes, grouped by name scope at depth 1 and chains "
                          r"merged", out).group(1))
    assert boxes <= 12


# -- errors --------------------------------------------------------------------------------


def test_unknown_cut_is_one_line_with_close_names(programs):
    result = gradsplit("split", "small.keras", "--loss", "mse", "--cut", "bnn", cwd=programs)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert result.messages == [
        "gradsplit split: error: cut 'bnn' is not a tensor, a gsc.mark name or a Keras layer "
        "of this program. Close names in the graph: 'bn'. `gradsplit inspect` lists every "
        "tensor one can cut at."
    ]
    assert result.lines[-1] == result.messages[0]
    assert result.lines[-2].endswith("tracing and splitting at bnn ... failed")


@pytest.mark.parametrize("argv, status, message", [
    (["split", "small.keras", "--cut", "bn"], 2,
     "the model 'small' was saved without a loss; name one with --loss"),
    (["split", "userprog:loss", "--loss", "mse", "--cut", "h"], 2,
     "--loss does not apply to a function (TARGET userprog:loss)"),
    (["verify", "userprog:loss", "--cut", "h", "--float64"], 2,
     "--float64 rebuilds a Keras model in float64"),
    (["split", "userprog:plain", "--cut", "Tanh"], 2,
     "TARGET userprog:plain has no input_signature; give one with --signature"),
    (["split", "userprog.py:plain", "--signature", "[None,6:float64", "--cut", "Tanh"], 2,
     "--signature '[None,6:float64': cannot read a spec at character 1"),
    (["split", "small.keras", "--loss", "msee", "--cut", "bn"], 2,
     "--loss 'msee' is not a Keras loss; try one of mse, mae"),
    (["split", "regression", "--signature-key", "train", "--cut", "x"], 2,
     "the SavedModel regression has no signature 'train'; its signatures: serving_default"),
    (["render", "small.keras", "--loss", "mse", "--cut", "bn", "-o", "g.jpg"], 2,
     "the picture's name must end in .png or .svg"),
    (["render", "small.keras", "--loss", "mse", "--cut", "bn"], 2,
     "give -o FILE.png|FILE.svg, --tensorboard DIR, or both"),
    (["inspect", "small.keras", "--loss", "mse", "--layer", "bm"], 1,
     "--layer 'bm' is not a layer of this program; layers: dense1, bn, dense2, head."),
    (["inspect", "userprog:los"], 1,
     "userprog has no attribute 'los'. Did you mean: loss?"),
    (["inspect", "nomodule:fn"], 1, "cannot import 'nomodule'"),
    (["inspect", "missing.keras"], 1, "TARGET missing.keras: no such file."),
])
def test_errors_are_one_line_in_the_flags_terms(argv, status, message, programs, capfd,
                                                monkeypatch):
    monkeypatch.chdir(programs)
    monkeypatch.syspath_prepend(str(programs))
    got, out, err = in_process(capfd, *argv, "-q")
    lines = err.strip().splitlines()
    assert got == status and len(lines) == 1, err
    assert lines[0].startswith(f"gradsplit {argv[0]}: error: ")
    assert message in lines[0]
