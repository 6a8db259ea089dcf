"""Stages on their own: forward returns residuals, backward consumes them without running the
forward again, every stage compiles under XLA alone, and driving the stages by hand exactly as
docs/api.md describes gives ``value_and_gradients`` and the tape's gradient.
"""

import contextlib
from collections import Counter

import numpy as np
import pytest
import tensorflow as tf
from models import (
    CONTROL_FLOW_BUILDERS,
    KERAS_SMALL_BUILDERS,
    RTOL,
    SMALL_BUILDERS,
    assert_matches,
    counted_mlp,
    integer_labels,
    keras_floatx,
    max_rel_error,
    move_weights,
    normal,
    reference_value_and_grads,
    reference_vjp,
    restore,
    seed_model,
    seed_outputs_model,
    skip_net,
    snapshot,
    tape_value_and_gradients,
    value_rel_error,
)

import gradsplit_compiler as gsc
from gradsplit_compiler.core.residuals import VIEW_OPS

TOL = RTOL[tf.float64]
ALL_BUILDERS = {**SMALL_BUILDERS, **CONTROL_FLOW_BUILDERS, **KERAS_SMALL_BUILDERS}

# Ops a backward may hold without reading a cotangent: they compute no function of the
# forward values (constants, shapes, integer index arithmetic, plumbing).
NO_FORWARD_WORK = {"Placeholder", "Const", "Identity", "NoOp", "Shape", "ShapeN", "Size",
                   "Rank", "VariableShape", "BroadcastGradientArgs"}
STATEFUL_WRITES = {"AssignVariableOp", "AssignAddVariableOp", "AssignSubVariableOp",
                   "ResourceScatterAdd", "ResourceScatterUpdate"}


def _build(name):
    if name in KERAS_SMALL_BUILDERS:
        with keras_floatx("float64"):
            return ALL_BUILDERS[name]()
    return ALL_BUILDERS[name]()


def _split(case):
    return gsc.split(case.fn, case.input_signature, case.cuts)


@contextlib.contextmanager
def _built_split(name):
    """``(case, split, variables, start)`` for the program ``name``: its split, the split's
    variables and their values before the test; they get those values back afterwards."""
    case = _build(name)
    split = _split(case)
    variables = list(split.variables)
    start = snapshot(variables)
    try:
        yield case, split, variables, start
    finally:
        restore(variables, start)


def _is_float(dtype):
    return tf.as_dtype(dtype).is_floating


def drive_by_hand(split, args, output_cotangents):
    """Run a split with a dictionary from names to values, exactly as docs/api.md describes.

    Returns ``(outputs, input_cotangents, grads)``: ``input_cotangents`` aligned with
    ``split.arg_names`` (``None`` where no stage gives one, e.g. integer arguments) and
    ``grads`` aligned with ``split.variables`` (zeros where no stage gives one).
    """
    env = dict(zip(split.arg_names, args))
    residuals = []
    for stage in split.stages:
        outputs, stage_residuals = stage.forward(*[env[n] for n in stage.inputs])
        assert len(outputs) == len(stage.outputs)
        env.update(zip(stage.outputs, outputs))
        residuals.append(stage_residuals)

    cotangents = dict(zip(split.output_names, output_cotangents))
    totals = {}
    for stage in reversed(split.stages):
        # Zeros for outputs nobody differentiates.
        outs = [cotangents[n] if n in cotangents else tf.zeros_like(env[n])
                for n in stage.outputs]
        input_cotangents, variable_grads = stage.backward(residuals[stage.index], outs)
        assert len(input_cotangents) == len(stage.inputs)
        assert len(variable_grads) == len(stage.variables)
        for name, cot in zip(stage.inputs, input_cotangents):
            if cot is None:
                continue
            # A tensor several stages read gets the sum.
            cotangents[name] = cotangents[name] + cot if name in cotangents else cot
        for var, grad in zip(stage.variables, variable_grads):
            key = id(var)
            totals[key] = totals[key] + grad if key in totals else grad
    outputs = [env[n] for n in split.output_names]
    input_cotangents = [cotangents.get(n) for n in split.arg_names]
    grads = [totals.get(id(v), tf.zeros(v.shape, v.dtype)) for v in split.variables]
    return outputs, input_cotangents, grads


def _stage_inputs(split, args):
    """The values each stage's inputs take on ``args`` (running the forwards once)."""
    env = dict(zip(split.arg_names, args))
    per_stage = []
    for stage in split.stages:
        values = [env[n] for n in stage.inputs]
        per_stage.append(values)
        outputs, _ = stage.forward(*values)
        env.update(zip(stage.outputs, outputs))
    return per_stage


