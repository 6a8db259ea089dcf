"""``gradsplit inspect``: the tensors of a program one can cut at, with shapes, layers and
bytes."""

from __future__ import annotations

import argparse
import re

from gradsplit_compiler.cli.common import (
    EXAMPLE_FUNCTION,
    EXAMPLE_MODEL,
    PROG,
    UsageError,
    load,
    signature_line,
    start_progress,
    target_command,
    target_command_line,
    trace_and_inline,
)

__all__ = ["INSPECT", "run_inspect"]


def _arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of its own (``target_command`` declares TARGET's and ``--cut``)."""
    parser.add_argument("--filter", metavar="PATTERN",
                        help="only tensors whose name matches this regular expression "
                             "(case-insensitive)")
    parser.add_argument("--layer", metavar="NAME",
                        help="only tensors of this Keras layer")
    parser.add_argument("--layer-outputs", action="store_true",
                        help="only the outputs of Keras layers")
    parser.add_argument("--all", action="store_true",
                        help="also tensors no argument flows into (constants, variable reads)")


def run_inspect(args: argparse.Namespace) -> int:
    pattern = None
    if args.filter is not None:
        try:
            pattern = re.compile(args.filter, re.IGNORECASE)
        except re.error as exc:
            raise UsageError(f"{PROG} inspect: error: --filter {args.filter!r} is not a "
                             f"regular expression: {exc}") from None
    progress = start_progress(args, 3)
    target = load(args, progress)

    from gradsplit_compiler.cli.tables import cuttable_tensors, tensor_table
    from gradsplit_compiler.errors import GradSplitError, close_names

    with progress.step("tracing and inlining nested calls"):
        program = trace_and_inline(target)
        listing = cuttable_tensors(program, include_all=args.all)
    rows = listing.rows
    if args.layer is not None:
        if args.layer not in listing.layers:
            close = close_names(args.layer, listing.layers)
            hint = f" Close names: {', '.join(close)}." if close else ""
            known = ", ".join(listing.layers[:8]) or "none: no Keras model"
            raise GradSplitError(f"--layer {args.layer!r} is not a layer of this program; "
                                 f"layers: {known}.{hint}")
        rows = [r for r in rows if r.layer == args.layer]
    if args.layer_outputs:
        rows = [r for r in rows if r.layer_output]
    if pattern is not None:
        rows = [r for r in rows if pattern.search(r.name)]

    print(target.description)
    print(signature_line(target))
    shown = "" if len(rows) == len(listing.rows) else f", {len(rows)} shown"
    print(f"{len(listing.rows)} tensors one can cut at{shown}:\n")
    if rows:
        print(tensor_table(rows))
    print()
    if listing.hidden:
        print(f"{listing.hidden} more floating-point tensors no argument flows into "
              "(constants, variable reads) are not shown; --all shows them.")
    layer_hint = (f", or a Keras layer ({', '.join(listing.layers[:6])}"
                  f"{', ...' if len(listing.layers) > 6 else ''})") if listing.layers else ""
    print(f"Cut with: {PROG} split {target_command_line(args)} --cut NAME, NAME a tensor "
          f"above{layer_hint}.")
    return 0


INSPECT = target_command(
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
    add_arguments=_arguments,
    run=run_inspect,
    cuts=False,
)
