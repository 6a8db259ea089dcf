"""Data times pipeline parallelism: ``gsc.pipeline(split, M, devices=[[d0, d2], [d1, d3]],
optimizer=...)``, 2 stages x 2 replicas on 4 logical CPUs (tests/conftest.py).

The oracle is the tape: the same Keras optimizer on ``tf.GradientTape`` gradients of the
original loss on the whole batch, on the user's own variables. Float64, random data and
weights, weights moving; the model (tied_model.py) reads one variable in both stages.
"""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from models import value_rel_error
from tied_model import BATCH, OPTIMIZERS, WIDTH, TiedModel, tape_training

import gradsplit_compiler as gsc
from gradsplit_compiler.errors import GradSplitError
from gradsplit_compiler.run.grid import GridPipeline, allreduce_bytes

GRID = [["/CPU:0", "/CPU:2"], ["/CPU:1", "/CPU:3"]]  # stage 0 on CPU:0 and 2, stage 1 on 1, 3
STEPS = 20
TOL = 1e-10


@pytest.fixture(scope="module", autouse=True)
def four_devices():
    found = len(tf.config.list_logical_devices("CPU"))
    assert found >= 4, f"tests/conftest.py must configure 4 logical CPUs; found {found}"


def _batches(n: int, seed: int):
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(BATCH, WIDTH)), rng.normal(size=(BATCH, WIDTH)))
            for _ in range(n)]


def _resident(pipe, replica: int = 0) -> dict[str, np.ndarray]:
    values = {}
    for k, stage in enumerate(pipe.split.stages):
        copies = (pipe.stage_variables(k, replica) if isinstance(pipe, GridPipeline)
                  else pipe.stage_variables(k))
        for idx, copy in zip(stage.variable_indices, copies):
            values.setdefault(pipe.split.variables[idx].name, copy.numpy())
    return values


def _assert_replicas_bitwise_equal(pipe) -> None:
    for k in range(pipe.num_stages):
        for r in range(1, pipe.num_replicas):
            for a, b in zip(pipe.stage_variables(k, 0), pipe.stage_variables(k, r)):
                assert a.device != b.device
                np.testing.assert_array_equal(a.numpy(), b.numpy())


def _grid(split, optimizer, **kwargs):
    options = dict(microbatches=2, schedule="1f1b", devices=GRID, loss_reduction="mean",
                   optimizer=optimizer, jit_compile=False)
    options.update(kwargs)
    return gsc.pipeline(split, **options)


