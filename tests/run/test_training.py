"""Training state that lives on the stages: ``gsc.pipeline(..., optimizer=...)``.

The oracle is the tape: the same Keras optimizer applied to ``tf.GradientTape`` gradients of
the original loss function on the whole batch, step after step, on the user's own variables
(which the pipeline never touches until ``write_back``). Float64, random data and weights,
weights moving every step; 4 stages on 4 logical CPUs (tests/conftest.py), with a variable
tied between the first and the last stage.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from models import value_rel_error
from tied_model import BATCH, OPTIMIZERS, WIDTH, TiedModel, tape_training

import gradsplit_compiler as gsc
from gradsplit_compiler.errors import GradSplitError

DEVICES = ["/CPU:0", "/CPU:1", "/CPU:2", "/CPU:3"]
STEPS = 20


@pytest.fixture(scope="module", autouse=True)
def four_devices():
    found = len(tf.config.list_logical_devices("CPU"))
    assert found >= 4, (
        f"tests/conftest.py must configure 4 logical CPUs before TensorFlow starts; found "
        f"{found}")


def _batches(n: int, seed: int = 1, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(BATCH, WIDTH)).astype(dtype),
             rng.normal(size=(BATCH, WIDTH)).astype(dtype)) for _ in range(n)]


def _resident(pipe, split) -> dict[str, np.ndarray]:
    """Each variable's stage-resident value (from the first stage reading it)."""
    values = {}
    for k, stage in enumerate(split.stages):
        for idx, copy in zip(stage.variable_indices, pipe.stage_variables(k)):
            values.setdefault(split.variables[idx].name, copy.numpy())
    return values


def _max_rel(a, b) -> float:
    return value_rel_error(a, b)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_train_steps_equal_the_optimizer_on_tape_gradients(name, schedule):
    model = TiedModel(seed=3)
    split = model.split()
    batches = _batches(STEPS)
    pipe = gsc.pipeline(split, 4, schedule, DEVICES, loss_reduction="mean",
                        optimizer=OPTIMIZERS[name]())
    start = [v.numpy() for v in model.variables]
    losses = [float(pipe.train_step(x, y)) for x, y in batches]
    # training never touched the user's variables
    for v, before in zip(model.variables, start):
        np.testing.assert_array_equal(v.numpy(), before)
    expected = tape_training(model, OPTIMIZERS[name](), batches)
    np.testing.assert_allclose(losses, expected, rtol=1e-10)
    resident = _resident(pipe, split)
    moved = 0.0
    for v, before in zip(model.variables, start):
        assert _max_rel(resident[v.name], v.numpy()) < 1e-10, v.name
        moved = max(moved, _max_rel(resident[v.name], before))
    assert moved > 1e-2  # the weights did move
    np.testing.assert_array_equal(resident["scale:0"], start[-1])  # non-trainable: unchanged
    assert pipe.iterations == STEPS


def test_tied_copies_stay_bitwise_equal_and_only_their_gradients_travel():
    model = TiedModel(seed=4)
    split = model.split()
    pipe = gsc.pipeline(split, 4, "1f1b", DEVICES, loss_reduction="mean",
                        optimizer=keras.optimizers.Adam(0.01))
    for x, y in _batches(5, seed=2):
        pipe.train_step(x, y)
    embed = split.variables.index(model.embed)
    first = pipe.stage_variables(0)[split.stages[0].variable_indices.index(embed)]
    last = pipe.stage_variables(3)[split.stages[3].variable_indices.index(embed)]
    assert first.device.endswith("CPU:0") and last.device.endswith("CPU:3")
    np.testing.assert_array_equal(first.numpy(), last.numpy())
    moved = pipe.bytes_moved()
    assert moved["replicas"] == 0
    # the tied variable's gradient, each way between the two devices holding it
    assert moved["gradients"] == 2 * WIDTH * WIDTH * 8
    assert moved["results"] == 4 * 8  # the four micro-batch losses, nothing else
    # what crosses between stages is what the split predicts, one direction each way
    predicted = sum(row["boundary_bytes"] for row in split.summary(batch_size=BATCH)[1:])
    assert moved["activations"] == predicted
    assert moved["cotangents"] == predicted
    assert 0 < moved["scalars"] <= 4 * (8 + 1 + 16)  # per device: norm, flag; scale, clip


