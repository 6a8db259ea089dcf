"""Random programs and random valid cut lists, for the property-based tests.

A program is plain data (``Program``, a tuple of ``Op``), so hypothesis can draw and shrink
it and a failing example prints as a literal that a regression test can paste back::

    Program(args=(3,), variables=((3, 2),), ops=(Op('matmul', (0,), var=0, marks=(True,)),
            Op('tanh', (1,))), outputs=(2,), scalar=True)

Values are numbered: the arguments first (``0 .. len(args) - 1``), then every output of
every op in order, so value numbers are a topological order of the data flow. Every value
is a float64 matrix ``[rows, width]`` with ``rows`` the batch (``"B"``) or 1 (after a mean
over the batch), so adds and products broadcast. ``build`` turns a program into a
``tf.function`` whose values ``gsc.mark`` names ``m<value>``; ``cut_lists`` draws cut
lists that docs/api.md says are valid: marks in data-flow order, every stage doing some
work, several tensors of one cut on parallel branches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import tensorflow as tf
from hypothesis import assume
from hypothesis import strategies as st
from models import normal

import gradsplit_compiler as gsc

DTYPE = tf.float64
BATCH = 3
MAX_WIDTH = 6
WIDTHS = (1, 2, 3, 4)

# kind -> number of value inputs
ARITY = {
    "matmul": 1, "bias": 1, "frozen_bias": 1, "tanh": 1, "sin": 1, "mean": 1, "split": 1,
    "while": 1, "count": 1, "add": 2, "mul": 2, "concat": 2, "cond": 2, "case": 2,
}
# Kinds the strategies draw, with repeats as weights.
KINDS = ("matmul", "matmul", "matmul", "bias", "frozen_bias", "tanh", "tanh", "sin", "mean",
         "split", "add", "add", "mul", "concat", "cond", "while", "case", "count")
CONTROL_FLOW_KINDS = ("cond", "while", "case")
PLAIN_KINDS = tuple(k for k in KINDS if k not in CONTROL_FLOW_KINDS)


@dataclass(frozen=True)
class Op:
    """One op of a random program.

    ``inputs`` are value numbers; ``var`` the variable it reads (matmul weight, bias, the
    weight inside a ``tf.cond`` branch, a ``tf.switch_case`` branch (``case``) or a
    ``tf.while_loop`` body); ``extra``: the split point of ``split``, the axis of ``mean``,
    the trip count of ``while``; ``extra2``: the ``maximum_iterations`` of ``while`` (at
    least the trip count); ``call``: the branch or body calls a nested ``tf.function``
    (drawn only when asked: split refuses those, naming the op). ``count`` is a side
    effect: it adds the mean of its input to the program's counter variable and multiplies
    its input by the counter's new value (a read after the write). Ops with the same
    ``nest >= 0`` run, one after the other, inside one nested ``tf.function``. ``marks``:
    per output, whether ``gsc.mark`` names it.
    """

    kind: str
    inputs: tuple[int, ...]
    var: int = -1
    extra: int = 0
    extra2: int = 0
    nest: int = -1
    marks: tuple[bool, ...] = ()
    call: bool = False

    @property
    def num_outputs(self) -> int:
        return 2 if self.kind == "split" else 1


@dataclass(frozen=True)
class Program:
    """``args``: argument widths; ``variables``: their shapes; ``outputs``: value numbers
    (``scalar``: ``fn`` returns a weighted sum of their mean squares, else the tuple of
    them); ``dead_reads``: variables read whose value nothing uses; ``static_batch``: the
    signature fixes the batch size instead of ``None``."""

    args: tuple[int, ...]
    variables: tuple[tuple[int, ...], ...]
    ops: tuple[Op, ...]
    outputs: tuple[int, ...]
    scalar: bool = True
    dead_reads: tuple[int, ...] = ()
    static_batch: bool = False

    def value_producers(self) -> list[tuple[str, int]]:
        """Per value: ``("arg", i)`` or ``("op", j)``."""
        found = [("arg", i) for i in range(len(self.args))]
        for j, op in enumerate(self.ops):
            found += [("op", j)] * op.num_outputs
        return found

    def op_values(self) -> list[list[int]]:
        """Per op, the value numbers of its outputs."""
        first = len(self.args)
        found = []
        for op in self.ops:
            found.append(list(range(first, first + op.num_outputs)))
            first += op.num_outputs
        return found

    def marked_values(self) -> list[int]:
        return [v for op, values in zip(self.ops, self.op_values())
                for v, m in zip(values, op.marks) if m]

    def shapes(self) -> list[tuple[str, int]]:
        """Per value, ``(rows, width)`` with rows ``"B"`` or ``"1"``."""
        shapes = [("B", w) for w in self.args]
        for op in self.ops:
            shapes += _output_shapes(op, shapes, self.variables)
        return shapes


def _broadcast(a: tuple[str, int], b: tuple[str, int]) -> tuple[str, int] | None:
    if a[1] != b[1] and 1 not in (a[1], b[1]):
        return None
    rows = "B" if "B" in (a[0], b[0]) else "1"
    return rows, max(a[1], b[1])


def _output_shapes(op: Op, shapes, variables) -> list[tuple[str, int]]:
    a = shapes[op.inputs[0]]
    if op.kind == "matmul":
        return [(a[0], variables[op.var][1])]
    if op.kind in ("add", "mul"):
        return [_broadcast(a, shapes[op.inputs[1]])]
    if op.kind == "concat":
        return [(a[0], a[1] + shapes[op.inputs[1]][1])]
    if op.kind == "split":
        return [(a[0], op.extra), (a[0], a[1] - op.extra)]
    if op.kind == "mean":
        return [("1", a[1]) if op.extra == 0 else (a[0], 1)]
    return [a]


# -- building the tf.function ------------------------------------------------------------------


@dataclass
class Built:
    """A program made real: ``fn``, its signature, its variables, argument values and the
    graph names of marked top-level values (``mark_names``: the mark's own tensor,
    ``inner_names``: the tensor it wraps), filled when ``fn`` is traced."""

    program: Program
    fn: Callable
    input_signature: list
    variables: list
    counter: tf.Variable | None = None
    mark_names: dict = field(default_factory=dict)
    inner_names: dict = field(default_factory=dict)

    def args(self, seed: int = 0) -> list[tf.Tensor]:
        rng = np.random.default_rng(seed + 1000)
        return [tf.constant(normal(rng, (BATCH, w), DTYPE)) for w in self.program.args]

    def output_cotangents(self, seed: int = 0) -> list[tf.Tensor]:
        """Random cotangents shaped like ``fn``'s outputs on ``args(seed)``."""
        rng = np.random.default_rng(seed + 2000)
        outputs = tf.nest.flatten(self.fn(*self.args(seed)))
        return [tf.constant(normal(rng, tuple(t.shape), DTYPE)) for t in outputs]


