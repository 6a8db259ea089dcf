"""Draw a split program: one colour per stage, the tensors that cross a cut in red.

The layout is plain networkx (``layout_graph``: which boxes, which arrows, in which column);
the drawing is matplotlib (``render_split``), an optional dependency
(``pip install 'gradsplit-compiler[render]'``), to PNG (its Agg canvas) or SVG (its SVG
canvas), chosen by the file's suffix. Only matplotlib's object-oriented API is used, so
rendering never changes the caller's pyplot backend.

Example
-------
>>> import tensorflow as tf
>>> import gradsplit_compiler as gsc
>>> from gradsplit_compiler.render import render_split
>>> W = tf.Variable(tf.ones([3, 2]))
>>> def loss(x):
...     return tf.reduce_sum(gsc.mark(tf.tanh(x @ W), "y") ** 2)
>>> s = gsc.split(loss, [tf.TensorSpec([4, 3])], cuts=["y"])
>>> render_split(s, "/tmp/split.png")  # doctest: +SKIP
'/tmp/split.png'
"""

from __future__ import annotations

import math
import os
from collections import Counter, defaultdict
from typing import Any

import networkx as nx

# ir.names, not ir.graph or frontend.mark: no TensorFlow, so checking a picture's name
# (``picture_format``) is instant.
from gradsplit_compiler.ir.names import mark_name_of, parse_tensor_name

__all__ = ["STAGE_COLOURS", "ARGUMENT_COLOUR", "BOUNDARY_COLOUR", "MAX_OPS", "FORMATS",
           "layout_graph", "picture_format", "render_split", "stage_colour", "tensor_label"]

# ColorBrewer Set3 without its red, so that red means "crosses a cut" and nothing else.
STAGE_COLOURS = ["#8dd3c7", "#ffffb3", "#bebada", "#80b1d3", "#fdb462",
                 "#b3de69", "#fccde5", "#bc80bd", "#ccebc5", "#ffed6f"]
ARGUMENT_COLOUR = "#ffffff"
BOUNDARY_COLOUR = "#d62728"
MAX_OPS = 150
FORMATS = ("png", "svg")

MATPLOTLIB_HINT = (
    "drawing the graph needs matplotlib, which is not installed; install it with "
    "pip install 'gradsplit-compiler[render]' (or pip install matplotlib)"
)


def picture_format(path: str | os.PathLike) -> str:
    """``"png"`` or ``"svg"`` from the suffix of ``path`` (PNG without one); ``ValueError``
    for any other suffix."""
    suffix = os.path.splitext(os.fspath(path))[1].lower().lstrip(".") or "png"
    if suffix not in FORMATS:
        raise ValueError(f"cannot draw {os.fspath(path)!r}: the picture's name must end in "
                         f"{' or '.join('.' + f for f in FORMATS)}")
    return suffix


def stage_colour(stage: int | None) -> str:
    """The fill colour of stage ``stage`` (``None``: an argument)."""
    if stage is None:
        return ARGUMENT_COLOUR
    return STAGE_COLOURS[stage % len(STAGE_COLOURS)]


def tensor_label(split: Any, name: str) -> str:
    """A short, human name for graph tensor ``name``: its ``gsc.mark`` name, its argument
    name, ``output k``, or the op name (``:index`` only when it is not output 0)."""
    op, index = parse_tensor_name(name)
    marked = mark_name_of(op)
    if marked is not None:
        return marked
    if name in split.output_names:
        k = split.output_names.index(name)
        return "output" if len(split.output_names) == 1 else f"output {k}"
    return op if index == 0 else f"{op}:{index}"