def test_memory_report_shows_each_device_holds_its_stages_share():
    model = TiedModel(seed=5)
    split = model.split()
    pipe = gsc.pipeline(split, 2, "gpipe", DEVICES, loss_reduction="mean",
                        optimizer=keras.optimizers.Adam(0.01))
    memory = pipe.memory()
    assert len(memory) == 4
    for stage, device in zip(split.stages, pipe.devices):
        held = [split.variables[i] for i in stage.variable_indices]
        nbytes = sum(int(np.prod(v.shape)) * 8 for v in held)
        trainable = sum(int(np.prod(v.shape)) * 8 for v in held if v.trainable)
        assert memory[device] == {"variables": nbytes, "slots": 2 * trainable}  # m and v


def test_global_norm_clipping_over_all_stages():
    model = TiedModel(seed=6)
    split = model.split()
    batches = _batches(STEPS, seed=7)
    # a clip well below the gradient norm, so that every step is clipped
    with tf.GradientTape() as tape:
        loss = model.loss(*map(tf.constant, batches[0]))
    norm = float(tf.linalg.global_norm(tape.gradient(loss, split.trainable_variables)))
    clip = norm / 3
    pipe = gsc.pipeline(split, 4, "1f1b", DEVICES, loss_reduction="mean",
                        optimizer=keras.optimizers.SGD(0.1, momentum=0.5),
                        clip_global_norm=clip)
    losses = [float(pipe.train_step(x, y)) for x, y in batches]
    expected = tape_training(model, keras.optimizers.SGD(0.1, momentum=0.5), batches,
                              clip=clip)
    np.testing.assert_allclose(losses, expected, rtol=1e-10)
    resident = _resident(pipe, split)
    for v in model.variables:
        assert _max_rel(resident[v.name], v.numpy()) < 1e-10, v.name


def test_the_optimizers_own_global_clipnorm_is_taken_over_all_stages():
    model = TiedModel(seed=8)
    split = model.split()
    batches = _batches(6, seed=9)
    pipe = gsc.pipeline(split, 2, "gpipe", DEVICES, loss_reduction="mean",
                        optimizer=keras.optimizers.SGD(0.2, global_clipnorm=0.05))
    losses = [float(pipe.train_step(x, y)) for x, y in batches]
    expected = tape_training(model, keras.optimizers.SGD(0.2), batches, clip=0.05)
    np.testing.assert_allclose(losses, expected, rtol=1e-10)


def test_save_and_restore_into_other_cuts_and_devices_resumes_exactly(tmp_path):
    model = TiedModel(seed=10)
    batches = _batches(10, seed=11)
    make = lambda: keras.optimizers.Adam(0.01)  # noqa: E731
    whole = gsc.pipeline(model.split(), 4, "1f1b", DEVICES, loss_reduction="mean",
                         optimizer=make())
    for x, y in batches:
        whole.train_step(x, y)

    first = gsc.pipeline(model.split(), 4, "1f1b", DEVICES, loss_reduction="mean",
                         optimizer=make())
    for x, y in batches[:5]:
        first.train_step(x, y)
    path = first.save(tmp_path / "ckpt")
    other = model.split(cuts=("c2",))  # two stages, cut elsewhere, on other devices
    second = gsc.pipeline(other, 2, "gpipe", ["/CPU:3", "/CPU:1"], loss_reduction="mean",
                          optimizer=make())
    second.restore(path)
    assert second.iterations == 5
    for x, y in batches[5:]:
        second.train_step(x, y)
    assert second.iterations == 10
    want, got = _resident(whole, whole.split), _resident(second, other)
    for name, value in want.items():
        assert _max_rel(got[name], value) < 1e-12, name

    # the plain model reads the variables from the checkpoint
    plain = TiedModel(seed=99)
    gsc.load_variables(path, plain.variables)
    resident = _resident(first, first.split)
    for v in plain.variables:
        np.testing.assert_array_equal(v.numpy(), resident[v.name])


def test_write_back_copies_the_trained_values_into_the_users_variables():
    model = TiedModel(seed=12)
    split = model.split()
    pipe = gsc.pipeline(split, 2, "1f1b", DEVICES, loss_reduction="mean",
                        optimizer=keras.optimizers.SGD(0.1))
    for x, y in _batches(3, seed=13):
        pipe.train_step(x, y)
    resident = _resident(pipe, split)
    assert _max_rel(model.w[0].numpy(), resident["layer0/kernel:0"]) > 1e-3
    pipe.write_back()
    for v in model.variables:
        np.testing.assert_array_equal(v.numpy(), resident[v.name])