def build(program: Program, seed: int = 0) -> Built:
    """The program as a ``tf.function`` reading fresh variables (seeded values)."""
    rng = np.random.default_rng(seed)
    variables = [tf.Variable(normal(rng, shape, DTYPE, 0.5), name=f"v{i}")
                 for i, shape in enumerate(program.variables)]
    if any(op.kind == "count" for op in program.ops):
        variables.append(tf.Variable(tf.constant(0.25, DTYPE), name="counter"))
    built = Built(program, None, [], variables,
                  counter=variables[-1] if len(variables) > len(program.variables) else None)
    op_values = program.op_values()

    def emit_op(j: int, env: dict, top_level: bool) -> None:
        op = program.ops[j]
        outs = _emit(op, [env[v] for v in op.inputs], variables)
        for v, t, marked in zip(op_values[j], outs, op.marks or (False,) * len(outs)):
            if marked:
                inner = t
                t = gsc.mark(t, f"m{v}")
                if top_level:
                    built.inner_names[v] = inner.name
                    built.mark_names[v] = t.name
            env[v] = t

    def run(env: dict) -> None:
        j = 0
        while j < len(program.ops):
            nest = program.ops[j].nest
            if nest < 0:
                emit_op(j, env, True)
                j += 1
                continue
            group = [j]
            while group[-1] + 1 < len(program.ops) and program.ops[group[-1] + 1].nest == nest:
                group.append(group[-1] + 1)
            _run_nested(group, env, emit_op, program, op_values)
            j = group[-1] + 1

    def fn(*args):
        for i in program.dead_reads:
            variables[i].read_value()
        env = dict(enumerate(args))
        run(env)
        outs = [env[v] for v in program.outputs]
        if program.scalar:
            terms = [0.5 * (k + 1) * tf.reduce_mean(tf.square(t)) for k, t in enumerate(outs)]
            return tf.add_n(terms)
        return tuple(outs)

    built.fn = tf.function(fn, autograph=False)
    rows = BATCH if program.static_batch else None
    built.input_signature = [tf.TensorSpec([rows, w], DTYPE) for w in program.args]
    return built


