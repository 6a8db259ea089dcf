"""The ``gradsplit`` command line.

Each subcommand is a ``Command``: a name, its help, a function that adds its arguments to
its ``argparse`` parser and a function that runs it and returns the exit status. A new
subcommand is one more entry in ``COMMANDS``; ``main`` gives every one of them the same
``--debug`` flag and the same error handling: a failure prints one line and exits non-zero,
never a traceback, unless ``--debug``.

Exit status: 0 success, 1 failure (the message says what failed), 2 wrong usage,
130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TextIO

# Only effective when TensorFlow is not imported yet (see _quiet_native_stderr for the rest).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

PROG = "gradsplit"


class UsageError(Exception):
    """The command line itself is wrong: one line on stderr, exit status 2."""


class CommandFailed(Exception):
    """The command ran and its answer is "no" (verify found a mismatch): one line, status 1."""


@dataclass(frozen=True)
class Command:
    """One subcommand: ``add_arguments(parser)`` declares its flags, ``run(args)`` runs it."""

    name: str
    help: str
    description: str
    epilog: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (raised, so ``main`` prints them)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


def _int_at_least(minimum: int, expected: str) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``minimum``, else "expected <expected>, got ..."."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_count = _int_at_least(0, "an integer >= 0")


# -- gradsplit demo ------------------------------------------------------------------------


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    from gradsplit_compiler.cli import demo as d  # names only; keeps this module light

    parser.add_argument("-o", "--output", metavar="PNG", default=d.DEFAULT_PICTURE,
                        help=f"where to write the picture of the graph (default: "
                             f"{d.DEFAULT_PICTURE} in the current directory)")
    parser.add_argument("--no-picture", action="store_true",
                        help="do not draw the graph (no matplotlib needed)")
    parser.add_argument("--cut-size", type=_positive_int, metavar="N",
                        help=f"elements of y, the tensor cut at: batch = N / width (default: "
                             f"{d.DEFAULT_CUT_SIZE}; {d.QUICK_CUT_SIZE} with --quick)")
    parser.add_argument("--width", type=_positive_int, metavar="N", default=d.DEFAULT_WIDTH,
                        help=f"units of the layer: columns of y and of W (default: "
                             f"{d.DEFAULT_WIDTH})")
    parser.add_argument("--features", type=_positive_int, metavar="N", default=d.FEATURES,
                        help=f"columns of x, rows of W (default: {d.FEATURES})")
    parser.add_argument("--repeats", type=_positive_int, metavar="N",
                        help=f"timed repeats per answer, the median is shown (default: "
                             f"{d.DEFAULT_REPEATS}; {d.QUICK_REPEATS} with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help=f"a small run for tests and a first look: --cut-size "
                             f"{d.QUICK_CUT_SIZE} --repeats {d.QUICK_REPEATS}")
    parser.add_argument("--per-scalar-limit", type=_count, metavar="N",
                        default=d.DEFAULT_PER_SCALAR_LIMIT,
                        help="skip answer (a), which builds one backward pass per element of "
                             f"y, above this cut size (default: {d.DEFAULT_PER_SCALAR_LIMIT})")
    parser.add_argument("--no-xla", action="store_true",
                        help="run every answer in graph mode instead of under XLA")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random data "
                                                            "(default: 0)")


def _run_demo(args: argparse.Namespace) -> int:
    from gradsplit_compiler.cli.demo import QUICK_CUT_SIZE, QUICK_REPEATS, DemoConfig, run_demo
    from gradsplit_compiler.errors import GradSplitError

    config = DemoConfig(
        width=args.width,
        features=args.features,
        picture=None if args.no_picture else args.output,
        jit_compile=not args.no_xla,
        per_scalar_limit=args.per_scalar_limit,
        seed=args.seed,
    )
    if args.quick:
        config.cut_size, config.repeats = QUICK_CUT_SIZE, QUICK_REPEATS
    if args.cut_size is not None:
        config.cut_size = args.cut_size
    if args.repeats is not None:
        config.repeats = args.repeats
    try:
        config.check()
    except GradSplitError as exc:
        raise UsageError(f"{PROG} demo: error: {exc}") from None
    if config.picture:
        directory = os.path.dirname(os.path.abspath(config.picture))
        if not os.path.isdir(directory):
            raise UsageError(f"{PROG} demo: error: -o {config.picture}: directory {directory} "
                             "does not exist")
    return run_demo(config)


DEMO = Command(
    name="demo",
    help="the seed problem solved end to end: cut at y, VJPs composed, checked and timed",
    description=(
        "The seed problem, h = x W + b; y = tanh(h); loss = mse(y, y0), traced, drawn, cut at "
        "y into two stages whose vector-Jacobian products (VJPs) compose to the gradient of "
        "loss under XLA; compared with the monolithic tf.GradientTape gradient in float32 "
        "and float64, and timed against the two answers the original question got: "
        "tf.gradients once per scalar of y, and GradientTape.jacobian."
    ),
    epilog=(
        "examples:\n"
        f"  {PROG} demo                        the default: a cut of 256 elements, about 20 s\n"
        f"  {PROG} demo --quick -o /tmp/g.png  a cut of 64 elements, picture in /tmp\n"
        f"  {PROG} demo --cut-size 2048 --per-scalar-limit 0\n"
        "                                      a bigger cut, without the per-scalar answer\n"
        f"  {PROG} demo --features 10 --width 5 --cut-size 160\n"
        "                                      W 10x5, batch 32"
    ),
    add_arguments=_demo_arguments,
    run=_run_demo,
)

# -- commands on a user's own program: inspect, split, verify, render ----------------------

EXAMPLE_FUNCTION = "gradsplit_compiler.examples:mlp_loss"
EXAMPLE_MODEL = "gradsplit_compiler.examples:mlp_model"

TARGET_HELP = """\
TARGET is one of
  package.module:function   a tf.function with an input_signature, or any callable with
                            --signature (path/to/file.py:function works too; the current
                            directory is searched); a keras.Model attribute is a model
  model.keras               a saved Keras model: fn(inputs..., labels) is the batch mean of
                            its compiled loss or --loss, of model(inputs, training=--training)
  SAVED_MODEL_DIR           a SavedModel's signature (--signature-key, default
                            serving_default); --loss as for a Keras model