def layout_graph(split: Any, max_ops: int = MAX_OPS) -> nx.DiGraph:
    """The picture of ``split.graph`` as a small ``DiGraph``: one node per box, one edge per arrow.

    Live ops and the argument placeholders are kept; dead ops (``stage`` None), the
    placeholders of captured variables and ops that only clutter a picture (``Const``,
    ``NoOp``) are left out. When more than ``max_ops`` ops remain, ops are grouped by name
    scope, one box per scope and stage: at the deepest scope depth that leaves at most
    ``max_ops`` boxes, or else at the deepest depth where that many remain once chains of
    boxes (each box the only successor of the one before, the same stage, nothing crossing
    a cut in between) are merged into one. So the layers of a ResNet50 become a few boxes
    per residual block: its main path, its shortcut, the addition.

    Parameters
    ----------
    split : gsc.Split
    max_ops : int
        The most boxes drawn one per op.

    Returns
    -------
    networkx.DiGraph
        Node attributes: ``stage`` (int, or None for an argument), ``stages`` (every stage
        holding a copy), ``label``, ``ops`` (how many ops the box stands for), ``boundary``
        (whether a tensor it produces crosses a cut), ``layer`` (column, left to right),
        ``row``. Edge attributes: ``boundary`` (a tensor on it crosses a cut), ``control``
        (control dependencies only). Graph attributes: ``scope_depth`` (None, or the name
        scope depth the ops were grouped to), ``chains`` (whether chains were merged) and
        ``hidden_ops`` (live ops left out: constants, no-ops).
    """
    g = split.graph
    args = {parse_tensor_name(n)[0] for n in split.arg_names}
    live = [n for n in g.nodes if n in args or g.nodes[n].get("stage") is not None]
    kept = [n for n in live if n in args or g.nodes[n]["op"] not in HIDDEN_OPS]
    crossing = {t for boundary in split.boundaries for t in boundary}

    if len(kept) <= max_ops:
        pic = _boxes(split, kept, args, None, crossing)
    else:
        depths = range(max(n.count("/") for n in kept), 0, -1)
        for depth in depths:
            pic = _boxes(split, kept, args, depth, crossing)
            if len(pic) <= max_ops:
                break
        # Nothing fits, or only a grouping too coarse to say much: merge chains instead.
        if len(pic) > max_ops or len(pic) < max_ops * MIN_BOXES:
            for depth in depths:
                chained = _merge_chains(_boxes(split, kept, args, depth, crossing))
                if len(chained) <= max_ops:
                    if len(pic) > max_ops or len(chained) > len(pic):
                        pic = chained
                    break
    pic.graph["hidden_ops"] = len(live) - len(kept)
    _assign_layers(pic)
    _assign_rows(pic)
    return pic


# Grouping by scope alone that leaves fewer than this fraction of ``max_ops`` boxes (a whole
# network in one scope) is too coarse: chains of deeper scopes are merged instead.
MIN_BOXES = 0.25

# Ops without information in a picture: constants (an op's attribute, in effect) and the
# control-only NoOps that group side effects.
HIDDEN_OPS = {"Const", "NoOp"}


def _boxes(split: Any, kept: list[str], args: set[str], depth: int | None,
           crossing: set[str]) -> nx.DiGraph:
    """One box per op (``depth`` None) or per name scope at ``depth`` and stage."""
    g = split.graph
    box_of = {n: _box_key(n, g.nodes[n].get("stage"), args, depth) for n in kept}
    pic = nx.DiGraph(scope_depth=depth, chains=False)
    members: dict[str, list[str]] = defaultdict(list)
    for n in kept:
        members[box_of[n]].append(n)
    for box, ops in members.items():
        stage = g.nodes[ops[0]].get("stage")
        stages = sorted({s for n in ops for s in g.nodes[n].get("stages") or [stage]
                         if s is not None})
        pic.add_node(box, stage=stage, stages=stages, ops=len(ops), boundary=False,
                     label=_label(split, box, ops))
    for u, v, attrs in g.edges(data=True):
        if u not in box_of or v not in box_of or box_of[u] == box_of[v]:
            continue
        bu, bv = box_of[u], box_of[v]
        control = bool(attrs.get("control"))
        tensor = None if control else f"{u}:{attrs['src_output']}"
        crosses = (tensor in crossing
                   and (g.nodes[u].get("stage") is None
                        or g.nodes[u].get("stage") != g.nodes[v].get("stage")))
        _add_edge(pic, bu, bv, crosses, control)
        if crosses:
            pic.nodes[bu]["boundary"] = True
    return pic