def _run_nested(group: list[int], env: dict, emit_op, program: Program, op_values) -> None:
    produced = [v for j in group for v in op_values[j]]
    reads = sorted({v for j in group for v in program.ops[j].inputs} - set(produced))

    @tf.function(autograph=False)
    def nested(*values):
        inner = dict(zip(reads, values))
        for j in group:
            emit_op(j, inner, False)
        return [inner[v] for v in produced]

    env.update(zip(produced, nested(*[env[v] for v in reads])))


def _emit(op: Op, ins: Sequence[tf.Tensor], variables: list) -> list[tf.Tensor]:
    a = ins[0]
    kind = op.kind
    if kind == "matmul":
        return [tf.matmul(a, variables[op.var])]
    if kind == "bias":
        return [a + variables[op.var]]
    if kind == "frozen_bias":
        return [a + tf.stop_gradient(variables[op.var])]
    if kind == "tanh":
        return [tf.tanh(a)]
    if kind == "sin":
        return [tf.sin(a)]
    if kind == "mean":
        return [tf.reduce_mean(a, axis=op.extra, keepdims=True)]
    if kind == "split":
        width = a.shape[-1]
        return list(tf.split(a, [op.extra, width - op.extra], axis=1))
    if kind == "count":
        return [a * variables[-1].assign_add(tf.reduce_mean(a))]
    if kind == "add":
        return [a + ins[1]]
    if kind == "mul":
        return [a * ins[1]]
    if kind == "concat":
        return [tf.concat([a, ins[1]], axis=1)]
    if kind in CONTROL_FLOW_KINDS:
        W = variables[op.var]

        def layer(h):
            return tf.tanh(tf.matmul(h, W))

        def other(h):
            return tf.sin(h) * h

        def third(h):
            return h * W[0]

        if op.call:  # every branch calls, so the branch taken does
            layer, other, third = (tf.function(f, autograph=False) for f in (layer, other, third))
    if kind == "cond":
        return [tf.cond(tf.reduce_mean(ins[1]) > 0.0, lambda: layer(a), lambda: other(a))]
    if kind == "case":
        index = tf.cast(tf.reduce_mean(ins[1]) > 0.0, tf.int32) + tf.cast(
            tf.reduce_mean(a) > 0.0, tf.int32)
        return [tf.switch_case(index, [lambda: layer(a), lambda: other(a), lambda: third(a)])]
    if kind == "while":
        trips = op.extra

        def body(i, h):
            return i + 1, layer(h) + 0.5 * h

        return [tf.while_loop(lambda i, h: i < trips, body, [tf.constant(0), a],
                              maximum_iterations=op.extra2)[1]]
    raise ValueError(f"unknown op kind {kind!r}")


# -- the data-flow graph, and which cut lists are valid ----------------------------------------


def flow_graph(program: Program) -> nx.DiGraph:
    """Nodes ``("arg", i)``, ``("op", j)`` (ops that compute), ``("mark", v)`` (identities)
    and ``"out"``; an edge for every data use."""
    g = nx.DiGraph()
    producers = program.value_producers()
    marked = set(program.marked_values())

    def source(v: int):
        return ("mark", v) if v in marked else producers[v]

    for i in range(len(program.args)):
        g.add_node(("arg", i))
    for j, op in enumerate(program.ops):
        g.add_node(("op", j))
        for v in op.inputs:
            g.add_edge(source(v), ("op", j))
    for v in marked:
        g.add_edge(producers[v], ("mark", v))
    g.add_node("out")
    for v in program.outputs:
        g.add_edge(source(v), "out")
    return g


def _ancestors(g: nx.DiGraph, nodes) -> set:
    found = set(nodes)
    for n in nodes:
        found |= nx.ancestors(g, n)
    return found


