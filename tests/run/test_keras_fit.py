"""``gradsplit_compiler.keras.PipelineModel``: Keras' ``fit`` through the pipeline.

The oracle is Keras itself: the same model (same initial weights, random and non-default,
biases included), compiled with the same optimizer, loss and metrics, trained by plain
``model.fit`` on the same batches in the same order. Float64; 4 logical CPUs
(tests/conftest.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from gradsplit_compiler.errors import GradSplitError
from gradsplit_compiler.keras import PipelineModel
from gradsplit_compiler.zoo import keras_floatx

DEVICES = ["/CPU:0", "/CPU:1", "/CPU:2", "/CPU:3"]
TOL = 1e-10


@pytest.fixture(autouse=True)
def float64():
    assert len(tf.config.list_logical_devices("CPU")) >= 4, "tests/conftest.py sets up 4 CPUs"
    with keras_floatx("float64"):
        yield


def mlp():
    inputs = keras.Input((6,))
    h = keras.layers.Dense(16, activation="tanh", name="d1")(inputs)
    h = keras.layers.Dense(16, activation="tanh", name="d2")(h)
    h = keras.layers.Dense(16, activation="tanh", name="d3")(h)
    return keras.Model(inputs, keras.layers.Dense(3, name="out")(h), name="mlp")


def cnn_with_skip():
    """The first convolution's output skips over the cut at ``conv2`` to ``add``."""
    inputs = keras.Input((6, 6, 2))
    a = keras.layers.Conv2D(4, 3, padding="same", activation="tanh", name="conv1")(inputs)
    b = keras.layers.Conv2D(4, 3, padding="same", activation="tanh", name="conv2")(a)
    c = keras.layers.Conv2D(4, 3, padding="same", name="conv3")(b)
    h = keras.layers.Add(name="add")([a, c])
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(h), name="cnn")


def small_transformer():
    inputs = keras.Input((5, 8))
    attended = keras.layers.MultiHeadAttention(2, 4, name="attention")(inputs, inputs)
    h = keras.layers.LayerNormalization(name="norm1")(keras.layers.Add()([inputs, attended]))
    f = keras.layers.Dense(16, activation="relu", name="ffn1")(h)
    f = keras.layers.Dense(8, name="ffn2")(f)
    h = keras.layers.LayerNormalization(name="norm2")(keras.layers.Add()([h, f]))
    h = keras.layers.GlobalAveragePooling1D(name="pool")(h)
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(h), name="transformer")


def twins(build, seed=0):
    """Two copies of one model with the same random weights (none left at Keras' zeros)."""
    a, b = build(), build()
    rng = np.random.default_rng(seed)
    weights = [rng.normal(size=w.shape) * 0.4 for w in a.get_weights()]
    a.set_weights(weights)
    b.set_weights(weights)
    return a, b


def data(n, x_shape, y_shape, seed=1):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, *x_shape)), rng.normal(size=(n, *y_shape))


def assert_same_training(plain, history_plain, piped, history_piped):
    assert history_plain.history.keys() == history_piped.history.keys()
    for key, values in history_plain.history.items():
        np.testing.assert_allclose(history_piped.history[key], values, rtol=TOL, err_msg=key)
    for w, (a, b) in zip(plain.weights, zip(plain.get_weights(), piped.get_weights())):
        scale = max(np.max(np.abs(a)), 1e-300)
        assert np.max(np.abs(a - b)) / scale < TOL, w.path


