"""``export.export_split`` then ``export.run_exported`` (the manifest's procedure, in this
process): the exported stages give ``tf.GradientTape``'s value and gradient of the original
function, in float64 within 1e-12.

The programs: ``zoo.skip_net`` with two arguments every stage reads whole (``scale``, a
scalar, and ``shift``, of fixed leading dimension), ``W2`` shared by two stages and skip
connections over cuts; the seed problem; a variable read by two stages.
"""

import numpy as np
import pytest
import tensorflow as tf
from models import (
    RTOL,
    assert_matches,
    move_weights,
    seed_model,
    shared_variable,
    skip_net,
    tape_value_and_gradients,
)

import gradsplit_compiler as gsc
from gradsplit_compiler.core import export

TOL = RTOL[tf.float64]

CASES = {
    "skip_net": lambda: skip_net("mean", replicated=True, batch=6, seed=1),
    "seed": lambda: seed_model(tf.float64),
    "shared_variable": shared_variable,
}


def _exported_against_tape(case, split, directory, args, what):
    manifest = export.export_split(split, directory, description=case.name)
    assert len(manifest["stages"]) == len(split.stages)
    assert [v["name"] for v in manifest["variables"]] == [v.name for v in split.variables]
    reference = tape_value_and_gradients(case.fn, split.variables, args)
    outputs, grads = export.run_exported(directory, args)
    got = [g if g is not None else tf.zeros_like(r) for g, r in zip(grads, reference[1])]
    assert_matches(outputs[0], got, reference, TOL, what)
    assert all(np.isfinite(np.asarray(g)).all() for g in got)


@pytest.mark.parametrize("name", sorted(CASES))
def test_run_exported_gives_the_tape_gradient(tmp_path, name):
    case = CASES[name]()
    split = gsc.split(case.fn, case.input_signature, case.cuts)
    _exported_against_tape(case, split, tmp_path / name, case.args(2), name)


def test_run_exported_after_new_weights_gives_the_tape_gradient_at_those(tmp_path):
    """Export, give the weights new random values, export again into the same directory:
    each export holds the weights it was made with (no stale copy of a stage or a weight),
    and other values of the arguments given whole give the tape's answer for those."""
    case = CASES["skip_net"]()
    split = gsc.split(case.fn, case.input_signature, case.cuts)
    x, y, _, shift = case.args(3)
    _exported_against_tape(case, split, tmp_path / "stages", [x, y, 1.5, shift], "first")
    move_weights(split.variables, 4)
    args = [x, y, tf.constant(-0.7, tf.float64), shift * 2.0]
    _exported_against_tape(case, split, tmp_path / "stages", args, "new weights")