def _computes(nodes, program: Program) -> bool:
    return any(n[0] == "op" for n in nodes if n != "out") or (
        "out" in nodes and program.scalar)


def cut_nodes(program: Program, cut: Sequence) -> list:
    """The flow-graph nodes a cut of ``(value, style)`` pairs names."""
    producers = program.value_producers()
    return [producers[v] if style == "inner" else ("mark", v) for v, style in cut]


def valid_prefix(program: Program, cuts: list) -> list:
    """The longest valid cut list made of ``cuts`` in order, dropping the groups that name a
    tensor the outputs do not depend on, break data-flow order or leave a stage with nothing
    to compute."""
    g = flow_graph(program)
    kept: list = []
    done: set = set()
    for cut in cuts:
        nodes = cut_nodes(program, cut)
        if any(not nx.has_path(g, n, "out") for n in nodes):
            continue  # the outputs do not depend on it: split refuses such a cut
        if any(nx.has_path(g, later, earlier) for later in nodes
               for earlier in [n for c in kept for n in cut_nodes(program, c)]):
            continue
        if any(n in done for n in nodes):
            continue  # already computed by an earlier stage: this stage would be empty
        stage = _ancestors(g, nodes) - done
        if not _computes(stage, program):
            continue
        kept.append(cut)
        done |= stage
    while kept:
        live = _ancestors(g, ["out"])
        earlier = _ancestors(g, [n for c in kept for n in cut_nodes(program, c)])
        if _computes(live - earlier, program):
            break
        kept.pop()
        # the stages before are unchanged: each only depends on the cuts before it
    return kept


def cut_names(built: Built, cuts: list) -> list:
    """The caller's names for a cut list of ``(value, style)`` pairs: a ``gsc.mark`` name,
    the mark's graph tensor name, or the graph name of the tensor the mark wraps; a cut of
    one tensor is a plain name, of several a list."""
    named = []
    for cut in cuts:
        names = []
        for v, style in cut:
            if style == "graph":
                names.append(built.mark_names[v])
            elif style == "inner":
                name = built.inner_names[v]
                names.append(name[:-2] if name.endswith(":0") else name)
            else:
                names.append(f"m{v}")
        named.append(names[0] if len(names) == 1 else names)
    return named


# -- strategies --------------------------------------------------------------------------------


