"""The ``gradsplit`` command line: the parser and ``main``.

Each subcommand is a ``Command`` (``cli.common``) in a module of its own (``cli.demo``,
``cli.inspect_cmd``, ``cli.split``, ``cli.verify``, ``cli.render``; no module takes a
standard-library name, which would shadow it when a module here is run by path): a name, its
help, a function that adds its arguments to its ``argparse`` parser and a function that runs
it and returns the exit status. A new subcommand is one more module and one more entry in
``COMMANDS``; ``main`` gives every one of them the same ``--debug`` flag and the same error
handling: a failure prints one line and exits non-zero, never a traceback, unless
``--debug``.

Exit status: 0 success, 1 failure (the message says what failed), 2 wrong usage,
130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TextIO

from gradsplit_compiler import TENSORFLOW_PROBLEM, __version__
from gradsplit_compiler.cli.common import (
    EXAMPLE_FUNCTION,
    PROG,
    Command,
    CommandFailed,
    UsageError,
)
from gradsplit_compiler.cli.demo import DEMO
from gradsplit_compiler.cli.inspect_cmd import INSPECT
from gradsplit_compiler.cli.render import RENDER
from gradsplit_compiler.cli.split import SPLIT
from gradsplit_compiler.cli.verify import VERIFY
from gradsplit_compiler.errors import GradSplitError

__all__ = ["COMMANDS", "build_parser", "main"]

# Only effective when TensorFlow is not imported yet (see _quiet_native_stderr for the rest).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Subcommands, in the order `gradsplit --help` lists them.
COMMANDS: list[Command] = [DEMO, INSPECT, SPLIT, VERIFY, RENDER]


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (raised, so ``main`` prints them)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


# -- the parser and main -------------------------------------------------------------------


def build_parser(commands: Sequence[Command] = COMMANDS) -> argparse.ArgumentParser:
    """The ``gradsplit`` parser: every command of ``commands`` with its arguments. Declaring
    them imports nothing heavy (no TensorFlow), so ``gradsplit --help`` is instant."""
    # --debug is accepted before and after the subcommand; SUPPRESS keeps the subparser's
    # default from overwriting a --debug given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="on failure show the traceback, and show TensorFlow's own log")
    parser = _Parser(
        prog=PROG, parents=[common],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Cut a TensorFlow program into stages whose vector-Jacobian products "
                    "compose to the exact gradient.",
        epilog=(f"examples:\n  {PROG} demo            the seed problem, end to end\n"
                f"  {PROG} inspect {EXAMPLE_FUNCTION}\n"
                f"  {PROG} verify {EXAMPLE_FUNCTION} --cut hidden\n\n"
                f"Run '{PROG} COMMAND --help' for the options and examples of a command."
                + _tensorflow_note()),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    subparsers.required = True
    for command in commands:
        sub = subparsers.add_parser(
            command.name, parents=[common], help=command.help,
            description=textwrap.fill(command.description, 88),
            epilog=(command.epilog or "") + _tensorflow_note(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        command.add_arguments(sub)
        sub.set_defaults(run=command.run, command_parser=sub)
    return parser


def _tensorflow_note() -> str:
    """What to install, when the commands cannot run here (``--help`` still works)."""
    if TENSORFLOW_PROBLEM is None:
        return ""
    return "\n\n" + textwrap.fill(f"The commands cannot run here: {TENSORFLOW_PROBLEM}", 88,
                                  break_on_hyphens=False)


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
    if TENSORFLOW_PROBLEM is not None:
        print(f"{PROG} {args.command}: error: {TENSORFLOW_PROBLEM}", file=sys.stderr)
        return 1
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
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if len(text) > 300:
        text = text[:297] + "..."
    if isinstance(exc, GradSplitError):  # the demo's DemoError is one too
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