def test_a_checkpoint_of_another_program_is_refused_and_nothing_changes(tmp_path):
    model = TiedModel(seed=14)
    pipe = gsc.pipeline(model.split(), 2, "1f1b", DEVICES, loss_reduction="mean",
                        optimizer=keras.optimizers.Adam(0.01))
    v = tf.Variable(np.ones((3, 3)), name="someone_else")

    def other(x):
        h = gsc.mark(tf.tanh(x @ v), "h")
        return tf.reduce_mean(h @ v)

    foreign = gsc.split(other, [tf.TensorSpec([None, 3], tf.float64)], cuts=["h"])
    foreign_pipe = gsc.pipeline(foreign, 2, "1f1b", DEVICES[:2], loss_reduction="mean",
                                optimizer=keras.optimizers.Adam(0.01))
    path = foreign_pipe.save(tmp_path / "foreign")
    before = _resident(pipe, pipe.split)
    with pytest.raises(GradSplitError, match="is not of this program's training state") as e:
        pipe.restore(path)
    assert "'embed'" in str(e.value) and "'someone_else'" in str(e.value)
    assert "holds variables this program does not read" in str(e.value)
    after = _resident(pipe, pipe.split)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name])
    with pytest.raises(GradSplitError, match="cannot read a checkpoint at"):
        pipe.restore(tmp_path / "nothing-here")
    with pytest.raises(GradSplitError, match="has no value for"):
        gsc.load_variables(path, model.variables)


def test_a_nonfinite_gradient_changes_nothing_and_names_the_variable():
    model = TiedModel(seed=15)
    split = model.split()
    pipe = gsc.pipeline(split, 4, "1f1b", DEVICES, loss_reduction="mean",
                        optimizer=keras.optimizers.Adam(0.01))
    (x, y), = _batches(1, seed=16)
    pipe.train_step(x, y)
    before = _resident(pipe, split)
    bad = y.copy()
    bad[3, 2] = np.inf
    with pytest.raises(GradSplitError, match="is not finite") as e:
        pipe.train_step(x, bad)
    assert "no variable was changed" in str(e.value) and "read by stage" in str(e.value)
    after = _resident(pipe, split)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name])
    assert pipe.iterations == 1

    skipping = gsc.pipeline(split, 4, "1f1b", DEVICES, loss_reduction="mean",
                            optimizer=keras.optimizers.Adam(0.01), on_nonfinite="skip")
    start = _resident(skipping, split)
    skipping.train_step(x, bad)
    assert skipping.skipped_steps == 1 and skipping.iterations == 0
    for name, value in _resident(skipping, split).items():
        np.testing.assert_array_equal(value, start[name])
    skipping.train_step(x, y)
    assert skipping.skipped_steps == 1 and skipping.iterations == 1


class CountingModel:
    """A stage that assigns a non-trainable variable (a running mean, as batch norm keeps)."""

    def __init__(self):
        rng = np.random.default_rng(17)
        self.w0 = tf.Variable(rng.normal(size=(WIDTH, WIDTH)) * 0.4, name="w0")
        self.w1 = tf.Variable(rng.normal(size=(WIDTH, 1)) * 0.4, name="w1")
        self.mean = tf.Variable(np.zeros(WIDTH), trainable=False, name="running_mean")

    def loss(self, x):
        h = tf.tanh(x @ self.w0)
        self.mean.assign(0.9 * self.mean + 0.1 * tf.reduce_mean(h, axis=0))
        h = gsc.mark(h - self.mean, "h")
        return tf.reduce_mean(tf.tanh(h @ self.w1) ** 2)


@pytest.mark.parametrize("devices", [DEVICES[:2], ["/CPU:1"] * 2],
                         ids=["two-devices", "one-device-one-program"])
