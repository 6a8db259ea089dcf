"""``Split.profile``: where ``gsc.split`` spent its time, by phase (timings themselves go to
BENCHMARKS.md section 4; here only that the record is made and adds up)."""

import numpy as np
import tensorflow as tf

import gradsplit_compiler as gsc


def test_a_splits_profile_names_each_phase_once_and_adds_up_to_its_wall_time():
    w = tf.Variable(np.random.default_rng(1).standard_normal((3, 4)))

    def loss(x):
        y = gsc.mark(tf.tanh(x @ w), "y")
        return tf.reduce_sum(tf.sin(y) ** 2)

    split = gsc.split(loss, [tf.TensorSpec([None, 3], tf.float64)], cuts=["y"])
    profile = split.profile
    for phase in ("trace", "convert", "pass inline_calls", "pass refresh_shapes",
                  "pass resolve_cuts", "pass partition", "checks", "other"):
        assert phase in profile, phase
    for k in (0, 1):
        for part in ("piece", "trace", "import", "gradients", "convert", "cut",
                     "split backward", "pieces", "functions"):
            assert f"stage {k}: {part}" in profile, (k, part)
    # stages are built last to first; the capture comes before the passes
    names = list(profile)
    assert names.index("trace") < names.index("pass partition") < names.index(
        "stage 1: import") < names.index("stage 0: import")
    assert all(seconds >= 0 for seconds in profile.values())
    assert abs(sum(profile.values()) - profile.total) < 1e-9
    assert profile.total > profile["trace"] > 0


def test_a_split_of_a_program_records_its_copy_instead_of_a_trace():
    program = gsc.capture(lambda x: tf.reduce_sum(gsc.mark(tf.tanh(x), "y") ** 2),
                          [tf.TensorSpec([None], tf.float64)])
    split = gsc.split(program, ["y"])
    assert "copy" in split.profile and "trace" not in split.profile
    assert gsc.Split(split.program).profile == {}