CASES = {
    "mlp": (mlp, ["d1", "d2", "d3"], (6,), (3,), 4, lambda: keras.optimizers.Adam(0.01)),
    "cnn_skip": (cnn_with_skip, ["conv2"], (6, 6, 2), (3,), 2,
                 lambda: keras.optimizers.SGD(0.05, momentum=0.9)),
    "transformer": (small_transformer, ["norm1"], (5, 8), (2,), 2,
                    lambda: keras.optimizers.AdamW(0.01, weight_decay=0.01)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_fit_evaluate_predict_equal_plain_keras(name):
    build, cuts, x_shape, y_shape, stages_m, make_optimizer = CASES[name]
    plain, inner = twins(build)
    x, y = data(38, x_shape, y_shape)   # the last batch of 16 has 6 examples
    xv, yv = data(12, x_shape, y_shape, seed=2)
    plain.compile(optimizer=make_optimizer(), loss="mse", metrics=["mae"])
    history_plain = plain.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0,
                              validation_data=(xv, yv))
    piped = PipelineModel(inner, cuts=cuts, microbatches=4, devices=DEVICES)
    piped.compile(optimizer=make_optimizer(), loss="mse", metrics=["mae"])
    history_piped = piped.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0,
                              validation_data=(xv, yv))
    assert_same_training(plain, history_plain, piped, history_piped)
    np.testing.assert_allclose(piped.evaluate(xv, yv, verbose=0),
                               plain.evaluate(xv, yv, verbose=0), rtol=TOL)
    np.testing.assert_allclose(piped.predict(xv, verbose=0), plain.predict(xv, verbose=0),
                               rtol=TOL, atol=1e-13)
    pipe = piped.pipelines[0]
    assert len(pipe.split.stages) == len(cuts) + 1
    assert pipe.bytes_moved()["replicas"] == 0


def test_sample_weights_and_a_tf_data_dataset():
    plain, inner = twins(mlp, seed=3)
    x, y = data(32, (6,), (3,), seed=4)
    w = np.random.default_rng(5).uniform(0.5, 2.0, size=32)
    dataset = tf.data.Dataset.from_tensor_slices((x, y, w)).batch(8)
    plain.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    history_plain = plain.fit(dataset, epochs=2, verbose=0)
    piped = PipelineModel(inner, cuts=["d2"], microbatches=2, devices=DEVICES[:2])
    piped.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    history_piped = piped.fit(dataset, epochs=2, verbose=0)
    assert_same_training(plain, history_plain, piped, history_piped)


