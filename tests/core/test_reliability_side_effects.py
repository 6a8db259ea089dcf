"""Side effects other than variable assignment (``docs/semantics.md``): ``tf.print``,
``tf.debugging.assert_*`` and summary writes run exactly once per step, in the forward of
the stage that holds them, in graph mode; under XLA those XLA cannot compile are refused
with a ``GradSplitError`` naming the op, and assertions are dropped as XLA drops them from
``fn`` itself (like with like).
"""

from __future__ import annotations

import glob

import numpy as np
import pytest
import tensorflow as tf
from models import normal, snapshot, variable
from tensorflow.core.util import event_pb2

import gradsplit_compiler as gsc

F64 = tf.float64
SIGNATURE = [tf.TensorSpec([None, 6], F64), tf.TensorSpec([None, 3], F64)]
ROUTES = ["value_and_gradients", "vjp", "run_stages"]
STEPS = 3


class Program:
    """``steps += 1``; ``h1 = tanh(x W1)`` printed (stage 0); cut at ``h1``;
    ``y = sin(h1 W2)`` printed, written as a summary and asserted ``max|y| < limit``
    (stage 1). ``limit`` is a variable, so the assertion can be made to fail without a
    retrace."""

    def __init__(self, tmp_path, summaries: bool = False, prints: bool = True):
        rng = np.random.default_rng(0)
        self.W1 = variable(rng, (6, 8), F64, "W1")
        self.W2 = variable(rng, (8, 3), F64, "W2")
        self.steps = tf.Variable(tf.zeros([], F64), name="steps")
        self.limit = tf.Variable(tf.constant(2.0, F64), name="limit")
        self.summary_step = tf.Variable(0, dtype=tf.int64, name="summary_step")
        self.print_path = tmp_path / "printed.txt"
        self.logdir = tmp_path / "logs"
        stream = f"file://{self.print_path}"
        W1, W2, steps, limit, step = self.W1, self.W2, self.steps, self.limit, self.summary_step

        @tf.function
        def loss(x, target):
            steps.assign_add(tf.ones([], F64))
            h1 = tf.tanh(tf.matmul(x, W1))
            if prints:
                tf.print("h1", tf.reduce_sum(h1), output_stream=stream)
            h1 = gsc.mark(h1, "h1")
            y = tf.sin(tf.matmul(h1, W2))
            if prints:
                tf.print("y", tf.reduce_sum(y), output_stream=stream)
            tf.debugging.assert_less(tf.reduce_max(tf.abs(y)), limit, message="y out of range")
            if summaries:
                tf.summary.write("y_mean", tf.reduce_mean(y), step=step)
            return tf.reduce_mean(tf.square(y - target))

        self.fn = loss
        self.writer = tf.summary.create_file_writer(str(self.logdir)) if summaries else None
        if self.writer is not None:
            with self.writer.as_default():  # summaries go where the default writer was
                self.split = gsc.split(loss, SIGNATURE, ["h1"])
        else:
            self.split = gsc.split(loss, SIGNATURE, ["h1"])
        self.args = [tf.constant(normal(rng, (5, 6), F64)), tf.constant(normal(rng, (5, 3), F64))]

    def step(self, route: str, jit_compile: bool = False):
        split, args = self.split, self.args
        if route == "value_and_gradients":
            return split.value_and_gradients(*args, jit_compile=jit_compile)
        if route == "vjp":
            return split.vjp(args, tf.ones([], F64), jit_compile=jit_compile)
        return split.run_stages(args, jit_compile=jit_compile)

    def printed(self) -> list[str]:
        return self.print_path.read_text().splitlines() if self.print_path.exists() else []

    def summary_values(self) -> list[float]:
        self.writer.flush()
        values = []
        for path in sorted(glob.glob(str(self.logdir / "events.out.tfevents.*"))):
            for record in tf.data.TFRecordDataset(path):
                event = event_pb2.Event.FromString(record.numpy())
                values += [float(tf.make_ndarray(v.tensor)) for v in event.summary.value
                           if v.tag == "y_mean"]
        return values


# -- tf.print ----------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ROUTES)
def test_print_runs_exactly_once_per_step(tmp_path, route):
    program = Program(tmp_path)
    program.fn(*program.args)  # what one call of fn prints
    once = program.printed()
    assert [line.split()[0] for line in once] == ["h1", "y"]
    for _ in range(STEPS):
        program.step(route)
    assert program.printed() == once * (STEPS + 1)


def test_print_sits_in_the_forward_of_one_stage_and_in_no_backward(tmp_path):
    program = Program(tmp_path)
    forwards = [_count(s.forward, "PrintV2") for s in program.split.stages]
    backwards = [_count(s.backward, "PrintV2") for s in program.split.stages]
    assert forwards == [1, 1]
    assert backwards == [0, 0]


@pytest.mark.parametrize("route", ROUTES)
def test_print_under_xla_is_refused_naming_the_op_and_changes_nothing(tmp_path, route):
    program = Program(tmp_path)
    before = snapshot([program.steps, program.W1, program.W2])
    with pytest.raises(gsc.GradSplitError, match="XLA cannot compile") as info:
        program.step(route, jit_compile=True)
    assert "StringFormat" in str(info.value) or "PrintV2" in str(info.value)
    assert program.printed() == []
    for b, a in zip(before, snapshot([program.steps, program.W1, program.W2])):
        np.testing.assert_array_equal(a, b)


