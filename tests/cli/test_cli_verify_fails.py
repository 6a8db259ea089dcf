"""`gradsplit verify` exits 1 on a split whose gradient is wrong (and 0 on the same program
split correctly): the command's verdict follows ``gsc.verify``'s, it does not only print it.

The split is made wrong the way a bug would: ``gsc.split`` (which the command calls to build
its split) is wrapped so that the last stage's backward sends zeros back across the cut. The
program is a real ``tf.function`` in a file, loaded by the command as a user's TARGET.
"""

from __future__ import annotations

import textwrap

import pytest
import tensorflow as tf

import gradsplit_compiler.core.split as core_split
from gradsplit_compiler.cli import parser as cli

PROGRAM = textwrap.dedent('''\
    import numpy as np
    import tensorflow as tf

    import gradsplit_compiler as gsc

    _rng = np.random.default_rng(3)
    W = tf.Variable(_rng.normal(size=(6, 5)), name="W")
    V = tf.Variable(_rng.normal(size=(5, 3)), name="V")


    @tf.function(input_signature=[tf.TensorSpec([None, 6], tf.float64),
                                  tf.TensorSpec([None, 3], tf.float64)])
    def loss(x, y0):
        h = gsc.mark(tf.tanh(x @ W), "h")
        return tf.reduce_mean(tf.square(tf.sin(h @ V) - y0))
''')


@pytest.fixture
def target(tmp_path):
    path = tmp_path / "verify_target.py"
    path.write_text(PROGRAM)
    return f"{path}:loss"


def _corrupting(real):
    def split(*args, **kwargs):
        s = real(*args, **kwargs)
        last = s.stages[-1]
        backward = last.emit_backward

        def dropped(residuals, cotangents, name, variables=None, vjp=None):
            inputs, grads = backward(residuals, cotangents, name, variables, vjp)
            return [None if c is None else tf.zeros_like(c) for c in inputs], grads

        last.emit_backward = dropped
        return s
    return split


def _verify(capfd, target, *extra):
    status = cli.main(["verify", target, "--cut", "h", "--no-xla", *extra])
    out, err = capfd.readouterr()
    return status, out, err


def test_verify_exits_0_on_the_correct_split(capfd, target):
    status, out, err = _verify(capfd, target, "-q")
    assert status == 0, (out, err)
    assert any(line.startswith("OK: max relative error") for line in out.splitlines()), out
    assert "MISMATCH" not in out + err


def test_verify_exits_1_on_a_corrupted_split(capfd, monkeypatch, target):
    monkeypatch.setattr(core_split, "split", _corrupting(core_split.split))
    status, out, err = _verify(capfd, target, "-q")
    assert status == 1, (out, err)
    report = out[out.index("MISMATCH"):]
    assert report.startswith("MISMATCH: max relative error 1.00e+00"), out
    w_row = next(line for line in report.splitlines() if line.startswith("W:0"))
    v_row = next(line for line in report.splitlines() if line.startswith("V:0"))
    assert w_row.endswith("<-"), report  # W, before the cut, lost its gradient
    assert not v_row.endswith("<-"), report  # V, after it, did not
    # the failure is one line on stderr, no traceback
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "MISMATCH: the composed stages differ from tf.GradientTape" \
        in lines[0], err
    assert "Traceback" not in err