def _written_variables(stage):
    program = stage._program
    return [program.variables[i] for i in program.written_variables()]


def _forward_work_in_backward(stage):
    """Ops of ``stage.backward``'s graph that compute something without reading a cotangent:
    that is forward work, which a backward fed with residuals must not do."""
    concrete = stage.backward.get_concrete_function()
    graph = concrete.graph
    n_residuals = len(stage.backward.input_signature[0])
    n_cotangents = len(stage.backward.input_signature[1])
    cotangent_ops = {t.op for t in graph.inputs[n_residuals:n_residuals + n_cotangents]}
    # Reached from a cotangent through data or control edges: TF's gradient functions put
    # the parts of a gradient formula that read forward values (``2 * x`` of Square's,
    # ``cos(x)`` of Sin's) under a control dependency on the cotangent, so that they run in
    # the backward; they are gradient work, not forward work. Creation order is topological.
    reached = set(cotangent_ops)
    for op in graph.get_operations():
        if any(t.op in reached for t in op.inputs) or any(
                c in reached for c in op.control_inputs):
            reached.add(op)
    # A variable the program never writes is read again by the backward (not copied out of
    # the forward as a residual): a fetch, not forward work. Written ones must be residuals.
    written = {id(split_variable.handle) for split_variable in _written_variables(stage)}
    captured = {id(ext): internal.op for ext, internal in concrete.graph.captures}
    written_handles = {op for key, op in captured.items() if key in written}
    offending, fetched = [], set()
    for op in graph.get_operations():
        if op.type == "ReadVariableOp" and op.inputs[0].op not in written_handles:
            fetched.add(op)
            continue
        if op in reached:
            continue
        if op.type in NO_FORWARD_WORK:
            fetched.add(op)
            continue
        if op.outputs and all(not _is_float(t.dtype) for t in op.outputs) and (
                op.type not in ("While", "StatelessWhile", "If", "StatelessIf")):
            fetched.add(op)
            continue  # integer index and shape arithmetic
        if op.type in VIEW_OPS and all(t.op in fetched for t in op.inputs):
            fetched.add(op)
            continue  # a reshape or cast of a weight read again or of a count: a fetch
        offending.append(f"{op.name} ({op.type})")
    return offending


# -- forward returns residuals; backward consumes them -----------------------------------------


@pytest.mark.parametrize("name", list(ALL_BUILDERS))
def test_stage_forward_returns_outputs_and_residuals_backward_consumes(name):
    case = _build(name)
    split = _split(case)
    for stage, values in zip(split.stages, _stage_inputs(split, case.args(0))):
        outputs, residuals = stage.forward(*values)
        assert len(outputs) == len(stage.outputs)
        for out, spec in zip(outputs, stage.backward.input_signature[1]):
            assert out.dtype == spec.dtype
        for res, spec in zip(residuals, stage.backward.input_signature[0]):
            assert spec.is_compatible_with(res)
        assert len(residuals) == len(stage.backward.input_signature[0])


@pytest.mark.parametrize("name", list(ALL_BUILDERS))
def test_stage_backward_does_no_forward_work(name):
    """Every op in each backward graph either reads a cotangent or is a constant, a shape or
    integer arithmetic: nothing of the forward pass runs again."""
    case = _build(name)
    split = _split(case)
    for stage in split.stages:
        assert _forward_work_in_backward(stage) == [], f"stage {stage.index}"


@pytest.mark.parametrize("name", list(ALL_BUILDERS))
def test_stage_backward_makes_no_variable_writes(name):
    case = _build(name)
    split = _split(case)
    for stage in split.stages:
        graph = stage.backward.get_concrete_function().graph
        writes = [op.name for op in graph.get_operations() if op.type in STATEFUL_WRITES]
        assert writes == [], f"stage {stage.index}"


def test_seed_stage0_backward_has_no_tanh_and_only_the_two_gradient_matmuls():
    """Stage 0 of the seed model computes ``tanh(x W + b)``: its backward holds ``TanhGrad``
    of the residual ``y`` and the two MatMuls of the VJP (for ``x`` and ``W``), never the
    forward ``Tanh`` or the forward MatMul."""
    case = seed_model(tf.float64)
    split = _split(case)
    stage = split.stages[0]
    forward = Counter(op.type for op in
                      stage.forward.get_concrete_function().graph.get_operations())
    backward = Counter(op.type for op in
                       stage.backward.get_concrete_function().graph.get_operations())
    assert forward["Tanh"] == 1 and forward["MatMul"] == 1
    assert backward["Tanh"] == 0
    assert backward["TanhGrad"] == 1
    assert backward["MatMul"] == 2
    # W is read again (never written), so it is not copied out of the forward as a residual
    assert backward["ReadVariableOp"] == 1
    assert [spec.shape.as_list() for spec in stage.residual_specs] == [[None, 10], [None, 5]]