def test_variables_the_program_assigns_live_on_their_stage(devices):
    model = CountingModel()
    split = gsc.split(model.loss, [tf.TensorSpec([None, WIDTH], tf.float64)], cuts=["h"])
    assert [v.name for v in split.trainable_variables] == ["w0:0", "w1:0"]
    pipe = gsc.pipeline(split, 1, "1f1b", devices, loss_reduction="mean",
                        optimizer=keras.optimizers.SGD(0.1))
    xs = [x for x, _ in _batches(4, seed=18)]
    for x in xs:
        pipe.train_step(x)
    assert model.mean.numpy().max() == 0.0  # the user's variable is not touched
    resident = _resident(pipe, split)
    # a step with a non-finite gradient puts back the running mean it had assigned (NaN)
    with pytest.raises(GradSplitError, match="is not finite"):
        pipe.train_step(np.full_like(xs[0], np.nan))
    for name, value in _resident(pipe, split).items():
        np.testing.assert_array_equal(value, resident[name])
    assert pipe.iterations == 4
    optimizer = keras.optimizers.SGD(0.1)
    for x in xs:
        with tf.GradientTape() as tape:
            loss = model.loss(tf.constant(x))
        grads = tape.gradient(loss, [model.w0, model.w1])
        optimizer.apply(grads, [model.w0, model.w1])
    for v in (model.w0, model.w1, model.mean):
        assert _max_rel(resident[v.name], v.numpy()) < 1e-12, v.name


def test_a_mean_loss_that_sums_is_refused_on_the_first_step():
    model = TiedModel(seed=19)

    def summed(x, y):
        return model.loss(x, y) * tf.cast(tf.shape(x)[0], tf.float64)

    spec = tf.TensorSpec([None, WIDTH], tf.float64)
    split = gsc.split(summed, [spec, spec], cuts=["c2"])
    (x, y), = _batches(1, seed=20)
    pipe = gsc.pipeline(split, 4, "1f1b", DEVICES[:2], loss_reduction="mean",
                        optimizer=keras.optimizers.SGD(0.1))
    before = _resident(pipe, split)
    with pytest.raises(GradSplitError, match="is the sum of its values on the 4 "
                                             "micro-batches") as e:
        pipe.train_step(x, y)
    assert "Pass loss_reduction='sum'" in str(e.value) and "4x too small" in str(e.value)
    assert "over the batch. Pass loss_reduction=" in str(e.value)
    for name, value in _resident(pipe, split).items():
        np.testing.assert_array_equal(value, before[name])
    assert pipe.iterations == 0
    # the same for step(), and a declared sum that is a mean
    with pytest.raises(GradSplitError, match="not their mean: fn sums over the batch"):
        gsc.pipeline(split, 2, "gpipe", loss_reduction="mean").step(x, y)
    mean_split = model.split(cuts=("c2",))
    with pytest.raises(GradSplitError, match="4x too large"):
        gsc.pipeline(mean_split, 4, "gpipe", loss_reduction="sum").step(x, y)
    ok = gsc.pipeline(split, 4, "gpipe", loss_reduction="sum")
    value, _ = ok.step(x, y)
    assert math.isclose(float(value), float(summed(x, y)), rel_tol=1e-12)


def test_step_on_a_training_pipeline_reads_the_resident_copies():
    model = TiedModel(seed=21)
    split = model.split()
    pipe = gsc.pipeline(split, 2, "1f1b", DEVICES, loss_reduction="mean",
                        optimizer=keras.optimizers.SGD(0.1))
    batches = _batches(2, seed=22)
    pipe.train_step(*batches[0])
    value, grads = pipe.step(*batches[1])
    pipe.write_back()
    with tf.GradientTape() as tape:
        tape.watch(split.variables)  # the non-trainable one too: step() gives every gradient
        loss = model.loss(*map(tf.constant, batches[1]))
    expected = tape.gradient(loss, split.variables)
    assert math.isclose(float(value), float(loss), rel_tol=1e-12)
    for g, e in zip(grads, expected):
        assert _max_rel(g, e) < 1e-12


# -- bad input ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_split():
    return TiedModel(seed=23).split(cuts=("c2",))


def test_an_optimizer_that_is_not_keras_is_refused(small_split):
    with pytest.raises(GradSplitError, match="optimizer must be a Keras optimizer"):
        gsc.pipeline(small_split, 2, loss_reduction="mean",
                     optimizer=tf.compat.v1.train.AdamOptimizer(0.01))


def test_an_optimizer_already_bound_to_variables_is_refused(small_split):
    used = keras.optimizers.Adam(0.01)
    used.build([tf.Variable(np.ones(3))])
    with pytest.raises(GradSplitError, match="give the pipeline a fresh optimizer"):
        gsc.pipeline(small_split, 2, loss_reduction="mean", optimizer=used)