@pytest.mark.parametrize("name", ["sgd-momentum", "adam"])
def test_a_two_by_two_grid_trains_as_the_optimizer_on_tape_gradients(name):
    model = TiedModel(seed=3)
    split = model.split(cuts=("c2",))
    embed = split.variables.index(model.embed)
    assert all(embed in s.variable_indices for s in split.stages)  # tied across stages
    batches = _batches(STEPS, seed=1)
    pipe = _grid(split, OPTIMIZERS[name](), jit_compile=name == "adam")
    assert isinstance(pipe, GridPipeline) and pipe.grid == (2, 2)
    start = {v.name: v.numpy() for v in model.variables}
    losses = [float(pipe.train_step(x, y)) for x, y in batches]
    for v in model.variables:  # training never touched the user's variables
        np.testing.assert_array_equal(v.numpy(), start[v.name])
    expected = tape_training(model, OPTIMIZERS[name](), batches)
    np.testing.assert_allclose(losses, expected, rtol=TOL)
    resident = _resident(pipe)
    for v in model.variables:
        assert value_rel_error(resident[v.name], v.numpy()) < TOL, v.name
    assert max(value_rel_error(resident[n], start[n]) for n in start) > 1e-2  # moved
    np.testing.assert_array_equal(resident["scale:0"], start["scale:0"])  # non-trainable
    _assert_replicas_bitwise_equal(pipe)
    for k, row in enumerate(GRID):  # each replica's copies on its own device
        for r, device in enumerate(row):
            assert all(c.device.endswith(device[1:]) for c in pipe.stage_variables(k, r))
    assert pipe.iterations == STEPS

    # traffic: the all-reduce as a ring sends it, the rest as each replica's pipeline
    moved = pipe.bytes_moved()
    gradient_bytes = [sum(int(np.prod(split.variables[i].shape)) * 8
                          for i in s.variable_indices if split.variables[i].trainable)
                      for s in split.stages]
    assert moved["allreduce"] == sum(allreduce_bytes(b, 2) for b in gradient_bytes)
    assert pipe.allreduce_bytes_per_step() == [allreduce_bytes(b, 2) for b in gradient_bytes]
    assert allreduce_bytes(gradient_bytes[0], 2) == 2 * gradient_bytes[0]
    predicted = split.summary(batch_size=BATCH // 2)[1]["boundary_bytes"]
    assert moved["activations"] == moved["cotangents"] == 2 * predicted  # both replicas
    assert moved["gradients"] == 2 * 2 * WIDTH * WIDTH * 8  # the tied embed, per replica
    # the timeline: each replica's actions on its devices, an all-reduce on every device
    events = pipe.timeline()
    reduces = sorted((e.device_index, e.stage) for e in events if e.kind == "A")
    assert reduces == [(0, 0), (1, 1), (2, 0), (3, 1)]
    assert all(e.start < e.end for e in events)
    assert {(e.kind, e.device_index) for e in events if e.kind != "A"} == {
        (kind, d) for kind in "FB" for d in range(4)}


def test_a_sum_loss_with_clipping_and_a_timeline(tmp_path):
    rng = np.random.default_rng(5)
    w0 = tf.Variable(rng.normal(size=(WIDTH, WIDTH)) * 0.5, name="g_w0")
    w1 = tf.Variable(rng.normal(size=(WIDTH, 1)) * 0.5, name="g_w1")

    def loss(x):
        h = gsc.mark(tf.tanh(x @ w0), "h")
        return tf.reduce_sum(tf.tanh(h @ w1) ** 2)

    split = gsc.split(loss, [tf.TensorSpec([None, WIDTH], tf.float64)], cuts=["h"])
    xs = [rng.normal(size=(BATCH, WIDTH)) for _ in range(6)]
    pipe = _grid(split, keras.optimizers.SGD(0.05), loss_reduction="sum",
                 schedule="gpipe", clip_global_norm=0.5)
    losses = [float(pipe.train_step(x)) for x in xs]
    optimizer, expected, clipped = keras.optimizers.SGD(0.05), [], 0
    for x in xs:
        with tf.GradientTape() as tape:
            value = loss(tf.constant(x))
        grads = tape.gradient(value, [w0, w1])
        clipped += float(tf.linalg.global_norm(grads)) > 0.5
        optimizer.apply(tf.clip_by_global_norm(grads, 0.5)[0], [w0, w1])
        expected.append(float(value))
    assert clipped >= 3  # the norm is over the whole grid's gradients
    np.testing.assert_allclose(losses, expected, rtol=TOL)
    resident = _resident(pipe)
    for v in (w0, w1):
        assert value_rel_error(resident[v.name], v.numpy()) < TOL
    _assert_replicas_bitwise_equal(pipe)

    trace = json.loads(open(pipe.write_chrome_trace(tmp_path / "grid.json")).read())
    reduces = [e for e in trace["traceEvents"] if e.get("cat") == "allreduce"]
    assert sorted(e["tid"] for e in reduces) == [0, 1, 2, 3]
    threads = [e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"]
    assert threads[2] == "device 2: replica 1: CPU:2"
    assert pipe.plot_timeline(tmp_path / "grid.png").endswith("grid.png")
    measured, ideal = pipe.idle_fraction()
    assert 0 <= measured < 1 and ideal == pytest.approx(1 / 3)


def test_a_nonfinite_gradient_in_one_replica_stops_every_replica():
    model = TiedModel(seed=15)
    pipe = _grid(model.split(cuts=("c2",)), keras.optimizers.Adam(0.01))
    (x, y), = _batches(1, seed=16)
    pipe.train_step(x, y)
    before = [_resident(pipe, r) for r in range(2)]
    bad = y.copy()
    bad[-1, 2] = np.inf  # in replica 1's share only
    with pytest.raises(GradSplitError, match="is not finite") as e:
        pipe.train_step(x, bad)
    assert "no variable was changed" in str(e.value)
    for r in range(2):
        after = _resident(pipe, r)
        for name in after:
            np.testing.assert_array_equal(after[name], before[r][name])
    assert pipe.iterations == 1


def test_a_grid_checkpoint_restores_into_a_pipeline_and_into_another_grid(tmp_path):
    model = TiedModel(seed=10)
    split = model.split(cuts=("c2",))
    batches = _batches(8, seed=11)
    make = lambda: keras.optimizers.Adam(0.01)  # noqa: E731
    whole = _grid(split, make())
    for x, y in batches:
        whole.train_step(x, y)
    want = _resident(whole)

    first = _grid(split, make())
    for x, y in batches[:4]:
        first.train_step(x, y)
    path = first.save(tmp_path / "grid")
    # written once, as a one-replica pipeline writes it: every name once, no replica's
    names = {name for name, _ in tf.train.list_variables(path)}
    assert not any("replica" in n for n in names)
    plain = TiedModel(seed=99)
    gsc.load_variables(path, plain.variables)
    saved = _resident(first)
    for v in plain.variables:
        np.testing.assert_array_equal(v.numpy(), saved[v.name])

    one_d = gsc.pipeline(split, 2, "1f1b", ["/CPU:1", "/CPU:0"], loss_reduction="mean",
                         optimizer=make(), jit_compile=False)
    two_by_one = _grid(split, make(), devices=[["/CPU:3"], ["/CPU:2"]])
    assert two_by_one.grid == (2, 1)
    for resumed in (one_d, two_by_one):
        resumed.restore(path)
        assert resumed.iterations == 4
        for x, y in batches[4:]:
            resumed.train_step(x, y)
        got = _resident(resumed)
        for name, value in want.items():
            assert value_rel_error(got[name], value) < TOL, name
    assert two_by_one.bytes_moved()["allreduce"] == 0  # one replica: nothing to sum

    # and a 1-D pipeline's checkpoint into a grid: every replica reads it
    path = one_d.save(tmp_path / "one_d")
    again = _grid(split, make())
    again.restore(path)
    _assert_replicas_bitwise_equal(again)
    saved = _resident(one_d)
    for name, value in _resident(again, 1).items():
        np.testing.assert_array_equal(value, saved[name])


def test_bad_grids_are_refused_before_anything_runs():
    model = TiedModel(seed=20)
    split = model.split(cuts=("c2",))
    adam = keras.optimizers.Adam(0.01)
    with pytest.raises(GradSplitError, match=r"the grid of devices is ragged: its stage lists "
                                             r"hold \[2, 1\] devices"):
        _grid(split, adam, devices=[["/CPU:0", "/CPU:2"], ["/CPU:1"]])
    with pytest.raises(GradSplitError, match="the grid of devices is ragged"):
        _grid(split, adam, devices=[[], []])
    with pytest.raises(GradSplitError, match=r"is named twice in stage 1's list of the grid; "
                                             r"the replicas of a stage sum their gradients"):
        _grid(split, adam, devices=[["/CPU:0", "/CPU:2"], ["/CPU:1", "/CPU:1"]])
    with pytest.raises(GradSplitError, match="devices mixes device names and lists"):
        _grid(split, adam, devices=["/CPU:0", ["/CPU:1", "/CPU:3"]])
    with pytest.raises(GradSplitError, match=r"but the grid of devices has only 1 lists; give "
                                             r"one list of devices \(one per replica\) per"):
        _grid(split, adam, devices=[["/CPU:0", "/CPU:2"]])
    with pytest.raises(GradSplitError, match=r"a grid of devices \(one list per stage, a "
                                             r"device per replica\) trains its replicas"):
        _grid(split, None)
    with pytest.raises(GradSplitError, match="shares_state_with is not supported on a grid"):
        _grid(split, None, shares_state_with=object())
    with pytest.raises(GradSplitError, match="does not exist here"):
        _grid(split, adam, devices=[["/CPU:0", "/CPU:9"], ["/CPU:1", "/CPU:3"]])

    fixed = gsc.split(model.loss, [tf.TensorSpec([BATCH, WIDTH], tf.float64)] * 2,
                      cuts=["c2"])
    with pytest.raises(GradSplitError, match=r"shares, but no argument of fn has a batch "
                                             r"dimension \(a None leading dimension"):
        _grid(fixed, adam, microbatches=1)

    from gradsplit_compiler.keras import PipelineModel

    dense = keras.Sequential([keras.Input((WIDTH,)), keras.layers.Dense(2)])
    with pytest.raises(GradSplitError, match="PipelineModel takes one device per stage; a "
                                             "grid of devices"):
        PipelineModel(dense, num_stages=2, devices=GRID)

    pipe = _grid(split, adam)
    with pytest.raises(GradSplitError, match="no step has run yet: call train_step"):
        pipe.bytes_moved()
    with pytest.raises(GradSplitError, match="replica 2 does not exist; this grid has "
                                             "replicas 0 to 1"):
        pipe.stage_variables(0, 2)
    x, y = _batches(1, seed=21)[0]
    with pytest.raises(GradSplitError, match=r"a batch of 6 does not cut into 2 replicas x 2 "
                                             r"micro-batches of equal size; give a batch that "
                                             r"4 divides \(4, 8, 12, ...\)"):
        pipe.train_step(x[:6], y[:6])
    assert pipe.iterations == 0


def test_loss_scaling_skips_a_step_on_every_replica_when_one_share_overflows():
    """A ``LossScaleOptimizer`` as in Keras: the backward seeded with the scale; an
    infinite example in replica 1's share only skips the step on both replicas and halves
    the scale; ``dynamic_growth_steps`` finite steps double it."""
    model = TiedModel(seed=21)
    batches = _batches(6, seed=22)
    x, y = batches[2]
    batches[2] = (np.where(np.arange(BATCH)[:, None] == BATCH - 3, np.inf, x), y)

    def scaled():
        return keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(0.01),
                                                   initial_scale=2.0**10,
                                                   dynamic_growth_steps=2)

    pipe = _grid(model.split(cuts=("c2",)), scaled())
    reference = scaled()
    trainable = [v for v in model.variables if v.trainable]
    scales, want_scales = [], []
    for x, y in batches:
        pipe.train_step(x, y)
        scales.append(pipe.replicas[1].training_state.loss_scale.value)
        with tf.GradientTape() as tape:
            want = reference.scale_loss(model.loss(tf.constant(x), tf.constant(y)))
        reference.apply(tape.gradient(want, trainable), trainable)
        want_scales.append(float(reference.dynamic_scale))
    assert scales == want_scales and scales[:3] == [2.0**10, 2.0**11, 2.0**10], scales
    assert pipe.skipped_steps == 1 and pipe.iterations == 5
    assert pipe.replicas[1].skipped_steps == 1
    resident = _resident(pipe)
    for v in model.variables:
        assert value_rel_error(resident[v.name], v.numpy()) < TOL, v.name
    _assert_replicas_bitwise_equal(pipe)