def _add_edge(pic: nx.DiGraph, u: str, v: str, boundary: bool, control: bool) -> None:
    if pic.has_edge(u, v):
        pic[u][v]["boundary"] |= boundary
        pic[u][v]["control"] &= control
    else:
        pic.add_edge(u, v, boundary=boundary, control=control)


def _merge_chains(pic: nx.DiGraph) -> nx.DiGraph:
    """``pic`` with every chain of boxes merged into one box (see ``layout_graph``)."""
    def joins(u: str, v: str) -> bool:
        a, b = pic.nodes[u], pic.nodes[v]
        return (pic.out_degree(u) == 1 and pic.in_degree(v) == 1 and a["stage"] is not None
                and a["stage"] == b["stage"] and not a["boundary"]
                and not pic[u][v]["control"])

    links = nx.Graph()
    links.add_nodes_from(pic.nodes)
    links.add_edges_from((u, v) for u, v in pic.edges if joins(u, v))
    merged = nx.DiGraph(**pic.graph)
    merged.graph["chains"] = True
    chain_of: dict[str, str] = {}
    for component in nx.connected_components(links):
        chain = [n for n in pic.nodes if n in component]  # graph order: first to last
        if len(chain) > 1:
            heads = [n for n in chain if not any(joins(p, n) for p in pic.predecessors(n))]
            tails = [n for n in chain if not any(joins(n, s) for s in pic.successors(n))]
            chain.sort(key=lambda n: (n not in heads, n in tails))
        key = chain[0] if len(chain) == 1 else f"{chain[0]}..{chain[-1]}"
        for n in chain:
            chain_of[n] = key
        nodes = [pic.nodes[n] for n in chain]
        label = nodes[0]["label"] if len(chain) == 1 else _chain_label(chain, nodes)
        merged.add_node(key, stage=nodes[0]["stage"],
                        stages=sorted({s for d in nodes for s in d["stages"]}),
                        ops=sum(d["ops"] for d in nodes),
                        boundary=any(d["boundary"] for d in nodes), label=label)
    for u, v, d in pic.edges(data=True):
        if chain_of[u] != chain_of[v]:
            _add_edge(merged, chain_of[u], chain_of[v], d["boundary"], d["control"])
    return merged


def _chain_label(chain: list[str], nodes: list[dict]) -> str:
    def name(box: str) -> str:
        if "/*@" in box:  # a scope: its last component (a Keras layer call, for one)
            return _shorten(box.rsplit("/*@", 1)[0], parts=1, width=26)
        return _shorten(box.rsplit("@", 1)[0], parts=2, width=26)

    ops = sum(d["ops"] for d in nodes)
    return f"{name(chain[0])} ..\n{name(chain[-1])}\n{len(chain)} groups, {ops} ops"


def _box_key(name: str, stage: int | None, args: set[str], depth: int | None) -> str:
    if depth is None or name in args:
        return name
    parts = name.split("/")
    if len(parts) <= depth:
        return name if stage is None else f"{name}@{stage}"
    return f"{'/'.join(parts[:depth])}/*@{stage}"


def _label(split: Any, box: str, ops: list[str]) -> str:
    g = split.graph
    if len(ops) > 1:
        scope = box.rsplit("/*@", 1)[0]
        return f"{_shorten(scope)}/\n{len(ops)} ops"
    name = ops[0]
    op_type = g.nodes[name]["op"]
    marked = mark_name_of(name)
    if marked is not None:
        text = f"{marked}\n(gsc.mark)"
    elif op_type == "Placeholder":
        text = f"{name}\n(argument)"
    else:
        tail = _shorten(name)
        text = tail if tail.rsplit("/", 1)[-1] == op_type else f"{tail}\n{op_type}"
    if any(f"{name}:{i}" in split.output_names for i in range(len(g.nodes[name]["outputs"]))):
        text += "\n-> output"
    stages = g.nodes[name].get("stages") or []
    if len(stages) > 1:
        text += f"\n(copy in stages {','.join(map(str, stages))})"
    return text