def test_stage_backward_does_not_rerun_the_stage_side_effects():
    """The stage that counts calls (``steps.assign_add(1)``) moves the counter when its
    forward runs, and not when its backward runs."""
    case = counted_mlp()
    split = _split(case)
    steps = case.variables[-1]
    values = _stage_inputs(split, case.args(0))
    counting = [s for s in split.stages
                if any(op.type == "AssignAddVariableOp"
                       for op in s.forward.get_concrete_function().graph.get_operations())]
    assert len(counting) == 1
    stage = counting[0]
    steps.assign(0.0)
    outputs, residuals = stage.forward(*values[stage.index])
    assert float(steps.numpy()) == 1.0
    cotangents = [tf.ones_like(o) for o in outputs]
    stage.backward(residuals, cotangents)
    stage.backward(residuals, cotangents)
    assert float(steps.numpy()) == 1.0


@pytest.mark.parametrize("entry", ["value_and_gradients", "vjp"])
def test_side_effect_runs_exactly_once_per_step(entry):
    case = counted_mlp()
    split = _split(case)
    steps = case.variables[-1]
    steps.assign(0.0)
    args = case.args(0)
    for jit_compile in (False, True):
        if entry == "value_and_gradients":
            split.value_and_gradients(*args, jit_compile=jit_compile)
        else:
            split.vjp(args, tf.constant(1.0, tf.float64), jit_compile=jit_compile)
    assert float(steps.numpy()) == 2.0


# -- every stage compiles under XLA on its own -------------------------------------------------


@pytest.mark.parametrize("name", list(ALL_BUILDERS))
def test_every_stage_compiles_under_xla_on_its_own(name):
    rng = np.random.default_rng(5)
    with _built_split(name) as (case, split, _, _):
        for stage, values in zip(split.stages, _stage_inputs(split, case.args(0))):
            # (cond_between_cuts, stage 1: a None batch and a tf.cond whose gradient reads
            # branch intermediates; the stage is traced again per input shape.)
            forward, backward = stage.compiled(True)
            hlo = forward.experimental_get_compiler_ir(*values)(stage="hlo")
            assert "HloModule" in hlo, f"stage {stage.index} forward"
            outputs, residuals = forward(*values)
            ref_outputs, ref_residuals = stage.forward(*values)
            assert max_rel_error(outputs, ref_outputs) <= TOL
            cotangents = [tf.constant(normal(rng, o.shape, o.dtype)) if _is_float(o.dtype)
                          else tf.zeros_like(o) for o in outputs]
            hlo = backward.experimental_get_compiler_ir(residuals, cotangents)(stage="hlo")
            assert "HloModule" in hlo, f"stage {stage.index} backward"
            in_cots, var_grads = backward(residuals, cotangents)
            ref_in, ref_vars = stage.backward(ref_residuals, cotangents)
            pairs = [(a, b) for a, b in zip(in_cots, ref_in) if b is not None]
            assert all((a is None) == (b is None) for a, b in zip(in_cots, ref_in))
            assert max_rel_error([a for a, _ in pairs] + list(var_grads),
                                 [b for _, b in pairs] + list(ref_vars)) <= TOL


def test_a_cond_stage_with_a_none_batch_compiles_per_shape_under_xla():
    """A tf.cond stage whose gradient reads branch intermediates, with a None batch in the
    signature: XLA needs static shapes for TensorFlow's stand-ins of the other branch's
    values, so the stage is traced again per input shape; each batch size gets its own
    trace, and the backward finds the trace of the forward that made its residuals."""
    case = _build("cond_between_cuts")
    split = gsc.split(case.fn, case.input_signature, case.cuts)
    stage = split.stages[1]
    for args in (case.args(0), [tf.concat([a, a], 0) if a.shape.rank else a
                                for a in case.args(1)]):
        expected = split.value_and_gradients(*args, jit_compile=False)
        got = split.run_stages(args, jit_compile=True)
        assert max_rel_error([got[0]] + got[2], [expected[0]] + expected[1]) <= TOL
    assert len(stage._static_vjps) == 2
    forward, backward = stage.compiled(True)
    outputs, residuals = forward(*_stage_inputs(split, case.args(2))[1])
    odd = [tf.zeros([3] + r.shape.as_list()[1:], r.dtype) if r.shape.rank else r
           for r in residuals]
    with pytest.raises(gsc.GradSplitError, match="Run its forward first"):
        backward(odd, [tf.ones([3] + o.shape.as_list()[1:], o.dtype) for o in outputs])