def test_callbacks_learning_rate_scheduler_early_stopping_checkpoint(tmp_path):
    x, y = data(32, (6,), (3,), seed=6)
    xv, yv = data(8, (6,), (3,), seed=7)

    def callbacks(directory):
        return [keras.callbacks.LearningRateScheduler(lambda epoch, lr: lr * 0.5),
                keras.callbacks.EarlyStopping(monitor="val_loss", patience=1,
                                              restore_best_weights=True),
                keras.callbacks.ModelCheckpoint(str(directory / "best.weights.h5"),
                                                save_weights_only=True)]
    plain, inner = twins(mlp, seed=8)
    plain.compile(optimizer=keras.optimizers.SGD(0.2), loss="mse")
    (tmp_path / "plain").mkdir()
    history_plain = plain.fit(x, y, batch_size=8, epochs=4, shuffle=False, verbose=0,
                              validation_data=(xv, yv), callbacks=callbacks(tmp_path / "plain"))
    piped = PipelineModel(inner, cuts=["d1", "d3"], microbatches=2, devices=DEVICES[:3])
    piped.compile(optimizer=keras.optimizers.SGD(0.2), loss="mse")
    (tmp_path / "piped").mkdir()
    history_piped = piped.fit(x, y, batch_size=8, epochs=4, shuffle=False, verbose=0,
                              validation_data=(xv, yv), callbacks=callbacks(tmp_path / "piped"))
    assert history_piped.history["learning_rate"] == history_plain.history["learning_rate"]
    assert_same_training(plain, history_plain, piped, history_piped)
    # the checkpoint callback saw the trained weights (a PipelineModel's own file)
    checkpoint = PipelineModel(mlp(), cuts=["d1", "d3"])
    checkpoint.load_weights(tmp_path / "piped" / "best.weights.h5")
    reference = mlp()
    reference.load_weights(tmp_path / "plain" / "best.weights.h5")
    for a, b in zip(checkpoint.model.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(a, b, rtol=TOL)


def test_evaluate_and_predict_run_forwards_on_the_stages_copies():
    """After fit, evaluate and predict run forward-only pipelines of model(x,
    training=False) on the stage-resident weights: equal to the plain model's, with the
    Keras variables left as they were (nothing written back) and no backward run."""
    plain, inner = twins(cnn_with_skip, seed=51)
    x, y = data(24, (6, 6, 2), (3,), seed=52)
    xv, yv = data(10, (6, 6, 2), (3,), seed=53)   # 10 = 8 + a last batch of 2
    for model in (plain,):
        model.compile(optimizer=keras.optimizers.Adam(0.02), loss="mse", metrics=["mae"])
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    piped = PipelineModel(inner, cuts=["conv2"], microbatches=4, devices=DEVICES[:2])
    piped.compile(optimizer=keras.optimizers.Adam(0.02), loss="mse", metrics=["mae"])
    piped.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    untrained = [v.numpy() for v in inner.weights]
    predicted = piped.predict(xv, batch_size=8, verbose=0)
    evaluated = piped.evaluate(xv, yv, batch_size=8, verbose=0)
    for v, before in zip(inner.weights, untrained):
        np.testing.assert_array_equal(v.numpy(), before)  # the stages' values were read
    np.testing.assert_allclose(predicted, plain.predict(xv, batch_size=8, verbose=0),
                               rtol=TOL, atol=1e-13)
    np.testing.assert_allclose(evaluated, plain.evaluate(xv, yv, batch_size=8, verbose=0),
                               rtol=TOL)
    forward = piped.forward_pipelines
    assert len(forward) == 2 and all(p.training_state is None for p in forward)
    for pipe in forward:
        assert {e.kind for e in pipe.timeline()} == {"F"}


def _summaries(folder) -> dict[str, list]:
    """Every summary written under ``folder``: tag -> [(step, value)], a scalar's value a
    float, an image's its width and height, a histogram's its array."""
    found: dict[str, list] = {}
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                tensor = tf.make_ndarray(value.tensor)
                if value.metadata.plugin_data.plugin_name == "images":
                    shown = tuple(int(v) for v in tensor[:2].astype(int))  # width, height
                elif tensor.ndim:
                    shown = tensor  # a histogram: (left edge, right edge, count) rows
                else:
                    shown = float(tensor)
                found.setdefault(f"{path.parent.name}/{value.tag}", []).append(
                    (event.step, shown))
    return found


def test_tensorboard_gets_keras_scalars_trained_histograms_and_the_pipeline(tmp_path):
    """Keras' TensorBoard callback under PipelineModel.fit: its loss scalars equal the
    plain model's, its weight histograms are of the trained weights (the stages' values),
    and the pipeline's idle fraction, traffic and timeline picture sit beside them."""
    pytest.importorskip("matplotlib", reason="the timeline picture needs the render extra")
    x, y = data(32, (6,), (3,), seed=41)
    plain, inner = twins(mlp, seed=42)
    board = lambda name: keras.callbacks.TensorBoard(  # noqa: E731
        str(tmp_path / name), histogram_freq=1, write_graph=False)
    plain.compile(optimizer=keras.optimizers.Adam(0.02), loss="mse")
    plain.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0,
              callbacks=[board("plain")])
    piped = PipelineModel(inner, cuts=["d1", "d3"], microbatches=2, devices=DEVICES[:3])
    piped.compile(optimizer=keras.optimizers.Adam(0.02), loss="mse")
    piped.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0,
              callbacks=[board("piped")])
    want, got = _summaries(tmp_path / "plain"), _summaries(tmp_path / "piped")
    steps = [step for step, _ in want["train/epoch_loss"]]
    assert steps == [0, 1]
    np.testing.assert_allclose([v for _, v in got["train/epoch_loss"]],
                               [v for _, v in want["train/epoch_loss"]], rtol=TOL)
    # histograms of the weights at each epoch's end: the trained ones, as the plain model's
    histograms = [t for t in want if t.startswith("train/") and "kernel" in t]
    assert len(histograms) == 4
    for tag in histograms:
        assert [step for step, _ in got[tag]] == [0, 1]
        for (_, a), (_, b) in zip(got[tag], want[tag]):
            np.testing.assert_allclose(a, b, rtol=1e-8, err_msg=tag)
    # the pipeline's own, per epoch
    for tag in ("pipeline/pipeline/idle_fraction", "pipeline/pipeline/ideal_idle_fraction",
                "pipeline/pipeline/step_seconds", "pipeline/pipeline/bytes_moved/activations",
                "pipeline/pipeline/timeline"):
        assert [step for step, _ in got[tag]] == [0, 1], tag
    ideal = got["pipeline/pipeline/ideal_idle_fraction"][0][1]
    assert ideal == pytest.approx(piped.last_pipeline.idle_fraction().ideal)
    assert got["pipeline/pipeline/bytes_moved/activations"][-1][1] == \
        piped.last_pipeline.bytes_moved()["activations"] > 0
    width, height = got["pipeline/pipeline/timeline"][0][1]
    assert width > 300 and height > 100


