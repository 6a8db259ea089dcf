"""Refusals of ``gsc.auto_split`` and the baseline plans, quoting what to do."""

from __future__ import annotations

import pytest
import tensorflow as tf
from models import mlp

import gradsplit_compiler as gsc
from gradsplit_compiler import GradSplitError
from gradsplit_compiler.plan.autosplit import baseline_plan


@pytest.fixture(scope="module")
def case():
    return mlp(depth=2)


@pytest.mark.parametrize("name", ["batch_size", "microbatches"])
@pytest.mark.parametrize("value", [0, True, 2.5])
def test_counts_must_be_positive_integers_or_none(case, name, value):
    with pytest.raises(GradSplitError, match=rf"{name} must be a positive integer or None; "
                                             r"got "):
        gsc.auto_split(case.fn, case.input_signature, 2, **{name: value})


def test_eps_must_be_non_negative(case):
    with pytest.raises(GradSplitError, match=r"eps must be a non-negative number; got -1"):
        gsc.auto_split(case.fn, case.input_signature, 2, eps=-1)


def test_too_many_stages_says_how_many_fit(case):
    with pytest.raises(GradSplitError, match=r"num_stages=500, but this program has only \d+ "
                                             r"pieces of work that stages can hold apart; ask for "
                                             r"at most \d+ stages\."):
        gsc.auto_split(case.fn, case.input_signature, 500)


def test_a_memory_limit_too_small_names_the_smallest_that_works(case):
    # one micro-batch in flight: remat (inputs on top of one micro-batch's residuals) can't help
    with pytest.raises(GradSplitError, match=r"memory_limit=1 bytes per stage cannot hold this "
                                             r"program in 2 stages, even with remat .* Stage \d, "
                                             r"ops '.*' to '.*', needs .* at best: its inputs "
                                             r"are .* With one micro-batch in flight remat cannot "
                                             r"help: it keeps the inputs on top of one "
                                             r"micro-batch's residuals\. The smallest limit that "
                                             r"works is .*\. Raise memory_limit or ask for more "
                                             r"stages\.$"):
        gsc.auto_split(case.fn, case.input_signature, 2, memory_limit=1, batch_size=4)


def test_a_program_with_no_work_to_cut():
    # refused as too few pieces of work before the "computes nothing" check can see it
    @tf.function
    def constant(x):
        return tf.constant(1.0, tf.float64)

    with pytest.raises(GradSplitError, match=r"num_stages=2, but this program has only 1 pieces "
                                             r"of work that stages can hold apart; ask for at "
                                             r"most 1 stages\."):
        gsc.auto_split(constant, [tf.TensorSpec([None, 3], tf.float64)], 2)


def test_a_baseline_by_something_else(case):
    program = gsc.split(case.fn, case.input_signature, ["h1"]).program
    with pytest.raises(GradSplitError, match=r"by must be 'ops' or 'params'; got 'layers'\."):
        baseline_plan(program, 2, "layers")
