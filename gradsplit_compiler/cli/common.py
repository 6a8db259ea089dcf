"""What the ``gradsplit`` subcommands share: the ``Command`` record, the errors ``main``
turns into exit statuses, argument types, the TARGET and ``--cut`` flags, and the steps
every command on a user's program takes (load the TARGET, split it), each a progress line.

Imports run one way: ``parser`` -> the command modules (``demo``, ``inspect``, ``split``,
``verify``, ``render``) -> ``common``; this module imports no command. It must stay cheap to
import (``gradsplit --help`` reads every command's help): TensorFlow, and whatever imports
it, is imported inside the steps that need it.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gradsplit_compiler.cli.progress import Progress

__all__ = [
    "EXAMPLE_FUNCTION", "EXAMPLE_MODEL", "PROG", "TARGET_HELP", "Command", "CommandFailed",
    "UsageError", "count", "int_at_least", "load", "load_and_split",
    "positive_int", "short_names", "signature_line", "start_progress", "target_command",
    "target_command_line", "trace_and_inline",
]

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


# -- argument types ------------------------------------------------------------------------


def int_at_least(minimum: int, expected: str) -> Callable[[str], int]:
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


positive_int = int_at_least(1, "a positive integer")
count = int_at_least(0, "an integer >= 0")


# -- commands on a user's own program: TARGET and --cut ------------------------------------

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


def target_command(name: str, help: str, description: str, examples: str,
                   add_arguments: Callable[[argparse.ArgumentParser], None],
                   run: Callable[[argparse.Namespace], int], *, cuts: bool = True) -> Command:
    """A subcommand on a user's program: TARGET and the flags describing it, ``--cut`` when
    ``cuts``, then its own flags (``add_arguments``); its epilog is ``examples`` then
    ``TARGET_HELP``."""

    def declare(parser: argparse.ArgumentParser) -> None:
        _target_arguments(parser)
        if cuts:
            _cut_arguments(parser)
        add_arguments(parser)

    return Command(name=name, help=help, description=description,
                   epilog="examples:\n" + examples + "\n\n" + TARGET_HELP,
                   add_arguments=declare, run=run)


def _target_arguments(parser: argparse.ArgumentParser) -> None:
    """TARGET and the flags that describe it, and ``--quiet``."""
    parser.add_argument("target", metavar="TARGET",
                        help="module:function, a .keras file or a SavedModel directory "
                             "(see below)")
    group = parser.add_argument_group("describing TARGET")
    described = [
        group.add_argument("--signature", metavar="SPECS",
                           help="the input signature of a function target, e.g. "
                                "\"[None,10]:float32,[None,5]:float32\""),
        group.add_argument("--loss", metavar="NAME",
                           help="a Keras loss applied to the model's output (mse, "
                                "categorical_crossentropy, ...; 'none': differentiate the "
                                "outputs); default: the loss the model was compiled with"),
        group.add_argument("--labels", metavar="SPEC",
                           help="the labels' spec for --loss (default: the output's shape and "
                                "dtype; class indices for sparse_* losses)"),
        group.add_argument("--training", action="store_true",
                           help="call the Keras model with training=True (batch statistics, "
                                "dropout); default training=False"),
        group.add_argument("--signature-key", metavar="KEY",
                           help="the SavedModel signature to use (default: serving_default)"),
        group.add_argument("--output-key", metavar="KEY",
                           help="the SavedModel output --loss applies to, when it has several"),
        group.add_argument("--float64", action="store_true",
                           help="rebuild the Keras model in float64 (same weights), for a "
                                "definitive comparison"),
    ]
    # what target_command_line repeats: (flag, dest, takes no value)
    parser.set_defaults(target_flags=[(a.option_strings[0], a.dest, a.nargs == 0)
                                      for a in described])
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress lines on stderr")


def _cut_list(text: str) -> str | list[str]:
    names = [n.strip() for n in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"empty name in cut {text!r}")
    return names[0] if len(names) == 1 else names


def _cut_arguments(parser: argparse.ArgumentParser) -> None:
    """``--cut NAME``, once per cut: ``args.cuts``, each a name or a list of names."""
    parser.add_argument("--cut", metavar="NAME", action="append", type=_cut_list,
                        required=True, dest="cuts",
                        help="where to cut, once per cut in data-flow order: a tensor "
                             "('op:index' or 'op'), a gsc.mark name or a Keras layer; "
                             "'a,b' is one cut made of several tensors")


# -- the steps: load the TARGET, trace or split it -----------------------------------------
# Each is a progress line on ``args.err``. TensorFlow is imported in the first, so the time
# the import takes is shown.


def start_progress(args: argparse.Namespace, total: int) -> Progress:
    """``total`` progress lines on ``args.err`` (stderr), none with ``--quiet``."""
    return Progress(total, getattr(args, "err", sys.stderr), enabled=not args.quiet)


def load(args: argparse.Namespace, progress: Progress):
    """Import TensorFlow, then load ``args.target`` as its flags describe (two steps)."""
    with progress.step("importing TensorFlow"):
        import tensorflow  # noqa: F401 - the import is the step

    from gradsplit_compiler.cli.targets import FlagError, load_target

    try:
        with progress.step(f"loading {args.target}"):
            return load_target(
                args.target, signature=args.signature, loss=args.loss, labels=args.labels,
                training=args.training, signature_key=args.signature_key,
                output_key=args.output_key, float64=args.float64,
            )
    except FlagError as exc:
        raise UsageError(f"{PROG} {args.command}: error: {exc}") from None


# Which passes the commands run: inspect runs the analysis passes only, the others split.


def trace_and_inline(target: Any):
    """The program ``inspect`` lists: traced, nested calls inlined, shapes refreshed."""
    import passes
    from gradsplit_compiler.frontend.capture import capture

    return passes.run(capture(target.fn, target.input_signature), "analysis")


def _split_at_cuts(args: argparse.Namespace, target: Any, progress: Progress):
    """``target`` split at ``args.cuts`` (one step)."""
    from gradsplit_compiler.core.split import split

    with progress.step(f"tracing and splitting at {_cuts_text(args.cuts)}"):
        return split(target.fn, target.input_signature, args.cuts)


def load_and_split(args: argparse.Namespace, later_steps: int = 0):
    """``(progress, target, split)``: TARGET loaded and split at ``args.cuts``, three steps
    of ``3 + later_steps``."""
    progress = start_progress(args, 3 + later_steps)
    target = load(args, progress)
    return progress, target, _split_at_cuts(args, target, progress)


def _cuts_text(cuts: list) -> str:
    return " | ".join(c if isinstance(c, str) else ",".join(c) for c in cuts)


# -- what the answers print ----------------------------------------------------------------


def target_command_line(args: argparse.Namespace) -> str:
    """TARGET and the flags that described it, as typed again in a shell: what another
    command needs to load the same program (``gradsplit inspect``'s "Cut with:" line)."""
    words = [args.target]
    for flag, dest, switch in args.target_flags:
        value = getattr(args, dest)
        if switch and value:
            words.append(flag)
        elif not switch and value is not None:
            words += [flag, value]
    return shlex.join(words)


def signature_line(target: Any) -> str:
    """``arguments: x [None,6]:float64, ...``: the target's arguments and their specs."""
    import tensorflow as tf

    from gradsplit_compiler.cli.targets import format_spec

    specs = tf.nest.flatten(list(target.input_signature))
    return "arguments: " + ", ".join(
        f"{label} {format_spec(spec)}" for label, spec in zip(target.arg_labels, specs)
    )


def short_names(split: Any, target: Any) -> dict[str, str]:
    """Short names of the tensors of ``split``: arguments, outputs, Keras layers, marks."""
    from gradsplit_compiler.cli.tables import tensor_labels
    from gradsplit_compiler.frontend.capture import as_tf_function
    from gradsplit_compiler.frontend.keras_layers import layer_outputs

    _, models = as_tf_function(target.fn)
    models = models if isinstance(models, list) else [models] if models else []
    layers = layer_outputs(split.graph, models)
    for model in models:  # a model's output is better called by its last layer's name
        layers.pop(model.name, None)
    return tensor_labels(split, target.arg_labels, layers)