Signatures (--signature, --labels): specs separated by commas, each [dims]:dtype, a dim an
integer or None (unknown, such as the batch), the dtype float32 when left out:
  --signature "[None,10]:float32,[None,5]:float32"    --labels "[None]:int32"
"""


def _cut_list(text: str) -> str | list[str]:
    names = [n.strip() for n in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"empty name in cut {text!r}")
    return names[0] if len(names) == 1 else names


def _target_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="TARGET",
                        help="module:function, a .keras file or a SavedModel directory "
                             "(see below)")
    group = parser.add_argument_group("describing TARGET")
    group.add_argument("--signature", metavar="SPECS",
                       help="the input signature of a function target, e.g. "
                            "\"[None,10]:float32,[None,5]:float32\"")
    group.add_argument("--loss", metavar="NAME",
                       help="a Keras loss applied to the model's output (mse, "
                            "categorical_crossentropy, ...; 'none': differentiate the outputs); "
                            "default: the loss the model was compiled with")
    group.add_argument("--labels", metavar="SPEC",
                       help="the labels' spec for --loss (default: the output's shape and "
                            "dtype; class indices for sparse_* losses)")
    group.add_argument("--training", action="store_true",
                       help="call the Keras model with training=True (batch statistics, "
                            "dropout); default training=False")
    group.add_argument("--signature-key", metavar="KEY",
                       help="the SavedModel signature to use (default: serving_default)")
    group.add_argument("--output-key", metavar="KEY",
                       help="the SavedModel output --loss applies to, when it has several")
    group.add_argument("--float64", action="store_true",
                       help="rebuild the Keras model in float64 (same weights), for a "
                            "definitive comparison")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress lines on stderr")


def _cut_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cut", metavar="NAME", action="append", type=_cut_list,
                        required=True, dest="cuts",
                        help="where to cut, once per cut in data-flow order: a tensor "
                             "('op:index' or 'op'), a gsc.mark name or a Keras layer; "
                             "'a,b' is one cut made of several tensors")


def _inspect_arguments(parser: argparse.ArgumentParser) -> None:
    _target_arguments(parser)
    parser.add_argument("--filter", metavar="PATTERN",
                        help="only tensors whose name matches this regular expression "
                             "(case-insensitive)")
    parser.add_argument("--layer", metavar="NAME",
                        help="only tensors of this Keras layer")
    parser.add_argument("--layer-outputs", action="store_true",
                        help="only the outputs of Keras layers")
    parser.add_argument("--all", action="store_true",
                        help="also tensors no argument flows into (constants, variable reads)")


def _split_arguments(parser: argparse.ArgumentParser) -> None:
    _target_arguments(parser)
    _cut_arguments(parser)
    parser.add_argument("--export", metavar="DIR",
                        help="write each stage's forward and backward as a SavedModel in "
                             "DIR/stage<k>/, and DIR/manifest.json saying how to drive them")


def _verify_arguments(parser: argparse.ArgumentParser) -> None:
    _target_arguments(parser)
    _cut_arguments(parser)
    parser.add_argument("--batch", type=_positive_int, default=8, metavar="N",
                        help="the size of every None dimension of the random inputs "
                             "(default: 8)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the random inputs (default: 0)")
    parser.add_argument("--no-xla", action="store_true",
                        help="run both sides in graph mode instead of under XLA")


def _render_arguments(parser: argparse.ArgumentParser) -> None:
    _target_arguments(parser)
    _cut_arguments(parser)
    parser.add_argument("-o", "--output", metavar="FILE", action="append",
                        dest="pictures", default=[],
                        help="the picture to write, .png or .svg (repeat for several)")
    parser.add_argument("--tensorboard", metavar="DIR",
                        help="also write the program and each stage's forward and backward "
                             "graphs for TensorBoard (tensorboard --logdir DIR)")
    parser.add_argument("--max-ops", type=_positive_int, metavar="N", default=150,
                        help="above N ops, ops are grouped by name scope (default: 150)")
    parser.add_argument("--dpi", type=_positive_int, metavar="N", default=100,
                        help="resolution of a PNG picture (default: 100)")


def _run(name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from gradsplit_compiler.cli import commands

        return getattr(commands, f"run_{name}")(args)

    run.__name__ = f"run_{name}"
    return run


def _target_command(name: str, help: str, description: str, examples: str,
                    add_arguments: Callable[[argparse.ArgumentParser], None]) -> Command:
    """A subcommand on a user's program: its epilog is ``examples`` then ``TARGET_HELP``;
    ``commands.run_<name>`` runs it."""
    return Command(name=name, help=help, description=description,
                   epilog="examples:\n" + examples + "\n\n" + TARGET_HELP,
                   add_arguments=add_arguments, run=_run(name))


INSPECT = _target_command(
    name="inspect",
    help="list the tensors of a program one can cut at, with shapes, layers and bytes",
    description=(
        "The tensors one can cut TARGET at: the floating-point tensors of its graph (nested "
        "function calls inlined) that its arguments flow into, in data-flow order, with op, "
        "dtype, static shape, the Keras layer they belong to ('(output)': the layer's "
        "output, which --cut can name by the layer's name) and bytes per example (the "
        "leading dimension being the batch)."
    ),
    examples=(
        f"  {PROG} inspect {EXAMPLE_FUNCTION}\n"
        f"  {PROG} inspect {EXAMPLE_MODEL} --loss categorical_crossentropy --layer-outputs\n"
        f"  {PROG} inspect {EXAMPLE_MODEL} --loss mse --layer bn\n"
        f"  {PROG} inspect my_model.keras --loss mse --filter relu      (your own model)"
    ),
    add_arguments=_inspect_arguments,
)

SPLIT = _target_command(
    name="split",
    help="cut a program into stages: the stage table, optionally exported as SavedModels",
    description=(
        "Cut TARGET at the named tensors into len(cuts)+1 stages and print, per stage, its "
        "ops, variables (parameters and bytes), inputs, outputs and residuals (the forward "
        "values its backward keeps, in bytes per example), and per cut the tensors crossing "
        "it. --export writes each stage as a SavedModel (forward and backward, loadable "
        "with tf.saved_model.load in another process) and a manifest.json saying how to "
        "drive them by hand."
    ),
    examples=(
        f"  {PROG} split {EXAMPLE_FUNCTION} --cut hidden\n"
        f"  {PROG} split {EXAMPLE_MODEL} --loss categorical_crossentropy --training \\\n"
        "      --cut dense1 --cut dense2 --export /tmp/mlp-stages\n"
        f"  {PROG} split my_model.keras --loss mse --cut block1_out,skip    (your own model;"
        " one cut of two tensors)"
    ),
    add_arguments=_split_arguments,
)

VERIFY = _target_command(
    name="verify",
    help="check on random inputs that the stages compose to the gradient of the whole",
    description=(
        "Split TARGET and compare the composed stages with tf.GradientTape on the whole "
        "program, on seeded random inputs (floats standard normal, integers in [0, 2), "
        "labels one-hot for categorical losses, 0/1 for binary ones, class indices for sparse "
        "ones), both under XLA unless --no-xla. Prints one row per variable; the exit status "
        "is 1 when any differs by more than the tolerance (float32 1e-5, float64 1e-12, "
        "relative). In float32, XLA and graph mode alone differ by more than that on deep "
        "networks with batch statistics: use --float64 for a definitive answer."
    ),
    examples=(
        f"  {PROG} verify {EXAMPLE_FUNCTION} --cut hidden\n"
        f"  {PROG} verify {EXAMPLE_MODEL} --loss categorical_crossentropy --training \\\n"
        "      --cut bn --float64 --batch 16\n"
        f"  {PROG} verify saved_model_dir --cut NAME --no-xla               (your own "
        "SavedModel)"
    ),
    add_arguments=_verify_arguments,
)

RENDER = _target_command(
    name="render",
    help="draw a program with its cuts: one colour per stage, crossing tensors in red",
    description=(
        "Split TARGET and draw its graph, one colour per stage, the tensors that cross a cut "
        "in red, arguments in white; above --max-ops ops, ops are grouped by name scope, so "
        "a ResNet50 stays readable. --tensorboard DIR writes the program (each stage on its "
        "own device '/job:stage<k>': colour by device) and every stage's forward and "
        "backward graphs as TensorBoard runs."
    ),
    examples=(
        f"  {PROG} render {EXAMPLE_FUNCTION} --cut hidden -o /tmp/mlp.svg\n"
        f"  {PROG} render {EXAMPLE_MODEL} --loss mse --cut dense1 --cut dense2 \\\n"
        "      -o /tmp/mlp.png --tensorboard /tmp/mlp-tb\n"
        f"  {PROG} render resnet50.keras --loss categorical_crossentropy \\\n"
        "      --cut conv3_block4_out -o resnet50.png                     (your own model)"
    ),
    add_arguments=_render_arguments,
)

# Subcommands, in the order `gradsplit --help` lists them.
COMMANDS: list[Command] = [DEMO, INSPECT, SPLIT, VERIFY, RENDER]


# -- the parser and main -------------------------------------------------------------------


def build_parser(commands: Sequence[Command] = COMMANDS,
                 argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``gradsplit`` parser. Given ``argv``, only the subcommand it names gets its
    arguments declared: declaring the demo's imports TensorFlow (its defaults live beside
    its code), and ``gradsplit --help`` or ``gradsplit inspect --help`` need not wait for
    that."""
    chosen = None
    if argv is not None:
        names = {c.name for c in commands}
        chosen = next((a for a in argv if a in names), "")
    # --debug is accepted before and after the subcommand; SUPPRESS keeps the subparser's
    # default from overwriting a --debug given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="on failure show the traceback, and show TensorFlow's own log")
    from gradsplit_compiler import __version__

    parser = _Parser(
        prog=PROG, parents=[common],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Cut a TensorFlow program into stages whose vector-Jacobian products "
                    "compose to the exact gradient.",
        epilog=(f"examples:\n  {PROG} demo            the seed problem, end to end\n"
                f"  {PROG} inspect {EXAMPLE_FUNCTION}\n"
                f"  {PROG} verify {EXAMPLE_FUNCTION} --cut hidden\n\n"
                f"Run '{PROG} COMMAND --help' for the options and examples of a command."),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    subparsers.required = True
    for command in commands:
        sub = subparsers.add_parser(
            command.name, parents=[common], help=command.help,
            description=textwrap.fill(command.description, 88), epilog=command.epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if chosen is None or chosen == command.name:
            command.add_arguments(sub)
        sub.set_defaults(run=command.run, command_parser=sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``gradsplit`` with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, unknown = build_parser(argv=argv).parse_known_args(argv)
        if unknown:  # reported by the subcommand's parser, so the hint names its --help
            args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    debug = getattr(args, "debug", False)
    with _quiet_native_stderr(enabled=not debug) as err:
        args.err = err  # progress lines and messages; fd 2 itself is muted
        try:
            return int(args.run(args) or 0)
        except UsageError as exc:
            print(exc, file=err)
            return 2
        except CommandFailed as exc:
            sys.stdout.flush()
            print(f"{PROG} {args.command}: {exc}", file=err)
            return 1
        except KeyboardInterrupt:
            print(f"\n{PROG} {args.command}: interrupted", file=err)
            return 130
        except BrokenPipeError:  # the reader (head, less) went away: nothing left to say
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
            return 0
        except Exception as exc:
            if debug:
                raise
            sys.stdout.flush()
            print(f"{PROG} {args.command}: error: {_one_line(exc)}", file=err)
            return 1


def _one_line(exc: BaseException) -> str:
    from gradsplit_compiler.errors import GradSplitError

    # The demo module imports TensorFlow: look its error type up only when it is loaded.
    demo = sys.modules.get(f"{__package__}.demo")
    expected = (GradSplitError, demo.DemoError) if demo is not None else (GradSplitError,)
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if len(text) > 300:
        text = text[:297] + "..."
    if isinstance(exc, expected):
        return text
    hint = " (rerun with --debug for the traceback)"
    return f"{type(exc).__name__}: {text}{hint}" if text else f"{type(exc).__name__}{hint}"


@contextmanager
def _quiet_native_stderr(enabled: bool) -> Iterator[TextIO]:
    """Send file descriptor 2 to /dev/null while a command runs; yield the real stderr.

    TensorFlow's C++ runtime logs to fd 2 (XLA service start, "Compiled cluster using XLA",
    oneDNN notices) and reads TF_CPP_MIN_LOG_LEVEL only when it is imported, which has
    already happened by the time ``main`` runs. The command's own messages go to the
    yielded stream; ``--debug`` keeps everything.
    """
    if not enabled:
        yield sys.stderr
        return
    sys.stderr.flush()
    saved = os.dup(2)
    real = os.fdopen(os.dup(saved), "w", buffering=1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    try:
        yield real
    finally:
        sys.stderr.flush()
        real.flush()
        os.dup2(saved, 2)
        os.close(saved)
        real.close()


if __name__ == "__main__":
    sys.exit(main())
