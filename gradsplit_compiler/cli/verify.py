"""``gradsplit verify``: check on random inputs that the stages compose to the gradient of
the whole program."""

from __future__ import annotations

import argparse

from gradsplit_compiler.cli.common import (
    EXAMPLE_FUNCTION,
    EXAMPLE_MODEL,
    PROG,
    CommandFailed,
    load_and_split,
    positive_int,
    signature_line,
    target_command,
)

__all__ = ["VERIFY", "run_verify"]


def _arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of its own (``target_command`` declares TARGET's and ``--cut``)."""
    parser.add_argument("--batch", type=positive_int, default=8, metavar="N",
                        help="the size of every None dimension of the random inputs "
                             "(default: 8)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the random inputs (default: 0)")
    parser.add_argument("--no-xla", action="store_true",
                        help="run both sides in graph mode instead of under XLA")


def run_verify(args: argparse.Namespace) -> int:
    progress, target, s = load_and_split(args, 1)

    from gradsplit_compiler.cli.targets import random_args
    from gradsplit_compiler.core.verify import verify

    args_values = random_args(target, args.batch, args.seed)
    mode = "graph mode" if args.no_xla else "XLA"
    with progress.step(f"verifying on random inputs ({mode}: compiles both sides)"):
        report = verify(s, *args_values, jit_compile=not args.no_xla)
    print(target.description)
    print(signature_line(target))
    labels = "" if target.labels is None else f", labels {target.labels_kind}"
    print(f"{len(s.stages)} stages; random inputs: every None dimension {args.batch}, seed "
          f"{args.seed}{labels}\n")
    print(report)
    if not report.ok:
        raise CommandFailed(
            f"MISMATCH: the composed stages differ from tf.GradientTape by "
            f"{report.max_rel_error:.2e} (relative; tolerance {report.rtol:.0e})"
        )
    return 0


VERIFY = target_command(
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
    add_arguments=_arguments,
    run=run_verify,
)
