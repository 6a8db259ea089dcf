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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


# -- gradsplit demo ------------------------------------------------------------------------


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    from . import demo as d  # noqa: PLC0415 - names only; keeps this module light

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
    from .demo import QUICK_CUT_SIZE, QUICK_REPEATS, DemoConfig, run_demo
    from .errors import GradSplitError

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

# Subcommands, in the order `gradsplit --help` lists them. `inspect`, `split`, `verify` and
# `render` (working on a user's own program) are to come as further entries.
COMMANDS: list[Command] = [DEMO]


# -- the parser and main -------------------------------------------------------------------


def build_parser(commands: Sequence[Command] = COMMANDS) -> argparse.ArgumentParser:
    # --debug is accepted before and after the subcommand; SUPPRESS keeps the subparser's
    # default from overwriting a --debug given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="on failure show the traceback, and show TensorFlow's own log")
    from . import __version__

    parser = _Parser(
        prog=PROG, parents=[common],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Cut a TensorFlow program into stages whose vector-Jacobian products "
                    "compose to the exact gradient.",
        epilog=(f"examples:\n  {PROG} demo            the seed problem, end to end\n"
                f"  {PROG} demo --help     its options\n\n"
                f"Run '{PROG} COMMAND --help' for the options of a command."),
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
        command.add_arguments(sub)
        sub.set_defaults(run=command.run, command_parser=sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``gradsplit`` with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, unknown = build_parser().parse_known_args(argv)
        if unknown:  # reported by the subcommand's parser, so the hint names its --help
            args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    debug = getattr(args, "debug", False)
    with _quiet_native_stderr(enabled=not debug) as err:
        try:
            return int(args.run(args) or 0)
        except UsageError as exc:
            print(exc, file=err)
            return 2
        except KeyboardInterrupt:
            print(f"\n{PROG} {args.command}: interrupted", file=err)
            return 130
        except Exception as exc:
            if debug:
                raise
            sys.stdout.flush()
            print(f"{PROG} {args.command}: error: {_one_line(exc)}", file=err)
            return 1


def _one_line(exc: BaseException) -> str:
    from .demo import DemoError
    from .errors import GradSplitError

    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if len(text) > 300:
        text = text[:297] + "..."
    if isinstance(exc, (GradSplitError, DemoError)):
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
