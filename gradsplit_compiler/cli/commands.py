"""What ``gradsplit inspect``, ``split``, ``verify`` and ``render`` do, once parsed.

``cli.py`` declares the flags; each ``run_<command>(args)`` here loads the TARGET, does its
work with progress lines on ``args.err`` (one per step, flushed, with the time it took) and
prints its answer on stdout. TensorFlow is imported inside the first step, so ``--help``
stays fast and the time the import takes is shown.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any

from gradsplit_compiler.cli.parser import PROG, CommandFailed, UsageError
from gradsplit_compiler.cli.progress import Progress


def _progress(args: argparse.Namespace, total: int) -> Progress:
    return Progress(total, getattr(args, "err", sys.stderr), enabled=not args.quiet)


def _load(args: argparse.Namespace, progress: Progress):
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


def _cuts_text(cuts: list) -> str:
    return " | ".join(c if isinstance(c, str) else ",".join(c) for c in cuts)


def _split(args: argparse.Namespace, target: Any, progress: Progress):
    from gradsplit_compiler.core.split import split

    with progress.step(f"tracing and splitting at {_cuts_text(args.cuts)}"):
        return split(target.fn, target.input_signature, args.cuts)


def _signature_line(target: Any) -> str:
    import tensorflow as tf

    from gradsplit_compiler.cli.targets import format_spec

    specs = tf.nest.flatten(list(target.input_signature))
    return "arguments: " + ", ".join(
        f"{label} {format_spec(spec)}" for label, spec in zip(target.arg_labels, specs)
    )


# -- inspect -------------------------------------------------------------------------------


def run_inspect(args: argparse.Namespace) -> int:
    pattern = None
    if args.filter is not None:
        try:
            pattern = re.compile(args.filter, re.IGNORECASE)
        except re.error as exc:
            raise UsageError(f"{PROG} inspect: error: --filter {args.filter!r} is not a "
                             f"regular expression: {exc}") from None
    progress = _progress(args, 3)
    target = _load(args, progress)

    import passes
    from gradsplit_compiler.cli.tables import cuttable_tensors, tensor_table
    from gradsplit_compiler.errors import GradSplitError, close_names
    from gradsplit_compiler.frontend.capture import capture

    with progress.step("tracing and inlining nested calls"):
        program = capture(target.fn, target.input_signature)
        program = passes.run(program, "analysis")
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
    print(_signature_line(target))
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
    print(f"Cut with: {PROG} split {args.target} --cut NAME, NAME a tensor above{layer_hint}.")
    return 0


# -- split ---------------------------------------------------------------------------------


def _labels(split: Any, target: Any) -> dict[str, str]:
    from gradsplit_compiler.cli.tables import tensor_labels
    from gradsplit_compiler.frontend.capture import as_tf_function
    from gradsplit_compiler.frontend.keras_layers import layer_outputs

    _, models = as_tf_function(target.fn)
    models = models if isinstance(models, list) else [models] if models else []
    layers = layer_outputs(split.graph, models)
    for model in models:  # a model's output is better called by its last layer's name
        layers.pop(model.name, None)
    return tensor_labels(split, target.arg_labels, layers)


def run_split(args: argparse.Namespace) -> int:
    if args.export is not None and os.path.isfile(args.export):
        raise UsageError(f"{PROG} split: error: --export {args.export} is a file; give a "
                         "directory (created if missing)")
    stages = len(args.cuts) + 1
    progress = _progress(args, 3 + (0 if args.export is None else stages))
    target = _load(args, progress)
    s = _split(args, target, progress)

    from gradsplit_compiler.cli.tables import cut_table, human_bytes, stage_table, summarize

    if args.export is not None:
        from gradsplit_compiler.core.export import export_split

        export_split(s, args.export, description=target.description,
                     arg_labels=target.arg_labels, progress=progress.step)
    summary = summarize(s, _labels(s, target))
    params = sum(int(v.shape.num_elements()) for v in s.variables)
    nbytes = sum(int(v.shape.num_elements()) * v.dtype.size for v in s.variables)
    print(target.description)
    print(_signature_line(target))
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


# -- verify --------------------------------------------------------------------------------


def run_verify(args: argparse.Namespace) -> int:
    progress = _progress(args, 4)
    target = _load(args, progress)
    s = _split(args, target, progress)

    from gradsplit_compiler.cli.targets import random_args
    from gradsplit_compiler.core.verify import verify

    args_values = random_args(target, args.batch, args.seed)
    mode = "graph mode" if args.no_xla else "XLA"
    with progress.step(f"verifying on random inputs ({mode}: compiles both sides)"):
        report = verify(s, *args_values, jit_compile=not args.no_xla)
    print(target.description)
    print(_signature_line(target))
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


# -- render --------------------------------------------------------------------------------


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
    progress = _progress(args, 3 + len(args.pictures) + (args.tensorboard is not None))
    target = _load(args, progress)
    s = _split(args, target, progress)

    from gradsplit_compiler.show.render import layout_graph, render_split

    print(target.description)
    labels = _labels(s, target) if args.pictures else {}
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
              f"in {len(pic)} boxes{grouped} ({hidden} constants and no-ops not drawn).")
    if args.tensorboard is not None:
        from gradsplit_compiler.show.tensorboard_graphs import write_graphs

        with progress.step(f"writing TensorBoard graphs to {args.tensorboard}"):
            runs = write_graphs(s, args.tensorboard)
        print(f"Wrote TensorBoard runs {', '.join(runs)} to {args.tensorboard} (the program "
              f"coloured by stage: 'Color: Device'); view with tensorboard --logdir "
              f"{args.tensorboard}.")
    return 0