def test_a_cond_stage_compiles_under_xla_on_its_own_with_a_static_batch():
    case = _build("cond_between_cuts")
    signature = [tf.TensorSpec([5] + s.shape.as_list()[1:], s.dtype) if s.shape.rank else s
                 for s in case.input_signature]
    split = gsc.split(case.fn, signature, case.cuts)
    args = case.args(0)
    expected = split.value_and_gradients(*args, jit_compile=False)
    got = split.run_stages(args, jit_compile=True)
    assert max_rel_error([got[0]] + got[2], [expected[0]] + expected[1]) <= TOL


def test_stage_compiled_returns_tf_functions_marked_for_xla():
    """``stage.compiled(True)`` gives tf.functions whose FunctionDefs XLA must compile."""
    case = seed_model(tf.float64)
    split = _split(case)
    for stage in split.stages:
        for fn in stage.compiled(True):
            assert isinstance(fn, tf.types.experimental.GenericFunction)
            fdef = fn.get_concrete_function().function_def
            assert fdef.attr["_XlaMustCompile"].b is True
        for fn in stage.compiled(False):
            fdef = fn.get_concrete_function().function_def
            assert not fdef.attr["_XlaMustCompile"].b


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("name", ["mlp", "skip_over_3", "integer_labels", "keras_small_functional"])
def test_stage_callers_give_exactly_what_compiled_gives(name, jit):
    """``stage.callers`` (flat, no per-call binding) runs the same programs as ``compiled``."""
    with _built_split(name) as (case, split, variables, start):
        env = dict(zip(split.arg_names, case.args(4)))
        for stage in split.stages:
            fast_forward, fast_backward = stage.callers(jit)
            forward, backward = stage.compiled(jit)
            inputs = [env[n] for n in stage.inputs]
            restore(variables, start)
            outs, res = forward(*inputs)
            restore(variables, start)
            fast_outs, fast_res = fast_forward(*inputs)
            for a, b in zip(outs + res, fast_outs + fast_res):
                np.testing.assert_array_equal(a.numpy(), b.numpy())
            cots = [tf.ones_like(o) for o in outs]
            slow = tf.nest.flatten(backward(res, cots))
            fast = tf.nest.flatten(fast_backward(*res, *cots))
            assert [t is None for t in slow] == [t is None for t in fast]
            for a, b in zip(slow, fast):
                if a is not None:
                    np.testing.assert_array_equal(a.numpy(), b.numpy())
            env.update(zip(stage.outputs, outs))


# -- driving the stages by hand ----------------------------------------------------------------


@pytest.mark.parametrize("name", list(ALL_BUILDERS))
def test_driving_stages_by_hand_equals_value_and_gradients_and_tape(name):
    with _built_split(name) as (case, split, variables, start):
        args = case.args(1)
        one = tf.ones([], split.output_specs[0].dtype)
        outputs, _, grads = drive_by_hand(split, args, [one])
        restore(variables, start)
        value, vg_grads = split.value_and_gradients(*args, jit_compile=False)
        restore(variables, start)
        ref_value, ref_grads = reference_value_and_grads(case.fn, variables, False)(*args)
    assert value_rel_error(outputs[0], value) <= TOL
    assert max_rel_error(grads, vg_grads) <= TOL
    assert value_rel_error(outputs[0], ref_value) <= TOL
    assert max_rel_error(grads, ref_grads) <= TOL


def test_driving_stages_by_hand_non_scalar_fn_equals_vjp_and_tape():
    case = seed_outputs_model(tf.float64)
    split = _split(case)
    args = case.args(2)
    cotangent = tf.constant(normal(np.random.default_rng(3), (6, 5), tf.float64))
    outputs, input_cotangents, grads = drive_by_hand(split, args, [cotangent])
    vjp_out, vjp_inputs, vjp_grads = split.vjp(args, cotangent, jit_compile=False)
    ref_out, ref_inputs, ref_grads = reference_vjp(case.fn, split.variables, False)(
        args, [cotangent])
    assert max_rel_error(outputs, [vjp_out]) <= TOL
    assert max_rel_error(input_cotangents + grads, vjp_inputs + vjp_grads) <= TOL
    assert max_rel_error(input_cotangents + grads, list(ref_inputs) + list(ref_grads)) <= TOL


