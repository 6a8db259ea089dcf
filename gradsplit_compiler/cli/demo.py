"""``gradsplit demo``: the seed problem, solved end to end and measured.

``h = x W + b; y = tanh(h); loss = mse(y, y0)``, cut at ``y``: the gradient of ``loss`` by
parts against ``tf.GradientTape`` and the two answers the original question got. This
module is the command (its flags, their defaults, ``DemoConfig``) and imports no
TensorFlow, so ``gradsplit demo --help`` is instant; ``cli.seed_problem`` does the work.

Example
-------
>>> from gradsplit_compiler.cli.demo import DemoConfig
>>> DemoConfig(cut_size=64).batch
4
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from gradsplit_compiler.cli.common import PROG, Command, UsageError, count, positive_int
from gradsplit_compiler.errors import GradSplitError

__all__ = ["DEMO", "DemoConfig", "run_demo"]

FEATURES = 256
DEFAULT_WIDTH = 16
DEFAULT_CUT_SIZE = 256
DEFAULT_REPEATS = 7
DEFAULT_PER_SCALAR_LIMIT = 512
DEFAULT_PICTURE = "gradsplit-demo.png"
QUICK_CUT_SIZE = 64
QUICK_REPEATS = 3


@dataclass
class DemoConfig:
    """What ``gradsplit demo`` runs. ``cut_size`` = elements of ``y`` = batch * width."""

    cut_size: int = DEFAULT_CUT_SIZE
    width: int = DEFAULT_WIDTH
    features: int = FEATURES
    repeats: int = DEFAULT_REPEATS
    picture: str | None = DEFAULT_PICTURE
    jit_compile: bool = True
    per_scalar_limit: int = DEFAULT_PER_SCALAR_LIMIT
    seed: int = 0

    @property
    def batch(self) -> int:
        return self.cut_size // self.width

    def check(self) -> None:
        """Raise ``GradSplitError`` for sizes the demo cannot run, in the flags' own terms."""
        for flag, value in (("--cut-size", self.cut_size), ("--width", self.width),
                            ("--features", self.features), ("--repeats", self.repeats)):
            if value < 1:
                raise GradSplitError(f"{flag} must be a positive integer; got {value}.")
        if self.cut_size % self.width:
            lower = max(self.width, self.cut_size // self.width * self.width)
            raise GradSplitError(
                f"--cut-size {self.cut_size} must be a multiple of --width {self.width} "
                f"(y is batch x width); try --cut-size {lower}."
            )


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", metavar="PNG", default=DEFAULT_PICTURE,
                        help=f"where to write the picture of the graph (default: "
                             f"{DEFAULT_PICTURE} in the current directory)")
    parser.add_argument("--no-picture", action="store_true",
                        help="do not draw the graph (no matplotlib needed)")
    parser.add_argument("--cut-size", type=positive_int, metavar="N",
                        help=f"elements of y, the tensor cut at: batch = N / width (default: "
                             f"{DEFAULT_CUT_SIZE}; {QUICK_CUT_SIZE} with --quick)")
    parser.add_argument("--width", type=positive_int, metavar="N", default=DEFAULT_WIDTH,
                        help=f"units of the layer: columns of y and of W (default: "
                             f"{DEFAULT_WIDTH})")
    parser.add_argument("--features", type=positive_int, metavar="N", default=FEATURES,
                        help=f"columns of x, rows of W (default: {FEATURES})")
    parser.add_argument("--repeats", type=positive_int, metavar="N",
                        help=f"timed repeats per answer, the median is shown (default: "
                             f"{DEFAULT_REPEATS}; {QUICK_REPEATS} with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help=f"a small run for tests and a first look: --cut-size "
                             f"{QUICK_CUT_SIZE} --repeats {QUICK_REPEATS}")
    parser.add_argument("--per-scalar-limit", type=count, metavar="N",
                        default=DEFAULT_PER_SCALAR_LIMIT,
                        help="skip answer (a), which builds one backward pass per element of "
                             f"y, above this cut size (default: {DEFAULT_PER_SCALAR_LIMIT})")
    parser.add_argument("--no-xla", action="store_true",
                        help="run every answer in graph mode instead of under XLA")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random data "
                                                            "(default: 0)")


def run_demo(args: argparse.Namespace) -> int:
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
    from gradsplit_compiler.cli.seed_problem import run_seed_problem  # imports TensorFlow

    return run_seed_problem(config)


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
        f"  {PROG} demo                        the default: a cut of 256 elements, about 35 s\n"
        f"  {PROG} demo --quick -o /tmp/g.png  a cut of 64 elements, picture in /tmp\n"
        f"  {PROG} demo --cut-size 2048 --per-scalar-limit 0\n"
        "                                      a bigger cut, without the per-scalar answer\n"
        f"  {PROG} demo --features 10 --width 5 --cut-size 160\n"
        "                                      W 10x5, batch 32"
    ),
    add_arguments=_arguments,
    run=run_demo,
)
