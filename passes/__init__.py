"""The pass pipeline, declared as data: named phases, the order they need, and why.

A pass is a function ``Program -> Program`` (see ``gradsplit_compiler.ir.program``).
``gsc.split`` runs the whole pipeline; a caller that needs only part of it asks for a phase
by name (``pipeline("analysis")``, ``run(program, "analysis")``) instead of slicing a list.

Phases
------
``analysis`` (``inline_calls``, ``refresh_shapes``)
    What the program is: a flat top-level graph whose every op has dtypes and shapes. It
    reads no cut, so a planner (``auto_split``, ``gradsplit inspect``) can choose cuts on its
    result and then run the next phase on the same program.
``cutting`` (``resolve_cuts``, ``partition``)
    Where the cuts are and which stage each op runs in: reads ``program.cut_specs``, fills
    ``program.cuts``, the ``stage`` attributes, ``program.stages`` and ``boundaries``.

``ORDER`` lists each ordering constraint with its reason; the phases above meet them all,
and ``check_order`` refuses a list of passes that breaks one (``gsc.split(passes=...)``
calls it before tracing):

>>> import passes
>>> for c in passes.ORDER:
...     print(f"{c.before} before {c.after}")
inline_calls before refresh_shapes
inline_calls before resolve_cuts
refresh_shapes before resolve_cuts
resolve_cuts before partition

What a pass may assume and must keep
------------------------------------
Each pass module's docstring says what holds after it ("Guarantees afterwards:"), and its
``check`` function, attached to the pass as ``ensures``, tests it (in full, or the
strongest property that is cheap to test, as the docstring says). A pass may assume the
guarantees of every pass before it and must keep them: after each pass the pass manager
checks the IR's invariants and the guarantees of every pass that has run, and names the
pass that broke one (after a pass of this package that declares ``preserves_edges``, the
invariants only a change of nodes or edges can break are not tested again; a caller's pass
always gets them all). So a pass of one's own that adds ops after ``analysis`` must give them
dtypes before it returns (calling ``refresh_shapes(program)`` at its end does: it looks only
at nodes without), and nothing after ``partition`` may leave a live op without a stage.

Example
-------
Ask for a phase by name; add a pass of one's own after a phase:

>>> import tensorflow as tf
>>> import gradsplit_compiler as gsc
>>> import passes
>>> [phase.name for phase in passes.PHASES]
['analysis', 'cutting']
>>> [p.__name__ for p in passes.pipeline("analysis")]
['inline_calls', 'refresh_shapes']
>>> sizes = []
>>> def count_ops(program):
...     sizes.append(program.graph.number_of_nodes())
...     return program
>>> f = tf.function(lambda x: tf.reduce_sum(gsc.mark(tf.tanh(x), "y") ** 2))
>>> pipeline = passes.pipeline(after={"analysis": [count_ops]})
>>> [p.__name__ for p in pipeline]
['inline_calls', 'refresh_shapes', 'count_ops', 'resolve_cuts', 'partition']
>>> s = gsc.split(f, [tf.TensorSpec([None])], cuts=["y"], passes=pipeline)
>>> len(sizes), len(s.stages)
(1, 2)

``gsc.split(..., passes={"analysis": [count_ops]})`` says the same. A pass may also run
right after one pass of a phase, by that pass's name: ``after={"resolve_cuts": [...]}``
runs once the cuts are resolved and before ``partition`` places the ops.

A pass that breaks a guarantee is named, with the pass whose guarantee it broke and the op
(a pass of one's own raises ``UserPassError``, a ``GradSplitError``):

>>> def unstage(program):
...     program.graph.nodes["gsc.mark.y."]["stage"] = None
...     return program
>>> gsc.split(f, [tf.TensorSpec([None])], cuts=["y"],
...           passes=passes.pipeline(after={"cutting": [unstage]}))
Traceback (most recent call last):
    ...
passes.manager.UserPassError: The 'unstage' pass broke the guarantee of
the 'partition' pass (after [...]): live node 'gsc.mark.y.' has no stage; ...
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from gradsplit_compiler.errors import GradSplitError
from gradsplit_compiler.ir.program import Program

# The modules, not their functions: ``passes.partition`` stays the module of that name.
from passes import inline_calls as _inline_calls
from passes import partition as _partition
from passes import refresh_shapes as _refresh_shapes
from passes import resolve_cuts as _resolve_cuts
from passes.manager import Pass, UserPassError, pass_name, run_passes

__all__ = ["ORDER", "PHASES", "Constraint", "Phase", "UserPassError", "check_order",
           "pipeline", "run"]


@dataclass(frozen=True)
class Phase:
    """A named run of passes; ``purpose`` says what holds once it has run."""

    name: str
    passes: tuple[Pass, ...]
    purpose: str


@dataclass(frozen=True)
class Constraint:
    """Pass ``before`` must run before pass ``after`` (by name), for ``reason``."""

    before: str
    after: str
    reason: str


PHASES: tuple[Phase, ...] = (
    Phase("analysis", (_inline_calls.inline_calls, _refresh_shapes.refresh_shapes),
          "a flat top-level graph, every op with dtypes and shapes; no cut read yet"),
    Phase("cutting", (_resolve_cuts.resolve_cuts, _partition.partition),
          "the cuts resolved to tensors, every live op in a stage, the stage plans"),
)

ORDER: tuple[Constraint, ...] = (
    Constraint("inline_calls", "refresh_shapes",
               "inlined body ops arrive without dtypes; refresh_shapes derives them on the "
               "graph inlining leaves"),
    Constraint("inline_calls", "resolve_cuts",
               "a cut may name a tensor of a nested tf.function, which is a top-level op "
               "only once its call is inlined"),
    Constraint("refresh_shapes", "resolve_cuts",
               "resolve_cuts refuses integer, boolean and resource cuts by the dtypes "
               "refresh_shapes records"),
    Constraint("resolve_cuts", "partition",
               "partition places ops around program.cuts, the graph tensors resolve_cuts "
               "finds"),
)


def _phase(name: str) -> Phase:
    for phase in PHASES:
        if phase.name == name:
            return phase
    raise GradSplitError(f"{name!r} is not a phase of the pass pipeline; the phases are "
                         f"{', '.join(repr(p.name) for p in PHASES)}.")


def pipeline(*phases: str, after: Mapping[str, Sequence[Pass]] | None = None) -> list[Pass]:
    """The passes of the named phases (all when none is named), in the declared order.

    ``after`` maps a phase name, or the name of one pass of the pipeline
    (``"resolve_cuts"``), to passes of one's own, run right after that phase or pass.
    """
    wanted = {_phase(name).name for name in phases} or {p.name for p in PHASES}
    extra = dict(after or {})
    own = {pass_name(p) for phase in PHASES if phase.name in wanted for p in phase.passes}
    for name in extra:
        if name in own:
            continue
        if name not in {p.name for p in PHASES} and any(
                pass_name(q) == name for phase in PHASES for q in phase.passes):
            raise GradSplitError(f"after={{{name!r}: ...}} names a pass this pipeline does "
                                 f"not run; it runs {sorted(own)}.")
        if _phase(name).name not in wanted:
            raise GradSplitError(f"after={{{name!r}: ...}} names a phase this pipeline does "
                                 f"not run; it runs {sorted(wanted)}.")
        if isinstance(extra[name], Callable):
            raise GradSplitError(f"after={{{name!r}: ...}} must map to a list of passes; "
                                 f"got one pass: write after={{{name!r}: [pass]}}.")
    result: list[Pass] = []
    for phase in PHASES:
        if phase.name in wanted:
            for p in phase.passes:
                result += [p, *extra.get(pass_name(p), ())]
            result += list(extra.get(phase.name, ()))
    return result


def check_order(passes: Sequence[Pass]) -> None:
    """Raise ``GradSplitError`` when two passes of ``passes`` break a constraint of ``ORDER``
    (constraints on passes that are absent are not checked)."""
    names = [pass_name(p) for p in passes]
    for c in ORDER:
        if c.before in names and c.after in names:
            if names.index(c.before) > names.index(c.after):
                raise GradSplitError(
                    f"the pass {c.before!r} must run before {c.after!r}: {c.reason}. "
                    f"The passes given run in the order {names}."
                )


def run(program: Program, *phases: str) -> Program:
    """Run the named phases (all when none is named) on ``program``.

    The guarantees of the phases declared before the first one named are taken as in force
    (that phase may assume them) and are checked after every pass, as its own are.
    """
    order = [p.name for p in PHASES]
    first = min((order.index(_phase(name).name) for name in phases), default=0)
    earlier = [p for phase in PHASES[:first] for p in phase.passes]
    return run_passes(program, pipeline(*phases), established=earlier)
