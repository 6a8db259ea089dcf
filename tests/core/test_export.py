"""``export.export_split`` then ``export.run_exported`` (the manifest's procedure, in this
process): the exported stages give ``value_and_gradients`` and the tape's gradient."""

import numpy as np
import tensorflow as tf
from models import RTOL, max_rel_error, restore, seed_model, shared_variable, snapshot

import gradsplit_compiler as gsc
from gradsplit_compiler.core import export

TOL = RTOL[tf.float64]


def test_run_exported_gives_the_composed_gradient(tmp_path):
    for build in (lambda: seed_model(tf.float64), shared_variable):
        case = build()
        split = gsc.split(case.fn, case.input_signature, case.cuts)
        manifest = export.export_split(split, tmp_path / case.name, description=case.name)
        assert len(manifest["stages"]) == len(split.stages)
        args = case.args(2)
        start = snapshot(split.variables)
        outputs, grads = export.run_exported(tmp_path / case.name, args)
        restore(split.variables, start)
        value, expected = split.value_and_gradients(*args, jit_compile=False)
        restore(split.variables, start)
        assert abs(float(outputs[0]) - float(value)) <= TOL * max(1.0, abs(float(value)))
        got = [g if g is not None else tf.zeros_like(e) for g, e in zip(grads, expected)]
        assert max_rel_error(got, expected) <= TOL
        assert all(np.isfinite(g.numpy()).all() for g in got)