@st.composite
def programs(draw, max_ops: int = 7, control_flow: bool = True, nested: bool = True,
             scalar: bool | None = None, static_batch: bool | None = None,
             calls_in_bodies: bool = False) -> Program:
    """A random program with at least one mark a valid cut list can use."""
    args = tuple(draw(st.lists(st.sampled_from(WIDTHS[1:]), min_size=1, max_size=2)))
    variables: list[tuple[int, ...]] = []
    shapes: list[tuple[str, int]] = [("B", w) for w in args]
    ops: list[Op] = []
    n_ops = draw(st.integers(2, max_ops))
    kinds = KINDS if control_flow else PLAIN_KINDS
    nest, nest_id = -1, 0

    def variable(shape: tuple[int, ...]) -> int:
        same = [i for i, s in enumerate(variables) if s == shape]
        if same and draw(st.booleans()):
            return draw(st.sampled_from(same))  # a shared variable
        variables.append(shape)
        return len(variables) - 1

    def pick_value() -> int:
        last = len(shapes) - 1
        return draw(st.one_of(st.just(last), st.integers(0, last)))

    for _ in range(n_ops):
        kind = draw(st.sampled_from(kinds))
        a = pick_value()
        ins = (a,)
        var = extra = extra2 = 0
        sa = shapes[a]
        if ARITY[kind] == 2:
            b = pick_value()
            sb = shapes[b]
            if kind in ("add", "mul") and _broadcast(sa, sb) is None:
                kind = "tanh"
            elif kind == "concat" and (sa[0] != sb[0] or sa[1] + sb[1] > MAX_WIDTH):
                kind = "sin"
            else:
                ins = (a, b)
        if kind == "split" and sa[1] < 2:
            kind = "tanh"
        if kind == "matmul":
            var = variable((sa[1], draw(st.sampled_from(WIDTHS))))
        elif kind in ("bias", "frozen_bias"):
            var = variable((sa[1],))
        elif kind in CONTROL_FLOW_KINDS:
            var = variable((sa[1], sa[1]))
        elif kind == "split":
            extra = draw(st.integers(1, sa[1] - 1))
        elif kind == "mean":
            extra = draw(st.integers(0, 1))
        if kind == "while":
            extra = draw(st.integers(1, 3))
            extra2 = extra + draw(st.integers(0, 1))
        if kind in ("bias", "frozen_bias", "tanh", "sin", "mean", "split", "matmul", "while",
                    "count"):
            ins = (a,)
        if nested:
            if nest >= 0 and draw(st.booleans()):
                pass  # stays in the nested function
            elif draw(st.integers(0, 4)) == 0:
                nest, nest_id = nest_id, nest_id + 1
            else:
                nest = -1
        has_var = kind in ("matmul", "bias", "frozen_bias", *CONTROL_FLOW_KINDS)
        call = kind in CONTROL_FLOW_KINDS and calls_in_bodies and draw(st.booleans())
        op = Op(kind, ins, var=var if has_var else -1, extra=extra, extra2=extra2, nest=nest,
                call=call)
        outs = _output_shapes(op, shapes, variables)
        marks = tuple(draw(st.booleans()) for _ in outs)
        ops.append(Op(op.kind, op.inputs, op.var, op.extra, op.extra2, op.nest, marks, call))
        shapes += outs

    used = {v for op in ops for v in op.inputs}
    sinks = [v for v in range(len(args), len(shapes)) if v not in used]
    extra_outputs = draw(st.lists(st.integers(len(args), len(shapes) - 1), max_size=1))
    outputs = tuple(dict.fromkeys(sinks[-3:] + extra_outputs))
    is_scalar = draw(st.booleans()) if scalar is None else scalar
    dead_reads = ()
    if variables and draw(st.integers(0, 3)) == 0:
        dead_reads = (draw(st.integers(0, len(variables) - 1)),)
    program = Program(
        args=args, variables=tuple(variables), ops=tuple(ops), outputs=outputs,
        scalar=is_scalar, dead_reads=dead_reads,
        static_batch=draw(st.booleans()) if static_batch is None else static_batch,
    )
    assume(program.marked_values())
    return program


@st.composite
def cut_lists(draw, program: Program, names: bool = True) -> list:
    """A valid cut list for ``program``: a list of cuts, each a list of ``(value, style)``.

    Marks are taken in value order (a topological order); neighbours on parallel branches
    may join into one cut of several tensors. ``style`` is how the caller names the
    tensor: ``"mark"`` (its ``gsc.mark`` name), ``"graph"`` (the mark's graph tensor name)
    or ``"inner"`` (the graph name of the tensor it wraps); the graph styles only for
    marks outside nested functions.
    """
    g = flow_graph(program)
    marked = program.marked_values()
    nested = {v for op, values in zip(program.ops, program.op_values())
              for v in values if op.nest >= 0}
    chosen = [v for v in marked if draw(st.booleans())] or [draw(st.sampled_from(marked))]
    cuts: list[list] = []
    for v in chosen:
        styles = ["mark"] if (v in nested or not names) else ["mark", "mark", "graph", "inner"]
        entry = (v, draw(st.sampled_from(styles)))
        parallel = cuts and all(
            not nx.has_path(g, n, m) and not nx.has_path(g, m, n)
            for n in cut_nodes(program, [entry]) for m in cut_nodes(program, cuts[-1])
        )
        if parallel and draw(st.booleans()):
            cuts[-1].append(entry)
        else:
            cuts.append([entry])
    cuts = valid_prefix(program, cuts)
    assume(cuts)
    return cuts


@st.composite
def cases(draw, **kwargs) -> tuple[Program, list]:
    program = draw(programs(**kwargs))
    return program, draw(cut_lists(program))


# -- checking a split of a random program against the tape ------------------------------------

RTOL = 1e-12
ROUNDING_ULPS = 64  # as gsc.verify: rounding on entries that are zero in exact arithmetic