@pytest.mark.parametrize("clip", [0, -1.0, float("nan"), float("inf"), True, "1"])
def test_a_clip_norm_that_is_not_positive_is_refused(small_split, clip):
    with pytest.raises(GradSplitError, match="clip_global_norm must be a positive finite"):
        gsc.pipeline(small_split, 2, loss_reduction="mean",
                     optimizer=keras.optimizers.SGD(0.1), clip_global_norm=clip)


def test_two_different_clip_norms_are_refused(small_split):
    with pytest.raises(GradSplitError, match="give one of them"):
        gsc.pipeline(small_split, 2, loss_reduction="mean", clip_global_norm=1.0,
                     optimizer=keras.optimizers.SGD(0.1, global_clipnorm=2.0))


def test_clipping_without_an_optimizer_is_refused(small_split):
    with pytest.raises(GradSplitError, match="act on the optimizer's step; they need"):
        gsc.pipeline(small_split, 2, loss_reduction="mean", clip_global_norm=1.0)


def test_an_unknown_nonfinite_action_is_refused(small_split):
    with pytest.raises(GradSplitError, match=r"on_nonfinite must be 'raise'.*'skip'.* or "
                                             r"'apply' \(no check: the update runs whatever "
                                             r"the gradients, as plain Keras fit does\)") as e:
        gsc.pipeline(small_split, 2, loss_reduction="mean",
                     optimizer=keras.optimizers.SGD(0.1), on_nonfinite="ignore")
    assert "on_nonfinite must be 'raise' (a step with a NaN or infinite gradient" in str(e.value)


@pytest.mark.parametrize("devices", [DEVICES[:2], ["/CPU:1"] * 2],
                         ids=["two-devices", "one-device-one-program"])
def test_on_nonfinite_apply_updates_whatever_the_gradients_as_plain_keras(small_split,
                                                                          devices):
    """No check: a finite step equals the checked one, and a NaN reaches the variables
    (as in plain Keras fit) instead of being refused."""
    (x, y), = _batches(1, seed=41)
    pipes = [gsc.pipeline(small_split, 2, "1f1b", devices, loss_reduction="mean",
                          optimizer=keras.optimizers.SGD(0.1), on_nonfinite=action)
             for action in ("raise", "apply")]
    for pipe in pipes:
        pipe.train_step(x, y)
    for k in range(2):
        for a, b in zip(pipes[0].stage_variables(k), pipes[1].stage_variables(k)):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    bad = y.copy()
    bad[3, 2] = np.nan
    pipes[1].train_step(x, bad)
    assert pipes[1].iterations == 2 and pipes[1].skipped_steps == 0
    assert not all(np.isfinite(v.numpy()).all() for v in pipes[1].stage_variables(1))


def test_training_calls_without_an_optimizer_are_refused(small_split):
    pipe = gsc.pipeline(small_split, 2, loss_reduction="mean")
    (x, y), = _batches(1)
    with pytest.raises(GradSplitError, match="train_step needs a pipeline built with"):
        pipe.train_step(x, y)
    for call in (pipe.write_back, lambda: pipe.save("/tmp/x"), lambda: pipe.iterations):
        with pytest.raises(GradSplitError, match="does it hold training state of its own"):
            call()


def test_train_step_arguments_are_checked_and_nothing_changes(small_split):
    pipe = gsc.pipeline(small_split, 4, "1f1b", DEVICES[:2], loss_reduction="mean",
                        optimizer=keras.optimizers.SGD(0.1))
    before = _resident(pipe, small_split)
    (x, y), = _batches(1)
    with pytest.raises(GradSplitError):
        pipe.train_step(x)  # one argument of two
    with pytest.raises(GradSplitError, match="does not cut into 4 equal micro-batches"):
        pipe.train_step(x[:6], y[:6])
    for name, value in _resident(pipe, small_split).items():
        np.testing.assert_array_equal(value, before[name])
    assert pipe.iterations == 0


def test_a_variable_assigned_and_read_on_two_devices_is_refused():
    counter = tf.Variable(np.zeros(WIDTH), trainable=False, name="shared_counter")
    w = tf.Variable(np.ones((WIDTH, WIDTH)) * 0.1, name="w")

    def loss(x):
        counter.assign_add(tf.reduce_mean(x, axis=0))
        h = gsc.mark(tf.tanh(x @ w + counter), "h")
        return tf.reduce_mean(tf.tanh(h @ w + counter) ** 2)

    split = gsc.split(loss, [tf.TensorSpec([None, WIDTH], tf.float64)], cuts=["h"])
    with pytest.raises(GradSplitError, match="the assignment would reach only one"):
        gsc.pipeline(split, 2, "1f1b", DEVICES[:2], loss_reduction="mean",
                     optimizer=keras.optimizers.SGD(0.1))