# -- tf.debugging.assert_* ---------------------------------------------------------------------


@pytest.mark.parametrize("route", ROUTES)
def test_passing_assertion_lets_every_step_run(tmp_path, route):
    program = Program(tmp_path)
    for _ in range(STEPS):
        program.step(route)
    assert float(program.steps.numpy()) == STEPS


@pytest.mark.parametrize("route", ROUTES)
def test_failing_assertion_raises_its_message_once_per_step(tmp_path, route):
    """Each failed step raises once and prints what one failing call of fn prints: the
    stages before the assertion ran once, nothing ran twice, no backward ran."""
    program = Program(tmp_path)
    program.limit.assign(0.01)
    with pytest.raises(tf.errors.InvalidArgumentError):
        program.fn(*program.args)
    per_call = len(program.printed())
    assert per_call >= 1
    for step in range(2):
        with pytest.raises(tf.errors.InvalidArgumentError) as info:
            program.step(route)
        assert str(info.value).count("y out of range") == 1
        assert len(program.printed()) == per_call * (step + 2)


@pytest.mark.parametrize("route", ["value_and_gradients", "vjp"])
def test_failing_assertion_in_one_program_leaves_the_updates_fn_leaves(tmp_path, route):
    program = Program(tmp_path, prints=False)
    program.limit.assign(0.01)
    with pytest.raises(tf.errors.InvalidArgumentError):
        program.fn(*program.args)
    by_fn = float(program.steps.numpy())
    with pytest.raises(tf.errors.InvalidArgumentError):
        program.step(route)
    assert float(program.steps.numpy()) == 2 * by_fn


def test_failing_assertion_in_run_stages_undoes_the_earlier_stages_updates(tmp_path):
    program = Program(tmp_path)
    program.limit.assign(0.01)
    with pytest.raises(tf.errors.InvalidArgumentError):
        program.step("run_stages")
    assert float(program.steps.numpy()) == 0.0


def test_assertion_sits_in_the_forward_of_one_stage_and_in_no_backward(tmp_path):
    program = Program(tmp_path)
    original = _count(program.fn, "Assert", SIGNATURE)
    forwards = [_count(s.forward, "Assert") for s in program.split.stages]
    backwards = [_count(s.backward, "Assert") for s in program.split.stages]
    assert original == 1 and forwards == [0, 1] and backwards == [0, 0]


@pytest.mark.parametrize("route", ROUTES)
def test_failing_assertion_under_xla_is_dropped_as_xla_drops_it_from_fn(tmp_path, route):
    """XLA has no assertions: jit-compiled ``fn`` runs past a failing one, and so do the
    compiled stages (like with like)."""
    program = Program(tmp_path, prints=False)
    program.limit.assign(0.01)
    tf.function(lambda *a: program.fn(*a), jit_compile=True)(*program.args)
    program.step(route, jit_compile=True)
    assert float(program.steps.numpy()) == 2.0


# -- summaries ---------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ROUTES)
def test_summary_is_written_exactly_once_per_step(tmp_path, route):
    program = Program(tmp_path, summaries=True)
    with program.writer.as_default():
        program.fn(*program.args)
    once = program.summary_values()
    assert len(once) == 1
    for _ in range(STEPS):
        program.step(route)
    values = program.summary_values()
    assert len(values) == STEPS + 1
    np.testing.assert_allclose(values, once * (STEPS + 1), rtol=1e-12)


def test_summary_sits_in_the_forward_of_one_stage_and_in_no_backward(tmp_path):
    program = Program(tmp_path, summaries=True)
    assert [_count(s.forward, "WriteSummary") for s in program.split.stages] == [0, 1]
    assert [_count(s.backward, "WriteSummary") for s in program.split.stages] == [0, 0]


def test_summary_under_xla_is_refused_naming_the_op(tmp_path):
    program = Program(tmp_path, summaries=True)
    with pytest.raises(gsc.GradSplitError, match="XLA cannot compile"):
        program.step("value_and_gradients", jit_compile=True)
    assert program.summary_values() == []


# -- all together ------------------------------------------------------------------------------


def test_every_side_effect_of_a_step_happens_once_and_updates_match_fn(tmp_path):
    program = Program(tmp_path, summaries=True)
    with program.writer.as_default():
        program.fn(*program.args)
    for route in ROUTES:
        program.step(route)
    assert float(program.steps.numpy()) == 1 + len(ROUTES)
    assert len(program.printed()) == 2 * (1 + len(ROUTES))
    assert len(program.summary_values()) == 1 + len(ROUTES)


def _count(fn, op_type: str, signature=None) -> int:
    """Ops of ``op_type`` that ``fn`` runs: in its graph and in the functions its ops call
    (an assertion's ``If`` branches), not the rest of the library it carries."""
    gd = fn.get_concrete_function(*(signature or [])).graph.as_graph_def()
    library = {f.signature.name: f for f in gd.library.function}
    found, pending, seen = 0, [list(gd.node)], set()
    while pending:
        for node in pending.pop():
            found += node.op == op_type
            called = [v.func.name for v in node.attr.values() if v.HasField("func")]
            called += [f.name for v in node.attr.values() for f in v.list.func]
            for name in called:
                if name in library and name not in seen:
                    seen.add(name)
                    pending.append(list(library[name].node_def))
    return found