def contract_errors(got: Sequence, ref: Sequence) -> list[tuple[float, float, bool]]:
    """Per tensor ``(max abs error, relative error, ok)`` as docs/api.md measures them.

    The relative error divides by ``max|reference|`` of that tensor, floored at 1e-6 of the
    largest reference entry over all of them; an error within ``ROUNDING_ULPS`` ulps of that
    largest entry is rounding on an entry that is zero in exact arithmetic (``gsc.verify``
    allows the same).
    """
    assert len(got) == len(ref), (len(got), len(ref))
    got = [np.asarray(g, np.float64) for g in got]
    ref = [np.asarray(r, np.float64) for r in ref]
    scale = max([float(np.max(np.abs(r))) for r in ref if r.size] + [0.0])
    floor = 1e-6 * scale
    rounding = ROUNDING_ULPS * float(np.finfo(np.float64).eps) * scale
    rows = []
    for g, r in zip(got, ref):
        assert g.shape == r.shape, (g.shape, r.shape)
        if not r.size:
            rows.append((0.0, 0.0, True))
            continue
        abs_err = float(np.max(np.abs(g - r)))
        rel_err = abs_err / max(float(np.max(np.abs(r))), floor, 1e-300)
        rows.append((abs_err, rel_err, rel_err <= RTOL or abs_err <= rounding))
    return rows


def assert_close(got: Sequence, ref: Sequence, what: str) -> None:
    rows = contract_errors(got, ref)
    bad = [(i, a, r) for i, (a, r, ok) in enumerate(rows) if not ok]
    assert not bad, f"{what}: (index, abs error, rel error) beyond {RTOL:g}: {bad}"


def assert_split_equals_tape(built: Built, cuts: list, jit_compile: bool = False) -> None:
    """Split ``built`` at ``cuts`` (caller's names) and hold every route through the stages
    to the tape gradient of the original ``fn``: ``value_and_gradients`` (scalar ``fn``) or
    ``vjp`` with random cotangents, and ``run_stages``, all compiled as ``jit_compile``
    says, against a tape reference compiled the same way."""
    from models import reference_value_and_grads, reference_vjp

    split = gsc.split(built.fn, built.input_signature, cuts)
    assert len(split.stages) == len(cuts) + 1
    available = set(split.arg_names)
    for stage in split.stages:
        assert set(stage.inputs) <= available, f"stage {stage.index} reads unknown tensors"
        available |= set(stage.outputs)
    assert set(split.output_names) <= set(split.stages[-1].outputs)
    ids = {id(v) for v in split.variables}
    assert ids == {id(v) for v in built.variables}, "split.variables != variables fn reads"

    args = built.args()
    variables = list(split.variables)
    # Under XLA the reference traces fn's Python body afresh inside the compiled function,
    # as gsc.verify does: the graph-mode trace keeps tf.cond intermediates as Optionals,
    # which XLA cannot compile.
    reference_fn = built.fn.python_function if jit_compile else built.fn
    cotangents = None if built.program.scalar else built.output_cotangents()
    start = [v.numpy() for v in variables]  # after output_cotangents ran fn
    try:
        if cotangents is None:
            ref_value, ref_grads = reference_value_and_grads(
                reference_fn, variables, jit_compile)(*args)
            ref_flat, ref_inputs = [ref_value], []
        else:
            ref_outputs, ref_inputs, ref_grads = reference_vjp(
                reference_fn, variables, jit_compile)(args, cotangents)
            ref_flat = tf.nest.flatten(ref_outputs)
        ref_after = [v.numpy() for v in variables]
        routes = (["value_and_gradients"] if cotangents is None else ["vjp"]) + ["run_stages"]
        for route in routes:
            for v, value in zip(variables, start):
                v.assign(value)
            if route == "value_and_gradients":
                value, grads = split.value_and_gradients(*args, jit_compile=jit_compile)
                outputs, input_cotangents = [value], []
            else:
                run = split.vjp if route == "vjp" else split.run_stages
                outputs, input_cotangents, grads = run(args, cotangents,
                                                       jit_compile=jit_compile)
            if cotangents is None:
                input_cotangents = []
            assert_close(tf.nest.flatten(outputs), ref_flat, f"{route} outputs")
            assert_close(list(grads) + list(input_cotangents),
                         list(ref_grads) + list(ref_inputs),
                         f"{route} variable gradients and input cotangents")
            assert_close([v.numpy() for v in variables], ref_after,
                         f"{route} variable updates")
    finally:
        for v, value in zip(variables, start):
            v.assign(value)