class _Halving(keras.optimizers.schedules.LearningRateSchedule):
    """A learning-rate schedule Keras does not know (not registered)."""

    def __call__(self, step):
        return 0.1 / (1.0 + tf.cast(step, tf.float32))

    def get_config(self):
        return {}


def test_an_optimizer_keras_cannot_rebuild_is_refused(small_split):
    with pytest.raises(GradSplitError, match="Keras cannot rebuild it") as e:
        gsc.pipeline(small_split, 2, loss_reduction="mean",
                     optimizer=keras.optimizers.SGD(_Halving()))
    assert "register_keras_serializable" in str(e.value)


def test_train_step_inside_a_tf_function_is_refused(small_split):
    pipe = gsc.pipeline(small_split, 2, loss_reduction="mean",
                        optimizer=keras.optimizers.SGD(0.1))
    (x, y), = _batches(1)
    traced = tf.function(lambda a, b: pipe.train_step(a, b), autograph=False)
    with pytest.raises(GradSplitError, match="was called inside a tf.function \\(or graph "
                                             "mode\\)") as e:
        traced(x, y)
    assert "Call train_step() from plain Python" in str(e.value)
    assert pipe.iterations == 0


def test_outputs_after_the_loss_come_back_concatenated_over_microbatches():
    model = TiedModel(seed=24)

    def loss_and_prediction(x, y):
        return model.loss(x, y), tf.tanh(x @ model.embed)

    spec = tf.TensorSpec([None, WIDTH], tf.float64)
    split = gsc.split(loss_and_prediction, [spec, spec], cuts=["c2"])
    (x, y), = _batches(1, seed=25)
    pipe = gsc.pipeline(split, 4, "1f1b", DEVICES[:2], loss_reduction="mean",
                        optimizer=keras.optimizers.SGD(0.1))
    loss, prediction = pipe.train_step(x, y)
    assert math.isclose(float(loss), float(model.loss(x, y)), rel_tol=1e-12)
    np.testing.assert_allclose(prediction, np.tanh(x @ model.embed.numpy()), rtol=1e-12)
    twin = pipe.with_microbatches(2)  # shares the training state
    twin.train_step(x, y)
    assert pipe.iterations == 2


def test_an_output_after_the_loss_without_a_batch_dimension_is_refused():
    model = TiedModel(seed=26)

    def loss_and_scalar(x, y):
        loss = model.loss(x, y)
        return loss, loss * 2.0

    spec = tf.TensorSpec([None, WIDTH], tf.float64)
    split = gsc.split(loss_and_scalar, [spec, spec], cuts=["c2"])
    with pytest.raises(GradSplitError, match="fn returns more than the loss, and the pipeline"):
        gsc.pipeline(split, 2, loss_reduction="mean")


def test_with_microbatches_needs_a_builtin_schedule(small_split):
    from gradsplit_compiler.run.schedules import one_f_one_b_schedule

    schedule = one_f_one_b_schedule(len(small_split.stages), 2)
    pipe = gsc.pipeline(small_split, 2, schedule, loss_reduction="mean")
    with pytest.raises(GradSplitError, match="with_microbatches needs a built-in schedule"):
        pipe.with_microbatches(1)


def _loss_scaled(optimizer_kwargs):
    return keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(0.01),
                                               **optimizer_kwargs)


