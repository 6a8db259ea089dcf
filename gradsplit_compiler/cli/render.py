"""``gradsplit render``: draw a program with its cuts, one colour per stage, the tensors that
cross a cut in red; optionally its graphs for TensorBoard."""

from __future__ import annotations

import argparse
import os

from gradsplit_compiler.cli.common import (
    EXAMPLE_FUNCTION,
    EXAMPLE_MODEL,
    PROG,
    UsageError,
    load_and_split,
    positive_int,
    short_names,
    target_command,
)

__all__ = ["RENDER", "run_render"]


def _arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of its own (``target_command`` declares TARGET's and ``--cut``)."""
    parser.add_argument("-o", "--output", metavar="FILE", action="append",
                        dest="pictures", default=[],
                        help="the picture to write, .png or .svg (repeat for several)")
    parser.add_argument("--tensorboard", metavar="DIR",
                        help="also write the program and each stage's forward and backward "
                             "graphs for TensorBoard (tensorboard --logdir DIR)")
    parser.add_argument("--max-ops", type=positive_int, metavar="N", default=150,
                        help="above N ops, ops are grouped by name scope (default: 150)")
    parser.add_argument("--dpi", type=positive_int, metavar="N", default=100,
                        help="resolution of a PNG picture (default: 100)")


def run_render(args: argparse.Namespace) -> int:
    from gradsplit_compiler.show.render import picture_format

    if not args.pictures and args.tensorboard is None:
        raise UsageError(f"{PROG} render: error: give -o FILE.png|FILE.svg, --tensorboard "
                         "DIR, or both")
    for path in args.pictures:
        try:
            picture_format(path)
        except ValueError as exc:
            raise UsageError(f"{PROG} render: error: -o {path}: {exc}") from None
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise UsageError(f"{PROG} render: error: -o {path}: directory {directory} does "
                             "not exist")
    progress, target, s = load_and_split(args, len(args.pictures)
                                         + (args.tensorboard is not None))

    from gradsplit_compiler.show.render import layout_graph, render_split

    print(target.description)
    labels = short_names(s, target) if args.pictures else {}
    for path in args.pictures:
        with progress.step(f"drawing {path}"):
            render_split(s, path, max_ops=args.max_ops, labels=labels, dpi=args.dpi)
    if args.pictures:
        pic = layout_graph(s, max_ops=args.max_ops)
        ops = sum(d["ops"] for _, d in pic.nodes(data=True) if d["stage"] is not None)
        grouped = ("" if pic.graph["scope_depth"] is None
                   else f", grouped by name scope at depth {pic.graph['scope_depth']}"
                        + (" and chains merged" if pic.graph["chains"] else ""))
        hidden = pic.graph["hidden_ops"]
        print(f"Wrote {', '.join(args.pictures)}: {len(s.stages)} stages, {ops + hidden} ops "
              f"in {len(pic)} boxes{grouped} ({hidden} constants, no-ops and variable reads not "
              "drawn).")
    if args.tensorboard is not None:
        from gradsplit_compiler.show.tensorboard_graphs import write_graphs

        with progress.step(f"writing TensorBoard graphs to {args.tensorboard}"):
            runs = write_graphs(s, args.tensorboard)
        print(f"Wrote TensorBoard runs {', '.join(runs)} to {args.tensorboard} (the program "
              f"coloured by stage: 'Color: Device'); view with tensorboard --logdir "
              f"{args.tensorboard}.")
    return 0


RENDER = target_command(
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
    add_arguments=_arguments,
    run=run_render,
)