class _StopAfterEpoch(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            raise RuntimeError("interrupted")


def test_backup_and_restore_resumes_to_the_uninterrupted_weights(tmp_path):
    x, y = data(32, (6,), (3,), seed=9)
    make = lambda: keras.optimizers.Adam(0.02)  # noqa: E731
    _, whole_inner = twins(mlp, seed=10)
    whole = PipelineModel(whole_inner, cuts=["d2"], microbatches=2, devices=DEVICES[:2])
    whole.compile(optimizer=make(), loss="mse")
    whole.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0)

    _, first_inner = twins(mlp, seed=10)
    first = PipelineModel(first_inner, cuts=["d2"], microbatches=2, devices=DEVICES[:2])
    first.compile(optimizer=make(), loss="mse")
    backup = str(tmp_path / "backup")
    with pytest.raises(RuntimeError, match="interrupted"):
        first.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0,
                  callbacks=[keras.callbacks.BackupAndRestore(backup), _StopAfterEpoch(1)])

    _, second_inner = twins(mlp, seed=10)   # a new process would start from scratch
    second = PipelineModel(second_inner, cuts=["d1", "d3"], microbatches=4,
                           devices=DEVICES[1:4])
    second.compile(optimizer=make(), loss="mse")
    history = second.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0,
                         callbacks=[keras.callbacks.BackupAndRestore(backup)])
    assert len(history.history["loss"]) == 1   # epochs 0 and 1 came from the backup
    for a, b in zip(whole.get_weights(), second.get_weights()):
        assert np.max(np.abs(a - b)) / np.max(np.abs(a)) < 1e-12
    assert int(second.optimizer.iterations.numpy()) == int(whole.optimizer.iterations.numpy())