@pytest.mark.parametrize("devices", [DEVICES, None], ids=["four-devices", "one-device"])
def test_loss_scaling_seeds_the_backward_skips_nonfinite_steps_and_moves_the_scale(
        tmp_path, devices):
    """As Keras' train_step with a LossScaleOptimizer: the backward of the scaled loss, a
    step with a non-finite gradient skipped on every stage (scale halved), the scale doubled
    after ``dynamic_growth_steps`` finite steps; the scale and its counter in checkpoints."""
    model = TiedModel(seed=21)
    split = model.split()
    batches = _batches(9, seed=22)
    for i in (2, 6):  # an example that makes every gradient NaN
        batches[i] = (np.where(np.arange(BATCH)[:, None] == 3, np.inf, batches[i][0]),
                      batches[i][1])
    kwargs = {"initial_scale": 2.0**10, "dynamic_growth_steps": 2}
    pipe = gsc.pipeline(split, 4, "1f1b", devices, loss_reduction="mean",
                        optimizer=_loss_scaled(kwargs))

    reference = _loss_scaled(kwargs)
    trainable = [v for v in model.variables if v.trainable]
    scales, want_scales = [], []
    for x, y in batches:
        loss = pipe.train_step(x, y)
        scales.append(pipe.training_state.loss_scale.value)
        with tf.GradientTape() as tape:
            want = model.loss(tf.constant(x), tf.constant(y))
            scaled = reference.scale_loss(want)
        reference.apply(tape.gradient(scaled, trainable), trainable)
        want_scales.append(float(reference.dynamic_scale))
        if np.isfinite(float(want)):
            assert abs(float(loss) - float(want)) <= 1e-10 * abs(float(want))
    # 2**10 -> 2**11 (2 finite) -> 2**10 (inf) -> ... ; batch 6 overflows only when scaled
    assert scales == want_scales and scales[:3] == [2.0**10, 2.0**11, 2.0**10], scales
    assert pipe.skipped_steps == 2 and pipe.iterations == int(reference.iterations) == 7
    resident = _resident(pipe, split)
    for v in model.variables:
        assert _max_rel(resident[v.name], v.numpy()) < 1e-10, v.name

    path = pipe.save(tmp_path / "scaled")
    again = gsc.pipeline(split, 2, "gpipe", DEVICES, loss_reduction="mean",
                         optimizer=_loss_scaled(kwargs))
    again.restore(path)
    state = again.training_state.loss_scale
    assert state.value == scales[-1]
    assert int(state.counter.numpy()) == int(reference.step_counter.numpy())


def test_a_static_loss_scale_factor_seeds_the_backward_and_is_divided_out():
    model = TiedModel(seed=23)
    split = model.split()
    batches = _batches(4, seed=24)
    pipe = gsc.pipeline(split, 2, "gpipe", DEVICES, loss_reduction="mean",
                        optimizer=keras.optimizers.SGD(0.1, loss_scale_factor=1024.0,
                                                       global_clipnorm=0.5))
    for x, y in batches:
        pipe.train_step(x, y)
    # Keras: gradients of loss * 1024, divided by 1024, clipped by their unscaled norm
    tape_training(model, keras.optimizers.SGD(0.1), batches, clip=0.5)
    resident = _resident(pipe, split)
    for v in model.variables:
        assert _max_rel(resident[v.name], v.numpy()) < 1e-10, v.name


def test_forward_runs_forwards_alone_and_gives_the_functions_value():
    """``forward``: the value of fn over the whole batch (mean over micro-batches), no
    backward and no residual kept; on a training pipeline it reads the trained copies."""
    model = TiedModel(seed=25)
    split = model.split()
    pipe = gsc.pipeline(split, 4, "1f1b", DEVICES, loss_reduction="mean",
                        optimizer=keras.optimizers.SGD(0.1))
    x, y = _batches(1, seed=26)[0]
    value = pipe.forward(x, y)
    want = float(model.loss(tf.constant(x), tf.constant(y)))
    assert abs(float(value) - want) <= 1e-12 * abs(want)
    assert {e.kind for e in pipe.timeline()} == {"F"} and len(pipe.timeline()) == 16
    assert pipe.peak_live_residuals == [0, 0, 0, 0]
    for batch in _batches(3, seed=27):
        pipe.train_step(*batch)
    trained = float(pipe.forward(x, y))
    pipe.write_back()  # the user's variables now hold the trained values
    want = float(model.loss(tf.constant(x), tf.constant(y)))
    assert abs(trained - want) <= 1e-12 * abs(want) and abs(trained - float(value)) > 1e-3