def _shorten(name: str, parts: int = 2, width: int = 28) -> str:
    short = "/".join(name.split("/")[-parts:])
    return short if len(short) <= width else "..." + short[-(width - 3):]


def _assign_layers(pic: nx.DiGraph) -> None:
    """Columns: longest path from the sources; a source (an argument, a constant, a variable
    read) sits just left of its first consumer, so a skip connection is a short arrow.
    Cycles (possible once ops are collapsed into scopes) are layered as one strongly
    connected component."""
    condensed = nx.condensation(pic)
    layer_of_component: dict[int, int] = {}
    for layer, components in enumerate(nx.topological_generations(condensed)):
        for c in components:
            layer_of_component[c] = layer
    for c in reversed(list(nx.topological_sort(condensed))):
        if condensed.in_degree(c) == 0 and condensed.out_degree(c) > 0:
            first_use = min(layer_of_component[s] for s in condensed.successors(c))
            layer_of_component[c] = max(layer_of_component[c], first_use - 1)
    mapping = condensed.graph["mapping"]
    for node in pic.nodes:
        pic.nodes[node]["layer"] = layer_of_component[mapping[node]]


def _assign_rows(pic: nx.DiGraph, sweeps: int = 2) -> None:
    """Rows within a column: the barycentre of the predecessors' rows, to limit crossings."""
    layers: dict[int, list[str]] = defaultdict(list)
    for node in pic.nodes:  # graph order keeps the first sweep stable
        layers[pic.nodes[node]["layer"]].append(node)
    row: dict[str, float] = {}
    for _ in range(sweeps):
        for layer in sorted(layers):
            nodes = layers[layer]
            keys = {}
            for i, n in enumerate(nodes):
                placed = [row[p] for p in pic.predecessors(n) if p in row]
                keys[n] = sum(placed) / len(placed) if placed else row.get(n, float(i))
            nodes.sort(key=keys.__getitem__)
            for i, n in enumerate(nodes):
                row[n] = float(i)
    for nodes in layers.values():
        offset = (len(nodes) - 1) / 2.0
        for i, n in enumerate(nodes):
            pic.nodes[n]["row"] = i - offset


def _bend(start: tuple[float, float], end: tuple[float, float]) -> float:
    """Arrows that skip columns bow out, so they pass beside the boxes between."""
    span = end[0] - start[0]
    if span < 0:  # into the next band of a folded picture: straight is clearest
        return 0.0
    if span <= 1:
        return 0.0 if start[1] == end[1] else 0.08
    return 0.25 if end[1] <= start[1] else -0.25


def _positions(pic: nx.DiGraph, max_columns: int = 30):
    """``(pos, columns, band_height, bands)``: a long graph is folded, like a line of text,
    into bands of at most ``max_columns`` columns stacked top to bottom."""
    num_layers = 1 + max((d["layer"] for _, d in pic.nodes(data=True)), default=0)
    bands = math.ceil(num_layers / max_columns)
    columns = math.ceil(num_layers / bands)
    tallest = max(Counter(d["layer"] for _, d in pic.nodes(data=True)).values(), default=1)
    band_height = tallest + (1.0 if bands > 1 else 0.0)
    pos = {}
    for n, d in pic.nodes(data=True):
        band, column = divmod(d["layer"], columns)
        pos[n] = (column, -(d["row"] + (tallest - 1) / 2.0) - band * band_height)
    return pos, columns, band_height, bands