def test_driving_stages_by_hand_integer_input_cotangent_is_none():
    case = integer_labels()
    split = _split(case)
    labels = split.arg_names[1]
    stage = next(s for s in split.stages if labels in s.inputs)
    values = _stage_inputs(split, case.args(0))[stage.index]
    outputs, residuals = stage.forward(*values)
    input_cotangents, _ = stage.backward(residuals, [tf.ones_like(o) for o in outputs])
    assert input_cotangents[stage.inputs.index(labels)] is None
    _, by_hand, _ = drive_by_hand(split, case.args(0), [tf.ones([], tf.float64)])
    assert by_hand[1] is None


@pytest.mark.parametrize("jit_compile", [True, False], ids=["xla", "graph"])
def test_run_stages_gives_the_tape_gradient_of_the_original_function(jit_compile):
    """``split.run_stages`` (each stage's own forward and backward programs, under XLA or not)
    against ``tf.GradientTape`` on the original function in graph mode, within 1e-12: on a
    program with arguments every stage reads whole (``scale``, ``shift``), a variable read by
    two stages (``W2``) and skips over cuts; three times, the weights and ``scale`` redrawn
    before each, so a stage holding a stale weight or argument fails."""
    case = skip_net("mean", replicated=True, batch=6, seed=5)
    split = gsc.split(case.fn, case.input_signature, case.cuts)
    assert len(split.stages) == 4
    rng = np.random.default_rng(6)
    x, y, _, shift = case.args(rng)
    for step in range(3):
        if step:
            move_weights(split.variables, rng)
        args = [x, y, tf.constant(rng.normal(), tf.float64), shift]
        reference = tape_value_and_gradients(case.fn, split.variables, args)
        outputs, _, grads = split.run_stages(args, jit_compile=jit_compile)
        assert_matches(outputs, grads, reference, TOL, f"step {step}")


def test_run_stages_makes_the_unit_cotangent_on_the_values_device():
    """The unit cotangent of a scalar program, made once and kept, is kept per device: run
    under one device and then another, each run's seed cotangent is on that run's device
    (not copied from the first's), and both runs give the tape's gradient."""
    case = skip_net("mean", replicated=True, batch=6, seed=5)
    split = gsc.split(case.fn, case.input_signature, case.cuts)
    args = case.args(np.random.default_rng(7))
    reference = tape_value_and_gradients(case.fn, split.variables, args)
    for device in ("/CPU:0", "/CPU:1"):
        with tf.device(device):
            outputs, _, grads = split.run_stages(args, jit_compile=False)
        assert_matches(outputs, grads, reference, TOL, device)
    made = split._unit_cotangents
    assert sorted(key[2].rsplit("/", 1)[-1] for key in made) == ["device:CPU:0",
                                                                  "device:CPU:1"]
    for (_, _, device), unit in made.items():
        assert unit.device == device and float(unit) == 1.0


# -- names line up -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ALL_BUILDERS))
def test_stage_inputs_are_arguments_or_earlier_stage_outputs(name):
    case = _build(name)
    split = _split(case)
    available = set(split.arg_names)
    for stage in split.stages:
        missing = [n for n in stage.inputs if n not in available]
        assert missing == [], f"stage {stage.index}"
        available |= set(stage.outputs)


@pytest.mark.parametrize("name", list(ALL_BUILDERS))
def test_last_stage_outputs_include_output_names(name):
    case = _build(name)
    split = _split(case)
    assert set(split.output_names) <= set(split.stages[-1].outputs)


@pytest.mark.parametrize("name", list(ALL_BUILDERS))
def test_stage_variables_are_a_subset_of_split_variables(name):
    case = _build(name)
    split = _split(case)
    ids = {id(v) for v in split.variables}
    for stage in split.stages:
        assert {id(v) for v in stage.variables} <= ids


@pytest.mark.parametrize("jit", [False, True])
def test_no_cuts_is_one_stage_equal_to_the_tape(jit):
    """``cuts=[]``: the whole program as one stage (its forward and its VJP), as a
    one-device pipeline or a baseline for the pipeline's own cost."""
    case = seed_model(tf.float64)
    split = gsc.split(case.fn, case.input_signature, [])
    assert len(split.stages) == 1 and list(split.stages[0].inputs) == list(split.arg_names)
    args = case.args(3)
    value, grads = split.value_and_gradients(*args, jit_compile=jit)
    ref_value, ref_grads = reference_value_and_grads(case.fn, split.variables, jit)(*args)
    assert value_rel_error(value, ref_value) <= TOL
    assert max_rel_error(grads, ref_grads) <= TOL