def test_a_pipeline_of_another_program_reads_the_training_pipelines_copies():
    """Another program of the same variables (the loss and a batched output), cut alike,
    forwarded with ``shares_state_with``: it sees the trained values, and the user's
    variables stay as they were."""
    model = TiedModel(seed=28)
    split = model.split()
    start = [v.numpy() for v in model.variables]
    pipe = gsc.pipeline(split, 2, "gpipe", DEVICES, loss_reduction="mean",
                        optimizer=keras.optimizers.Adam(0.05))
    for batch in _batches(4, seed=29):
        pipe.train_step(*batch)

    def errors(x, y):  # another program of the same variables, with a batched output
        loss = model.loss(x, y)
        return loss, tf.tanh(x @ model.embed) * 2.0

    spec = tf.TensorSpec([None, WIDTH], tf.float64)
    evaluation = gsc.split(errors, [spec, spec], cuts=["c1", "c2", "c3"])
    forward = gsc.pipeline(evaluation, 2, "gpipe", loss_reduction="mean",
                           shares_state_with=pipe)
    assert forward.devices == pipe.devices
    x, y = _batches(1, seed=30)[0]
    value, projected = forward.forward(x, y)
    for v, before in zip(model.variables, start):  # nothing written back
        np.testing.assert_array_equal(v.numpy(), before)
    pipe.write_back()
    want, want_projected = errors(tf.constant(x), tf.constant(y))
    assert abs(float(value) - float(want)) <= 1e-12 * abs(float(want))
    np.testing.assert_allclose(projected.numpy(), want_projected.numpy(), rtol=1e-12)


def test_sharing_state_needs_a_training_pipeline_cut_alike(small_split):
    plain = gsc.pipeline(small_split, 1, "gpipe", loss_reduction="mean")
    with pytest.raises(GradSplitError, match="shares_state_with takes a training pipeline"):
        gsc.pipeline(small_split, 1, "gpipe", loss_reduction="mean", shares_state_with=plain)
    model = TiedModel(seed=31)
    trained = gsc.pipeline(model.split(), 1, "gpipe", DEVICES, loss_reduction="mean",
                           optimizer=keras.optimizers.SGD(0.1))
    with pytest.raises(GradSplitError, match="give optimizer= or shares_state_with=, not"):
        gsc.pipeline(model.split(), 1, "gpipe", loss_reduction="mean",
                     optimizer=keras.optimizers.SGD(0.1), shares_state_with=trained)
    # cut elsewhere: its stage 0 reads layer1's kernel, which the training pipeline holds
    # on the second device only
    with pytest.raises(GradSplitError, match="Cut this program where the training program"):
        gsc.pipeline(model.split(cuts=("c2",)), 1, "gpipe", loss_reduction="mean",
                     shares_state_with=trained)


@pytest.mark.parametrize("one_program", [None, False], ids=["whole-step", "update"])
def test_one_device_checks_clips_and_updates_in_one_program(one_program):
    """Every stage on one device: by default the whole step (two micro-batches' forwards and
    backwards, the finiteness check, the clipping and the update) runs as one program;
    with one_program=False each action is a program, and the check, the clipping and the
    update one more (no round trip in between). The same results as the tape either way,
    and a non-finite gradient refused with nothing changed."""
    model = TiedModel(seed=33)
    split = model.split()
    batches = _batches(6, seed=34)
    with tf.GradientTape() as tape:
        loss = model.loss(*map(tf.constant, batches[0]))
    clip = float(tf.linalg.global_norm(tape.gradient(loss, split.trainable_variables))) / 3
    pipe = gsc.pipeline(split, 2, "gpipe", ["/CPU:1"] * 4, loss_reduction="mean",
                        optimizer=keras.optimizers.Adam(0.02), clip_global_norm=clip,
                        one_program=one_program)
    losses = [float(pipe.train_step(x, y)) for x, y in batches]
    (state,) = pipe.training_state.states
    if one_program is None:
        assert [e.kind for e in pipe.timeline()] == ["S"] and not state.functions
    else:
        assert set(state.functions) == {"fused"}
        assert {e.kind for e in pipe.timeline()} == {"F", "B"}
    expected = tape_training(model, keras.optimizers.Adam(0.02), batches, clip=clip)
    np.testing.assert_allclose(losses, expected, rtol=1e-10)
    resident = _resident(pipe, split)
    for v in model.variables:
        assert _max_rel(resident[v.name], v.numpy()) < 1e-10, v.name

    x, y = batches[0]
    x = np.where(np.arange(BATCH)[:, None] == 1, np.nan, x)
    with pytest.raises(GradSplitError, match="is not finite"):
        pipe.train_step(x, y)
    after = _resident(pipe, split)
    for name, value in resident.items():
        np.testing.assert_array_equal(after[name], value)
    assert pipe.iterations == 6
