"""Draw a split program: one colour per stage, the tensors that cross a cut in red.

The layout is plain networkx (``layout_graph``: which boxes, which arrows, in which layer:
the topological generations, top to bottom); the drawing is matplotlib (``draw_split``: boxes
sized to their labels, every arrow pointing down, a dashed line at each cut, the title and
legend above the drawing; ``render_split`` saves it), an optional dependency
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
import textwrap
from collections import defaultdict
from typing import Any

import networkx as nx

# ir.names, not ir.graph or frontend.mark: no TensorFlow, so checking a picture's name
# (``picture_format``) is instant.
from gradsplit_compiler.ir.names import mark_name_of, parse_tensor_name

__all__ = ["STAGE_COLOURS", "ARGUMENT_COLOUR", "BOUNDARY_COLOUR", "MAX_OPS", "FORMATS",
           "draw_split", "layout_graph", "picture_format", "render_split", "stage_colour",
           "tensor_label"]

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
    ``NoOp``, ``ReadVariableOp``) are left out. When more than ``max_ops`` ops remain,
    ops are grouped by name scope, one box per scope and stage: at the deepest scope depth
    that leaves at most ``max_ops`` boxes, or else at the deepest depth where that many
    remain once chains of boxes (each box the only successor of the one before, the same
    stage, nothing crossing a cut in between) are merged into one. So the layers of a
    ResNet50 become a few boxes per residual block: its main path, its shortcut, the
    addition.

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
        (whether a tensor it produces crosses a cut), ``layer`` (top to bottom: every edge
        goes to a later layer, except inside a cycle of scopes), ``slot`` (place in its
        layer, left to right, centred on 0). Edge attributes: ``boundary`` (a tensor on it
        crosses a cut), ``control`` (control dependencies only). Graph attributes:
        ``scope_depth`` (None, or the name scope depth the ops were grouped to), ``chains``
        (whether chains were merged) and ``hidden_ops`` (live ops left out: constants,
        no-ops, variable reads).
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
    _assign_slots(pic)
    return pic


# Grouping by scope alone that leaves fewer than this fraction of ``max_ops`` boxes (a whole
# network in one scope) is too coarse: chains of deeper scopes are merged instead.
MIN_BOXES = 0.25

# Ops without information in a picture: constants (an op's attribute, in effect), the
# control-only NoOps that group side effects, and variable reads (one more box above every
# layer's MatMul or Conv2D; split copies them into every stage that reads them).
HIDDEN_OPS = {"Const", "NoOp", "ReadVariableOp"}


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
    """Layers, top to bottom: the topological generations of ``pic`` (of its condensation:
    cycles, possible once ops are collapsed into scopes, are one component), then every box
    that feeds another moved down to just above its first consumer. So a side branch (the
    labels' shape arithmetic of a loss) sits beside the step that uses it, not at the top,
    and an argument is a short arrow."""
    condensed = nx.condensation(pic)
    layer_of_component: dict[int, int] = {}
    for layer, components in enumerate(nx.topological_generations(condensed)):
        for c in components:
            layer_of_component[c] = layer
    for c in reversed(list(nx.topological_sort(condensed))):
        if condensed.out_degree(c) > 0:
            first_use = min(layer_of_component[s] for s in condensed.successors(c))
            layer_of_component[c] = max(layer_of_component[c], first_use - 1)
    mapping = condensed.graph["mapping"]
    for node in pic.nodes:
        pic.nodes[node]["layer"] = layer_of_component[mapping[node]]


def _assign_slots(pic: nx.DiGraph, sweeps: int = 2) -> None:
    """Places within a layer, left to right: the barycentre of the predecessors' places, to
    limit crossings."""
    layers: dict[int, list[str]] = defaultdict(list)
    for node in pic.nodes:  # graph order keeps the first sweep stable
        layers[pic.nodes[node]["layer"]].append(node)
    slot: dict[str, float] = {}
    for _ in range(sweeps):
        for layer in sorted(layers):
            nodes = layers[layer]
            keys = {}
            for i, n in enumerate(nodes):
                placed = [slot[p] for p in pic.predecessors(n) if p in slot]
                keys[n] = sum(placed) / len(placed) if placed else slot.get(n, float(i))
            nodes.sort(key=keys.__getitem__)
            for i, n in enumerate(nodes):
                slot[n] = float(i)
    for nodes in layers.values():
        offset = (len(nodes) - 1) / 2.0
        for i, n in enumerate(nodes):
            pic.nodes[n]["slot"] = i - offset


# -- drawing ------------------------------------------------------------------------------
# Sizes in inches (the axes' data unit is one inch, so boxes keep their shape at any size).
FONT = 8.0            # points, the boxes' labels
PAD = 0.35            # a box's padding around its label, in font sizes
GAP_X = 0.3           # between two boxes of a layer
GAP_Y = 0.32          # between two layers: room for the arrows
BAND_GAP = 1.0        # between the bands of a folded picture: an arrow's way, a cut's label
MAX_BAND = 36.0       # the tallest band; a taller picture is folded into bands side by side
MAX_SIDE = 120.0      # the largest picture; beyond it the font shrinks
MARGIN = 0.25          # around the drawing: room for the arrows routed above the first layer
CUT_LABEL = 0.45      # left of each band: the cut lines' labels


def _box_sizes(pic: nx.DiGraph, font: float) -> dict[str, tuple[float, float]]:
    """``(width, height)`` in inches of each box: its label's lines plus the padding."""
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import TextToPath

    measure = TextToPath()
    prop = FontProperties(size=font)
    widths: dict[str, float] = {}
    sizes = {}
    for n, d in pic.nodes(data=True):
        lines = d["label"].split("\n")
        for line in lines:
            if line not in widths:
                widths[line] = measure.get_text_width_height_descent(line, prop, False)[0]
        wide = max(widths[line] for line in lines)
        pad = 2 * PAD * font
        sizes[n] = ((wide + pad) / 72.0, (len(lines) * 1.2 * font + pad) / 72.0)
    return sizes


def _positions(pic: nx.DiGraph, sizes: dict[str, tuple[float, float]]):
    """``(pos, bands)``: box centres in inches, layers top to bottom, each layer's boxes
    side by side; a picture taller than ``MAX_BAND`` is folded, like a newspaper's columns,
    into bands side by side. ``bands``: per band, ``(x_min, x_max, {layer: (y of its
    centre, y of the free space above it, y of the free space below it)})``."""
    layers: dict[int, list[str]] = defaultdict(list)
    for n, d in pic.nodes(data=True):
        layers[d["layer"]].append(n)
    order = sorted(layers)
    step_x = max((w for w, _ in sizes.values()), default=1.0) + GAP_X
    heights = {k: max(sizes[n][1] for n in layers[k]) for k in order}
    total = sum(heights.values()) + GAP_Y * (len(order) - 1)
    count = max(1, math.ceil(total / MAX_BAND))
    per_band = math.ceil(len(order) / count)
    pos: dict[str, tuple[float, float]] = {}
    bands = []
    left = 0.0
    for b in range(0, len(order), per_band):
        members = order[b:b + per_band]
        widest = max(len(layers[k]) for k in members)
        centre = left + widest * step_x / 2.0
        y, ys = 0.0, {}
        for k in members:
            ys[k] = (y - heights[k] / 2.0, y + GAP_Y / 2.0, y - heights[k] - GAP_Y / 2.0)
            for n in layers[k]:
                pos[n] = (centre + pic.nodes[n]["slot"] * step_x, ys[k][0])
            y -= heights[k] + GAP_Y
        bands.append((left, left + widest * step_x, ys))
        left += widest * step_x + BAND_GAP
    return pos, bands


def _cut_lines(pic: nx.DiGraph, bands) -> list[tuple[int, float, float, float]]:
    """``(cut, x_min, x_max, y)``: a line between two layers of a band for each cut that
    separates the band's boxes cleanly: every box of stages up to the cut above it, every
    later stage's box below; but for a later stage's boxes nothing feeds (a bias reshaped
    beside the layer that adds it: just above its first consumer) and an earlier stage's
    boxes that feed nothing (a batch-norm statistics update: just below its producer)."""
    lines = []
    stages = sorted({d["stage"] for _, d in pic.nodes(data=True) if d["stage"] is not None})
    for k in stages[:-1]:
        before = [d["layer"] for n, d in pic.nodes(data=True)
                  if d["stage"] is not None and d["stage"] <= k and pic.out_degree(n)]
        after = [d["layer"] for n, d in pic.nodes(data=True)
                 if d["stage"] is not None and d["stage"] > k and pic.in_degree(n)]
        if not before or not after or max(before) >= min(after):
            continue
        for x_min, x_max, ys in bands:
            above = [ys[layer][0] for layer in ys if layer <= max(before)]
            below = [ys[layer][0] for layer in ys if layer >= min(after)]
            if above and below:
                lines.append((k, x_min, x_max, (min(above) + max(below)) / 2.0))
    return lines


def draw_split(split: Any, *, title: str | None = None, max_ops: int = MAX_OPS,
               labels: dict[str, str] | None = None):
    """The picture of ``split`` as a matplotlib ``Figure`` (what ``render_split`` saves).

    A layered drawing of ``layout_graph(split, max_ops)`` from the top: the arguments
    first, every arrow pointing down (a picture taller than ``MAX_BAND`` inches continues
    in a band to the right), boxes coloured by stage, the tensors that cross a cut as red
    arrows out of red-edged boxes, and a dashed red line ``cut k`` between the layers a
    cut separates. The title and the legend sit above the drawing, outside it. Each box
    is a ``Text`` whose ``gid`` is ``"box:<node>"``; the legend is ``fig.legends[0]``.
    """
    try:
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch
    except ImportError:
        raise ImportError(MATPLOTLIB_HINT) from None

    pic = layout_graph(split, max_ops=max_ops)
    font = FONT
    for _ in range(2):  # a picture larger than MAX_SIDE is drawn again in a smaller font
        sizes = _box_sizes(pic, font)
        pos, bands = _positions(pic, sizes)
        xs = [pos[n][0] + s * sizes[n][0] / 2 for n in pic for s in (-1, 1)] or [0.0]
        ys = [pos[n][1] + s * sizes[n][1] / 2 for n in pic for s in (-1, 1)] or [0.0]
        lines = _cut_lines(pic, bands)
        x_min, x_max = min(xs) - MARGIN, max(xs) + MARGIN
        if lines:
            x_min = min(x_min, -CUT_LABEL - 0.05)
        y_min, y_max = min(ys) - MARGIN, max(ys) + MARGIN
        largest = max(x_max - x_min, y_max - y_min)
        if largest <= MAX_SIDE or font < 3.0:
            break
        font = max(2.5, font * MAX_SIDE / largest)

    handles = [Patch(facecolor=ARGUMENT_COLOUR, edgecolor="#333333", label="argument")]
    handles += [Patch(facecolor=stage_colour(k), edgecolor="#333333",
                      label=f"stage {k} ({stage.num_ops} ops)")
                for k, stage in enumerate(split.stages)]
    handles.append(Line2D([0], [0], color=BOUNDARY_COLOUR, lw=2.2,
                          label="tensor crossing a cut"))
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

    width = max(x_max - x_min, 6.0)
    columns = max(1, min(len(handles), int(width / 2.1)))
    title_lines = textwrap.wrap(title, max(40, int(width * 72 / (0.6 * 9.0))))
    header = 0.12 + 0.22 * len(title_lines) + 0.24 * math.ceil(len(handles) / columns) + 0.12
    height = (y_max - y_min) + header
    fig = Figure(figsize=(width, height))
    ax = fig.add_axes(((width - (x_max - x_min)) / 2 / width, 0.0,
                       (x_max - x_min) / width, (y_max - y_min) / height))
    ax.set_axis_off()
    ax.set_xlim(x_min, x_max)
    ax.set_ylim(y_min, y_max)

    boxes = {}
    for n, d in pic.nodes(data=True):
        boxes[n] = ax.text(
            *pos[n], d["label"], ha="center", va="center", fontsize=font, zorder=3,
            gid=f"box:{n}", linespacing=1.2,
            bbox={"boxstyle": f"round,pad={PAD}", "facecolor": stage_colour(d["stage"]),
                  "edgecolor": BOUNDARY_COLOUR if d["boundary"] else "#333333",
                  "linewidth": 2.0 if d["boundary"] else 0.7})
    collapsed = pic.graph["scope_depth"] is not None
    clearance = (PAD * font) + 1.0  # points: the arrow ends at the box's edge, not its text
    band_of = {layer: b for b, (_, _, ys) in enumerate(bands) for layer in ys}
    for u, v, d in pic.edges(data=True):
        if d["control"] and collapsed:  # between scopes they are clutter, not information
            continue
        colour = BOUNDARY_COLOUR if d["boundary"] else ("#b0b0b0" if d["control"] else "#555555")
        lu, lv = pic.nodes[u]["layer"], pic.nodes[v]["layer"]
        style = {"color": colour, "lw": 2.0 if d["boundary"] else 0.8,
                 "linestyle": "--" if d["control"] else "-"}
        zorder = 2 if d["boundary"] else 1
        start, rad = (0.5, 0.0), 0.0
        if band_of[lu] != band_of[lv]:
            # into a later band: down into the space below u's layer, along the free column
            # right of u's band, into the space above v's layer, then down into v
            below = bands[band_of[lu]][2][lu][2]
            above = bands[band_of[lv]][2][lv][1]
            gap = bands[band_of[lu]][1] + 0.25
            x_u, x_v = pos[u][0], pos[v][0]
            ax.plot([x_u, x_u, gap, gap, x_v], [pos[u][1], below, below, above, above],
                    zorder=zorder, **style)
            start = (x_v, above)
        elif lv - lu > 1 and pos[v][1] < pos[u][1]:  # past the layers between: bow out
            rad = 0.25 if pos[v][0] >= pos[u][0] else -0.25
        ax.annotate(
            "", xy=(0.5, 1.0), xycoords=boxes[v], xytext=start,
            textcoords=boxes[u] if start == (0.5, 0.0) else "data", zorder=zorder,
            arrowprops={
                "arrowstyle": "-|>", "shrinkA": clearance if start == (0.5, 0.0) else 0.0,
                "shrinkB": clearance, "mutation_scale": 8,
                "connectionstyle": f"arc3,rad={rad}", **style,
            },
        )
    for k, left, right, y in lines:
        ax.plot([left - CUT_LABEL, right], [y, y], color=BOUNDARY_COLOUR, lw=1.0,
                ls=(0, (5, 4)), zorder=0)
        ax.text(left - CUT_LABEL, y, f"cut {k}", color=BOUNDARY_COLOUR, fontsize=font,
                ha="left", va="bottom", zorder=0)

    top = 1.0 - 0.1 / height
    fig.text(0.01, top, "\n".join(title_lines), ha="left", va="top",
             fontsize=9.0, linespacing=1.3)
    fig.legend(handles=handles, loc="upper left",
               bbox_to_anchor=(0.0, top - (0.22 * len(title_lines) + 0.02) / height),
               ncol=columns, fontsize=8.0, frameon=False, borderaxespad=0.2)
    return fig


def render_split(split: Any, path: str | os.PathLike, *, title: str | None = None,
                 max_ops: int = MAX_OPS, dpi: int = 100,
                 labels: dict[str, str] | None = None) -> str:
    """Draw ``split`` to ``path`` (``draw_split``'s picture): one colour per stage, the
    tensors crossing a cut in red.

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
    except ImportError:
        raise ImportError(MATPLOTLIB_HINT) from None
    fig = draw_split(split, title=title, max_ops=max_ops, labels=labels)
    # A canvas of our own, whatever pyplot's backend is.
    (FigureCanvasSVG if fmt == "svg" else FigureCanvasAgg)(fig)
    # SVG text stays text (searchable, and a tenth of the size of glyph outlines).
    with rc_context({"svg.fonttype": "none"}):
        fig.savefig(os.fspath(path), format=fmt, dpi=dpi,
                    metadata={"Date": None} if fmt == "svg" else None)
    return os.fspath(path)