def test_saved_keras_file_loads_without_this_library(tmp_path):
    _, inner = twins(cnn_with_skip, seed=11)
    x, y = data(16, (6, 6, 2), (3,), seed=12)
    piped = PipelineModel(inner, cuts=["conv2"], microbatches=2, devices=DEVICES[:2])
    piped.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    piped.fit(x, y, batch_size=8, epochs=1, verbose=0)
    path = tmp_path / "trained.keras"
    piped.save(path)
    np.save(tmp_path / "x.npy", x)
    expected = piped.predict(x, verbose=0)
    # A fresh process in which the package cannot be imported (it is installed in this
    # environment, so a finder refuses it, as if it were not).
    script = textwrap.dedent(f"""
        import sys
        class Refuse:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("gradsplit_compiler", "passes"):
                    raise ImportError("not installed: " + name)
        sys.meta_path.insert(0, Refuse())
        import numpy as np, keras
        keras.config.set_floatx("float64")
        try:
            import gradsplit_compiler
        except ImportError:
            pass
        else:
            raise SystemExit("gradsplit_compiler is importable")
        model = keras.models.load_model({str(path)!r})
        assert not [m for m in sys.modules if m.startswith("gradsplit")]
        np.save({str(tmp_path / "y.npy")!r}, model.predict(np.load({str(tmp_path / "x.npy")!r}),
                                                             verbose=0))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    done = subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, rtol=1e-12)


def test_batch_norm_with_one_microbatch_equals_plain_keras():
    def bn_model():
        inputs = keras.Input((6,))
        h = keras.layers.Dense(8, name="d1")(inputs)
        h = keras.layers.BatchNormalization(name="bn")(h)
        h = keras.layers.Activation("tanh", name="act")(h)
        return keras.Model(inputs, keras.layers.Dense(2, name="head")(h))
    plain, inner = twins(bn_model, seed=13)
    x, y = data(24, (6,), (2,), seed=14)
    plain.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    history_plain = plain.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    piped = PipelineModel(inner, cuts=["bn"], microbatches=1, devices=DEVICES[:2])
    piped.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    history_piped = piped.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    assert_same_training(plain, history_plain, piped, history_piped)  # moving stats too


# -- bad input ----------------------------------------------------------------------------------


def test_a_layer_name_not_in_the_model_is_refused_with_close_names():
    with pytest.raises(GradSplitError, match="has no layer 'd4' \\(close: ") as e:
        PipelineModel(mlp(), cuts=["d4"])
    assert "d1" in str(e.value) and "model.summary() lists them" in str(e.value)


def test_cuts_and_num_stages_together_are_refused():
    with pytest.raises(GradSplitError, match="not both or neither"):
        PipelineModel(mlp(), cuts=["d1"], num_stages=2)


def test_an_unbuilt_model_is_refused():
    model = keras.Sequential([keras.layers.Dense(3)])
    with pytest.raises(GradSplitError, match="is not built, so its layers have no variables"):
        PipelineModel(model, cuts=["dense"])


def test_a_loss_that_is_not_a_mean_or_sum_is_refused():
    piped = PipelineModel(mlp(), cuts=["d2"])
    with pytest.raises(GradSplitError, match="which needs a per-example mean"):
        piped.compile(optimizer="sgd",
                      loss=keras.losses.MeanSquaredError(reduction="mean_with_sample_weight"))


def test_fit_before_compile_is_refused():
    piped = PipelineModel(mlp(), cuts=["d2"])
    x, y = data(8, (6,), (3,))
    with pytest.raises(Exception, match="compile"):
        piped.fit(x, y, verbose=0)


def test_microbatches_must_be_a_positive_integer():
    with pytest.raises(GradSplitError, match="microbatches must be a positive integer"):
        PipelineModel(mlp(), cuts=["d2"], microbatches=0)


def test_something_other_than_a_keras_model_is_refused():
    with pytest.raises(GradSplitError, match="PipelineModel wraps a keras.Model; got function"):
        PipelineModel(lambda x: x, cuts=["d1"])


def test_a_batch_size_that_microbatches_do_not_divide_is_refused_before_training():
    _, inner = twins(mlp, seed=16)
    piped = PipelineModel(inner, cuts=["d2"], microbatches=4, devices=DEVICES[:2])
    piped.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    x, y = data(20, (6,), (3,), seed=17)
    before = [v.numpy() for v in inner.weights]
    with pytest.raises(GradSplitError, match=r"fit's batches have 10 examples, which "
                       r"microbatches=4 does not divide into equal micro-batches; use a "
                       r"batch_size that is a multiple of 4 \(e\.g\. 8 or 12\)\. Only the "
                       r"last batch of an epoch may be smaller: it runs with the largest "
                       r"micro-batch count that divides it\."):
        piped.fit(x, y, batch_size=10, epochs=1, verbose=0)
    assert piped.pipelines == []  # nothing was built, nothing trained
    for v, b in zip(inner.weights, before):
        np.testing.assert_array_equal(v.numpy(), b)


def test_compile_without_a_loss_is_refused():
    with pytest.raises(GradSplitError, match="compile needs a loss \\(e.g. loss='mse'\\)"):
        PipelineModel(mlp(), cuts=["d2"]).compile(optimizer="sgd")


def test_mixed_float16_with_loss_scaling_trains_as_plain_keras():
    """mixed_float16 (float16 compute, float32 weights) and Keras' dynamic loss scaling:
    the scale seeds every stage's backward, a step that overflows in float16 is skipped on
    every stage and halves the scale. From 2**17 the first steps overflow; without the scale
    in the backward none would, and the iteration counts would differ."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        plain, inner = twins(mlp, seed=31)
        assert inner.layers[1].compute_dtype == "float16"
        x, y = data(64, (6,), (3,), seed=32)
        make = lambda: keras.optimizers.LossScaleOptimizer(  # noqa: E731
            keras.optimizers.Adam(1e-3), initial_scale=2.0**17, dynamic_growth_steps=3)
        plain.compile(optimizer=make(), loss="mse", jit_compile=True)
        history_plain = plain.fit(x, y, batch_size=16, epochs=4, shuffle=False, verbose=0)
        piped = PipelineModel(inner, cuts=["d1", "d2"], microbatches=1, devices=DEVICES[:3])
        piped.compile(optimizer=make(), loss="mse")
        history_piped = piped.fit(x, y, batch_size=16, epochs=4, shuffle=False, verbose=0)
        weights = piped.get_weights()  # brings the optimizer's state back too
        assert int(piped.optimizer.iterations) == int(plain.optimizer.iterations) < 16
        assert piped.pipelines[0].skipped_steps == 16 - int(plain.optimizer.iterations)
        assert float(piped.optimizer.dynamic_scale) == float(plain.optimizer.dynamic_scale)
        # float16 arithmetic, stage programs against one program: like with like, 1e-3
        np.testing.assert_allclose(history_piped.history["loss"],
                                   history_plain.history["loss"], rtol=1e-3)
        for a, b in zip(plain.get_weights(), weights):
            assert a.dtype == b.dtype == np.float32
            assert np.max(np.abs(a - b)) <= 1e-3 * np.max(np.abs(a))
    finally:
        keras.config.set_dtype_policy(previous)


def test_fit_with_data_of_another_kind_than_before_is_refused():
    _, inner = twins(mlp, seed=15)
    piped = PipelineModel(inner, cuts=["d2"], microbatches=2, devices=DEVICES[:2])
    piped.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    x, y = data(8, (6,), (3,), seed=16)
    piped.fit(x, y, batch_size=8, verbose=0)
    with pytest.raises(GradSplitError, match="fit was given data of another structure"):
        piped.fit(x, y, sample_weight=np.ones(8), batch_size=8, verbose=0)


def test_num_stages_asks_auto_split_and_summary_lists_the_stages():
    plain, inner = twins(mlp, seed=17)
    x, y = data(16, (6,), (3,), seed=18)
    plain.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    history_plain = plain.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    piped = PipelineModel(inner, num_stages=2, microbatches=2, devices=DEVICES[:2])
    piped.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    lines = []
    piped.summary(print_fn=lambda line, *a, **k: lines.append(line))
    assert "Stages: built by the first training step" in lines[-1]
    history_piped = piped.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    assert_same_training(plain, history_plain, piped, history_piped)
    assert len(piped.pipelines[0].split.stages) == 2
    lines = []
    piped.summary(print_fn=lambda line, *a, **k: lines.append(line))
    table = lines[lines.index(next(x for x in lines if x.startswith("Pipeline: 2 stages"))):]
    assert len(table) == 4 and "CPU:1" in table[3]
    held = sum(int(np.prod(w.shape)) for w in inner.get_weights())
    assert sum(int(line.split()[2].replace(",", "")) for line in table[2:]) == held


def test_num_stages_with_a_memory_limit_trains_the_planned_remat_as_plain_keras():
    """The smallest limit auto_split can meet rematerialises the first stage (two
    micro-batches in flight under 1F1B); the training pipeline runs that, as plain Keras."""
    plain, inner = twins(mlp, seed=21)
    x, y = data(32, (6,), (3,), seed=22)
    too_small = PipelineModel(inner, num_stages=2, microbatches=4, memory_limit=1,
                              devices=DEVICES[:2])
    too_small.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    with pytest.raises(GradSplitError, match=r"even with remat .* smallest limit that works "
                                             r"is .*\((\d+) bytes\)") as info:
        too_small.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    smallest = int(str(info.value).rsplit("(", 1)[1].split()[0])
    plain.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    history_plain = plain.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    piped = PipelineModel(inner, num_stages=2, microbatches=4, memory_limit=smallest,
                          devices=DEVICES[:2])
    piped.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    history_piped = piped.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    assert_same_training(plain, history_plain, piped, history_piped)
    pipe = piped.pipelines[0]
    assert pipe.remat == pipe.split.plan.remat == [True, False]
    assert max(pipe.split.plan.stage_memory) <= smallest
    with pytest.raises(GradSplitError, match=r"memory_limit guides auto_split's choice of "
                                             r"cuts: give it with num_stages=K"):
        PipelineModel(inner, cuts=["d2"], memory_limit=smallest)


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__(name="subclassed")
        self.first = keras.layers.Dense(12, activation="tanh", name="first")
        self.second = keras.layers.Dense(12, activation="tanh", name="second")
        self.head = keras.layers.Dense(3, name="sub_head")

    def call(self, x):
        return self.head(self.second(self.first(x)))


def sequential():
    return keras.Sequential([keras.Input((6,)),
                             keras.layers.Dense(12, activation="tanh", name="s1"),
                             keras.layers.Dense(12, activation="tanh", name="s2"),
                             keras.layers.Dense(3, name="s_head")], name="seq")


def subclassed():
    model = _Subclassed()
    model(np.zeros((1, 6)))
    return model


def tied():
    """One Dense layer applied twice, before the first cut and after the last: its
    variables live on two devices and are updated identically."""
    inputs = keras.Input((6,))
    shared = keras.layers.Dense(6, activation="tanh", name="shared")
    h = shared(inputs)
    h = keras.layers.Dense(6, activation="tanh", name="middle")(h)
    h = keras.layers.Dense(6, activation="tanh", name="late")(h)
    return keras.Model(inputs, keras.layers.Dense(3, name="t_head")(shared(h)), name="tied")


@pytest.mark.parametrize("build, cuts", [(sequential, ["s1", "s2"]),
                                         (subclassed, ["first", "second"]),
                                         (tied, ["middle", "late"]),
                                         (sequential, [])],
                         ids=["sequential", "subclassed", "tied", "one-stage"])
def test_other_kinds_of_models_train_as_plain_keras(build, cuts):
    plain, inner = twins(build, seed=19)
    x, y = data(24, (6,), (3,), seed=20)
    plain.compile(optimizer=keras.optimizers.Adam(0.02), loss="mse", metrics=["mae"])
    history_plain = plain.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    stages = {"cuts": cuts} if cuts else {"num_stages": 1}  # one stage, 2 micro-batches
    piped = PipelineModel(inner, microbatches=2, devices=DEVICES[:3], **stages)
    piped.compile(optimizer=keras.optimizers.Adam(0.02), loss="mse", metrics=["mae"])
    history_piped = piped.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    assert_same_training(plain, history_plain, piped, history_piped)
    assert len(piped.pipelines[0].split.stages) == len(cuts) + 1