def render_split(split: Any, path: str | os.PathLike, *, title: str | None = None,
                 max_ops: int = MAX_OPS, dpi: int = 100,
                 labels: dict[str, str] | None = None) -> str:
    """Draw ``split`` to ``path``: one colour per stage, boundary tensors red.

    Parameters
    ----------
    split : gsc.Split
    path : str or PathLike
        Where to write the picture: ``.png`` or ``.svg``. Its directory must exist.
    title : str, optional
        Shown above the graph; default: the number of stages and the boundaries.
    max_ops : int
        Above this many ops, ops are collapsed by name scope (see ``layout_graph``).
    dpi : int
    labels : dict, optional
        Short names of tensors (a Keras layer's name for its output) for the title.

    Returns
    -------
    str
        ``path``.

    Raises
    ------
    ImportError
        When matplotlib is not installed; the message says how to install it.
    ValueError
        When ``path`` ends in neither ``.png`` nor ``.svg``.
    """
    fmt = picture_format(path)
    try:
        from matplotlib import rc_context
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.backends.backend_svg import FigureCanvasSVG
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch
    except ImportError:
        raise ImportError(MATPLOTLIB_HINT) from None

    pic = layout_graph(split, max_ops=max_ops)
    pos, columns, band_height, bands = _positions(pic)
    width = min(max(8.0, 1.9 * columns), 60.0)
    height = min(max(4.0, 0.95 * band_height * bands + 1.2), 60.0)
    x_step, y_step = width / columns, (height - 1.2) / (band_height * bands)
    font = max(4.0, 8.0 * min(1.0, x_step / 1.5, y_step / 0.7))

    fig = Figure(figsize=(width, height), dpi=dpi)
    # A canvas of our own, whatever pyplot's backend is.
    (FigureCanvasSVG if fmt == "svg" else FigureCanvasAgg)(fig)
    ax = fig.add_axes([0.01, 0.01, 0.98, 1.0 - 1.1 / height])
    ax.set_axis_off()
    collapsed = pic.graph["scope_depth"] is not None
    for u, v, d in pic.edges(data=True):
        if d["control"] and collapsed:  # between scopes they are clutter, not information
            continue
        colour = BOUNDARY_COLOUR if d["boundary"] else ("#b0b0b0" if d["control"] else "#555555")
        ax.annotate(
            "", xy=pos[v], xytext=pos[u], zorder=1 if not d["boundary"] else 2,
            arrowprops={
                "arrowstyle": "-|>", "color": colour, "shrinkA": 3.2 * font,
                "shrinkB": 3.2 * font, "lw": 2.2 if d["boundary"] else 0.9,
                "linestyle": "--" if d["control"] else "-",
                "connectionstyle": f"arc3,rad={_bend(pos[u], pos[v])}",
            },
        )
    for n, d in pic.nodes(data=True):
        ax.text(*pos[n], d["label"], ha="center", va="center", fontsize=font, zorder=3,
                bbox={"boxstyle": "round,pad=0.35", "facecolor": stage_colour(d["stage"]),
                      "edgecolor": BOUNDARY_COLOUR if d["boundary"] else "#333333",
                      "linewidth": 2.2 if d["boundary"] else 0.8})
    ax.set_xlim(-0.6, columns - 0.4)
    ax.set_ylim(-band_height * bands + 0.5, 0.5)

    handles = [Patch(facecolor=ARGUMENT_COLOUR, edgecolor="#333333", label="argument")]
    handles += [Patch(facecolor=stage_colour(k), edgecolor="#333333",
                      label=f"stage {k} ({stage.num_ops} ops)")
                for k, stage in enumerate(split.stages)]
    handles.append(Line2D([0], [0], color=BOUNDARY_COLOUR, lw=2.2,
                          label="tensor crossing a cut"))
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.005, 0.96),
               ncol=min(len(handles), 6), fontsize=max(font, 7.0), frameon=False)
    if title is None:
        labels = labels or {}
        cuts = "; ".join(
            f"cut {k}: " + ", ".join(labels.get(t) or tensor_label(split, t) for t in boundary)
            for k, boundary in enumerate(split.boundaries)
        )
        title = f"{len(split.stages)} stages. {cuts}"
        if pic.graph["scope_depth"] is not None:
            title += f" (ops grouped by name scope, depth {pic.graph['scope_depth']}"
            title += ", chains of groups merged)" if pic.graph["chains"] else ")"
    fig.text(0.01, 0.985, title, ha="left", va="top", fontsize=max(font, 8.0) + 1)
    # SVG text stays text (searchable, and a tenth of the size of glyph outlines).
    with rc_context({"svg.fonttype": "none"}):
        fig.savefig(os.fspath(path), format=fmt, dpi=dpi,
                    metadata={"Date": None} if fmt == "svg" else None)
    return os.fspath(path)
