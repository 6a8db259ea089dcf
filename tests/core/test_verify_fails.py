"""``gsc.verify`` fails on a broken split: every test here corrupts a real split the way a bug
would, and expects ``not report.ok`` with the offending variable's row not ok (and the other
stage's rows still ok, so the report points at the right place).

The corruption goes through the stage's own interface: ``Split.value_and_gradients`` emits
``stage.emit_forward`` / ``stage.emit_backward`` into one traced function, so replacing a
stage's ``emit_backward`` (before the first call traces it) changes what the composed program
computes, with real TensorFlow graphs and no mocked numbers.

The program is ``mlp(depth=4)`` cut at ``h2``: stage 0 holds W1, W2, b1, b2; stage 1 holds
W3, W4, b3, b4 and head (W3 and W4 both 8x8).
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from models import MODES, mlp

import gradsplit_compiler as gsc
from gradsplit_compiler.core.verify import Report

FIRST = ["W1", "W2", "b1", "b2"]
SECOND = ["W3", "W4", "b3", "b4", "head"]


@pytest.fixture
def case():
    return mlp(depth=4)


@pytest.fixture
def split(case):
    s = gsc.split(case.fn, case.input_signature, ["h2"])
    names = [[v.name.split(":")[0] for v in st.variables] for st in s.stages]
    assert sorted(names[0]) == sorted(FIRST) and sorted(names[1]) == sorted(SECOND), names
    return s


def _rows(report: Report) -> dict[str, dict]:
    return {r["name"].split(":")[0]: r for r in report.rows}


def _wrap_backward(stage, change):
    """``stage.emit_backward`` replaced by the real one followed (or preceded) by ``change``:
    ``change(residuals, cotangents) -> (residuals, cotangents, after)`` where ``after`` maps
    ``(input_cotangents, variable_grads)`` to what the corrupted stage returns."""
    real = stage.emit_backward

    def corrupted(residuals, cotangents, name, variables=None, vjp=None):
        residuals, cotangents, after = change(list(residuals), list(cotangents))
        return after(*real(residuals, cotangents, name, variables, vjp))

    stage.emit_backward = corrupted


def _same(*parts):
    return parts


def test_the_uncorrupted_split_verifies(case, split):
    # the baseline the corruptions are measured against
    report = gsc.verify(split, *case.args(), jit_compile=False)
    assert report.ok, str(report)
    assert all(r["ok"] for r in report.rows)


@MODES
def test_a_perturbed_residual_fails_verify(case, split, jit_compile):
    stage = split.stages[0]
    floats = [i for i, spec in enumerate(stage.residual_specs) if spec.dtype.is_floating]
    assert floats

    def perturb(residuals, cotangents):
        # every float residual off by one part in a thousand: what the forward kept is not
        # what the backward reads
        for i in floats:
            residuals[i] = residuals[i] * 1.001
        return residuals, cotangents, _same

    _wrap_backward(stage, perturb)
    report = gsc.verify(split, *case.args(), jit_compile=jit_compile)
    rows = _rows(report)
    assert not report.ok, str(report)
    assert report.value_error == 0.0  # the forward is untouched
    assert not any(rows[n]["ok"] for n in ["W1", "W2"]), str(report)
    assert all(rows[n]["ok"] for n in SECOND), str(report)
    assert "MISMATCH" in str(report).splitlines()[0]
    assert "<-" in next(line for line in str(report).splitlines() if line.startswith("W1"))


def test_swapped_residuals_fail_verify(case, split):
    stage = split.stages[1]
    specs = stage.residual_specs
    pairs = [(i, j) for i in range(len(specs)) for j in range(i + 1, len(specs))
             if specs[i].dtype.is_floating and specs[i].shape.as_list() == specs[j].shape.as_list()
             and specs[i].shape.rank == 2]
    assert pairs, [str(s) for s in specs]
    i, j = pairs[0]

    def swap(residuals, cotangents):
        residuals[i], residuals[j] = residuals[j], residuals[i]
        return residuals, cotangents, _same

    _wrap_backward(stage, swap)
    report = gsc.verify(split, *case.args(), jit_compile=False)
    assert not report.ok, str(report)
    assert not all(_rows(report)[n]["ok"] for n in SECOND), str(report)


def test_a_dropped_cotangent_fails_verify(case, split):
    # stage 1's backward sends no cotangent back across the cut: stage 0's gradients are zero
    def drop(residuals, cotangents):
        def after(input_cotangents, variable_grads):
            return [None if c is None else tf.zeros_like(c) for c in input_cotangents], \
                variable_grads
        return residuals, cotangents, after

    _wrap_backward(split.stages[1], drop)
    report = gsc.verify(split, *case.args(), jit_compile=False)
    rows = _rows(report)
    assert not report.ok, str(report)
    assert not any(rows[n]["ok"] for n in FIRST), str(report)
    assert all(rows[n]["ok"] for n in SECOND), str(report)
    assert report.max_rel_error == pytest.approx(1.0)  # a zero gradient is 100% off


def test_a_zeroed_output_cotangent_fails_verify(case, split):
    # the cotangent a stage receives for its output is dropped before its backward
    def drop(residuals, cotangents):
        return residuals, [tf.zeros_like(c) for c in cotangents], _same

    _wrap_backward(split.stages[0], drop)
    report = gsc.verify(split, *case.args(), jit_compile=False)
    rows = _rows(report)
    assert not report.ok, str(report)
    assert not any(rows[n]["ok"] for n in FIRST), str(report)
    assert all(rows[n]["ok"] for n in SECOND), str(report)


def test_swapped_variable_gradients_fail_verify(case, split):
    stage = split.stages[1]
    names = [v.name.split(":")[0] for v in stage.variables]
    w3, w4 = names.index("W3"), names.index("W4")

    def swap(residuals, cotangents):
        def after(input_cotangents, variable_grads):
            grads = list(variable_grads)
            grads[w3], grads[w4] = grads[w4], grads[w3]
            return input_cotangents, grads
        return residuals, cotangents, after

    _wrap_backward(stage, swap)
    report = gsc.verify(split, *case.args(), jit_compile=False)
    rows = _rows(report)
    assert not report.ok, str(report)
    assert not rows["W3"]["ok"] and not rows["W4"]["ok"], str(report)
    assert all(rows[n]["ok"] for n in ["b3", "b4", "head", *FIRST]), str(report)


def test_a_stale_variable_in_a_backward_fails_verify(case, split):
    # stage 1's backward reads copies of its variables from before an update (a replica
    # never refreshed): its forward and value are right, the cotangent it sends back is not
    stage = split.stages[1]
    stale = [tf.Variable(v - 0.01, name=f"stale_{v.name.split(':')[0]}")
             for v in stage.variables]
    real = stage.emit_backward

    def with_stale(residuals, cotangents, name, variables=None, vjp=None):
        return real(residuals, cotangents, name, stale, vjp)

    stage.emit_backward = with_stale
    report = gsc.verify(split, *case.args(), jit_compile=False)
    rows = _rows(report)
    assert not report.ok, str(report)
    assert report.value_error == 0.0
    assert not any(rows[n]["ok"] for n in ["W1", "W2"]), str(report)


def test_a_stale_variable_in_a_forward_fails_verify(case, split):
    # stage 0's forward reads a stale W1: the value itself is off
    stage = split.stages[0]
    names = [v.name.split(":")[0] for v in stage.variables]
    stale = [tf.Variable(v + 0.01) if n == "W1" else v for v, n in zip(stage.variables, names)]
    real = stage.emit_forward

    def with_stale(inputs, name, variables=None, vjp=None):
        return real(inputs, name, stale, vjp)

    stage.emit_forward = with_stale
    report = gsc.verify(split, *case.args(), jit_compile=False)
    assert not report.ok, str(report)
    assert report.value_error > report.rtol
    assert not _rows(report)["W1"]["ok"], str(report)


# -- a gradient list of the wrong length ------------------------------------------------------


def _returning(split, change):
    real = split.value_and_gradients

    def corrupted(*args, **kwargs):
        value, grads = real(*args, **kwargs)
        return value, change(list(grads))

    split.value_and_gradients = corrupted


def test_a_missing_gradient_fails_verify_with_a_row_saying_so(case, split):
    _returning(split, lambda grads: grads[:-1])
    report = gsc.verify(split, *case.args(), jit_compile=False)
    rows = _rows(report)
    last = split.variables[-1].name.split(":")[0]
    assert not report.ok, str(report)
    assert not rows[last]["ok"]
    assert rows[last]["note"] == "no gradient from the composed stages"
    assert all(r["ok"] for n, r in rows.items() if n != last), str(report)
    assert "no gradient from the composed stages" in str(report)
    assert report.max_rel_error == float("inf")


def test_an_extra_gradient_fails_verify_with_a_row_saying_so(case, split):
    _returning(split, lambda grads: grads + [tf.zeros([3], tf.float64)])
    report = gsc.verify(split, *case.args(), jit_compile=False)
    assert not report.ok, str(report)
    extra = [r for r in report.rows if r["name"].startswith("(gradient #")]
    assert len(extra) == 1 and not extra[0]["ok"], str(report)
    assert f"extra: split has {len(split.variables)} variables" in str(report)


def test_an_empty_gradient_list_fails_verify(case, split):
    # zip() of an empty list with the reference compared nothing and passed
    _returning(split, lambda grads: [])
    report = gsc.verify(split, *case.args(), jit_compile=False)
    assert not report.ok
    assert len(report.rows) == len(split.variables)
    assert not any(r["ok"] for r in report.rows)


# -- a report that is OK beyond its tolerance says why -----------------------------------------


def test_an_ok_beyond_rtol_names_the_rounding_floor():
    # A float32 split whose stage 0 backward reads its residuals off by a few ulps (what XLA
    # reassociating differently on two programs does): relative errors far above a tiny
    # rtol, absolute errors below 64 ulps of the largest gradient. verify calls that OK, and
    # its line must say it was the rounding floor, not the tolerance it prints.
    case = mlp(tf.float32, depth=4)
    split = gsc.split(case.fn, case.input_signature, ["h2"])
    stage = split.stages[0]
    floats = [i for i, spec in enumerate(stage.residual_specs) if spec.dtype.is_floating]

    def nudge(residuals, cotangents):
        for i in floats:
            residuals[i] = residuals[i] * (1 + 4 * np.finfo(np.float32).eps)
        return residuals, cotangents, _same

    _wrap_backward(stage, nudge)
    report = gsc.verify(split, *case.args(), jit_compile=True, rtol=1e-9)
    first = str(report).splitlines()[0]
    assert report.ok, str(report)
    assert report.max_rel_error > report.rtol
    assert 0 < report.max_abs_error <= report.rounding_floor
    assert first.startswith(
        f"OK within the rounding floor {report.rounding_floor:.1e} (64 ulps of the largest "
        "gradient): max relative error"), first
    assert "(tolerance 1e-09)" in first


def test_an_ok_within_rtol_says_plain_ok(case, split):
    report = gsc.verify(split, *case.args(), jit_compile=False)
    assert str(report).startswith("OK: max relative error")


def test_the_verdict_line_of_each_kind():
    # the words, with numbers chosen by hand (the report of a real run is tested above)
    base = dict(value_error=0.0, dtype="float32", jit_compile=True)
    floor = Report(ok=True, max_abs_error=1e-7, max_rel_error=9.01e-2, rtol=1e-5, atol=0.0,
                   rounding_floor=3.1e-6, **base)
    assert str(floor).startswith("OK within the rounding floor 3.1e-06 (64 ulps of the "
                                 "largest gradient): max relative error 9.01e-02")
    atol = Report(ok=True, max_abs_error=1e-4, max_rel_error=9.01e-2, rtol=1e-5, atol=1e-3,
                  rounding_floor=3.1e-6, **base)
    assert str(atol).startswith("OK within the absolute tolerance 1.0e-03:")
    bad = Report(ok=False, max_abs_error=1.0, max_rel_error=1.0, rtol=1e-5, atol=0.0, **base)
    assert str(bad).startswith("MISMATCH: max relative error 1.00e+00")


def test_corruption_is_local_to_the_split(case, split):
    # the hooks above replace attributes of one split's stages only
    other = gsc.split(case.fn, case.input_signature, ["h2"])
    _wrap_backward(split.stages[1], lambda r, c: (r, [tf.zeros_like(x) for x in c], _same))
    assert gsc.verify(other, *case.args(), jit_compile=False).ok
    np.testing.assert_equal(gsc.verify(split, *case.args(), jit_compile=False).ok, False)
