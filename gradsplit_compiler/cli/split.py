"""``gradsplit split``: cut a program into stages; the stage table, optionally the stages
exported as SavedModels."""

from __future__ import annotations

import argparse
import os

from gradsplit_compiler.cli.common import (
    EXAMPLE_FUNCTION,
    EXAMPLE_MODEL,
    PROG,
    UsageError,
    load_and_split,
    short_names,
    signature_line,
    target_command,
)

__all__ = ["SPLIT", "run_split"]


def _arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of its own (``target_command`` declares TARGET's and ``--cut``)."""
    parser.add_argument("--export", metavar="DIR",
                        help="write each stage's forward and backward as a SavedModel in "
                             "DIR/stage<k>/, and DIR/manifest.json saying how to drive them")


def run_split(args: argparse.Namespace) -> int:
    if args.export is not None and os.path.isfile(args.export):
        raise UsageError(f"{PROG} split: error: --export {args.export} is a file; give a "
                         "directory (created if missing)")
    stages = len(args.cuts) + 1
    progress, target, s = load_and_split(args, 0 if args.export is None else stages)

    from gradsplit_compiler.cli.tables import cut_table, split_summary, stage_table
    from gradsplit_compiler.util import human_bytes

    if args.export is not None:
        from gradsplit_compiler.core.export import export_split

        export_split(s, args.export, description=target.description,
                     arg_labels=target.arg_labels, progress=progress.step)
    summary = split_summary(s, short_names(s, target))
    params = sum(int(v.shape.num_elements()) for v in s.variables)
    nbytes = sum(int(v.shape.num_elements()) * v.dtype.size for v in s.variables)
    print(target.description)
    print(signature_line(target))
    print(f"{len(s.stages)} stages, {len(s.variables)} variables ({params} parameters, "
          f"{human_bytes(nbytes)})\n")
    print(stage_table(summary))
    print()
    print(cut_table(summary))
    if args.export is not None:
        from gradsplit_compiler.core.export import MANIFEST

        print(f"\nExported {len(s.stages)} stages to {args.export}: "
              f"{', '.join(f'stage{k}/' for k in range(len(s.stages)))} (SavedModels with "
              f"forward and backward) and {MANIFEST} (what to feed each, in which order).")
    return 0


SPLIT = target_command(
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
    add_arguments=_arguments,
    run=run_split,
)
