"""``auto_split`` on a ``Program`` whose pass offered places to cut
(``ir.edit.offer_cut``): it cuts only there, even where a balanced plan would cut
elsewhere, and the split still gives the tape's gradient."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import gradsplit_compiler as gsc
from gradsplit_compiler.ir import edit

RNG = np.random.default_rng(11)
WS = [tf.Variable(RNG.normal(size=(16, 16)) * 0.3, name=f"w{i}") for i in range(6)]
SIG = [tf.TensorSpec([None, 16], tf.float64)]


def chain(x):
    for i, w in enumerate(WS):
        with tf.name_scope(f"layer{i}"):
            x = tf.tanh(x @ w)
    return tf.reduce_sum(x)


def _layer_output(program, i):
    [node] = edit.find_nodes(program, op="Tanh", scope=f"layer{i}")
    return f"{node}:0"


def test_auto_split_cuts_only_where_a_pass_offered():
    free = gsc.auto_split(chain, SIG, 3, batch_size=8)
    program = gsc.capture(chain, SIG)
    offered = [_layer_output(program, 0), _layer_output(program, 4)]
    for tensor in offered:
        edit.offer_cut(program, tensor)
    chosen = gsc.auto_split(program, None, 3, batch_size=8)
    assert chosen.plan.cuts == [[offered[0]], [offered[1]]]
    assert free.plan.cuts != chosen.plan.cuts  # the offer, not the balance, chose them
    assert gsc.verify(chosen, tf.constant(RNG.normal(size=(8, 16)))).ok


def test_too_few_offers_for_the_stages_asked_are_refused():
    program = gsc.capture(chain, SIG)
    edit.offer_cut(program, _layer_output(program, 2))
    with pytest.raises(gsc.GradSplitError,
                       match=r"num_stages=3, but this program has only 2 pieces of work"):
        gsc.auto_split(program, None, 3, batch_size=8)

