"""`render_split`: one colour per stage, tensors crossing a cut marked, big graphs grouped."""

from __future__ import annotations

import re
import sys

import matplotlib.image as matplotlib_image  # the render extra, installed for the tests
import numpy as np
import pytest
import tensorflow as tf

import gradsplit_compiler as gsc
from gradsplit_compiler import zoo
from gradsplit_compiler.show.render import (
    BOUNDARY_COLOUR,
    STAGE_COLOURS,
    draw_split,
    layout_graph,
    render_split,
)

# matplotlib is imported, not importorskip-ped: `make test` installs the render extra, and
# without it these tests must fail, not pass by not running.


@pytest.fixture(scope="module")
def three_stages():
    W1 = tf.Variable(np.full((4, 3), 0.1, np.float32), name="W1")
    W2 = tf.Variable(np.full((3, 2), 0.2, np.float32), name="W2")

    def loss(x, target):
        h1 = gsc.mark(tf.tanh(x @ W1), "h1")
        h2 = gsc.mark(tf.nn.relu(h1 @ W2), "h2")
        return tf.reduce_mean(tf.square(h2 - target))

    signature = [tf.TensorSpec([8, 4], tf.float32), tf.TensorSpec([8, 2], tf.float32)]
    return gsc.split(loss, signature, cuts=["h1", "h2"])


def pixel_counts(path) -> dict[str, int]:
    rgb = (matplotlib_image.imread(path)[..., :3] * 255).round().astype(np.uint8)
    colours, counts = np.unique(rgb.reshape(-1, 3), axis=0, return_counts=True)
    return {"#" + "".join(f"{int(v):02x}" for v in c): int(n) for c, n in zip(colours, counts)}


def test_each_stage_has_its_own_colour_in_the_picture(three_stages, tmp_path):
    path = render_split(three_stages, tmp_path / "split.png")
    counts = pixel_counts(path)
    for k in range(len(three_stages.stages)):
        assert counts.get(STAGE_COLOURS[k], 0) >= 100, f"stage {k} colour barely drawn"
    assert len({STAGE_COLOURS[k] for k in range(3)}) == 3


def test_tensors_crossing_a_cut_are_drawn_in_the_boundary_colour(three_stages, tmp_path):
    counts = pixel_counts(render_split(three_stages, tmp_path / "split.png"))
    assert counts.get(BOUNDARY_COLOUR, 0) >= 50


def test_layout_marks_the_boundary_arrows(three_stages):
    pic = layout_graph(three_stages)
    crossing = {(u, v) for u, v, d in pic.edges(data=True) if d["boundary"]}
    producers = {u for u, _ in crossing}
    assert "gsc.mark.h1." in producers and "gsc.mark.h2." in producers
    assert "target" in producers  # an argument only the last stage reads: a skip connection
    for u, v in crossing:
        assert pic.nodes[u]["stage"] != pic.nodes[v]["stage"]


def test_layout_keeps_arguments_and_flows_left_to_right(three_stages):
    pic = layout_graph(three_stages)
    assert {"x", "target"} <= set(pic.nodes)
    assert pic.nodes["x"]["stage"] is None
    assert all(pic.nodes[n]["stage"] is not None for n in pic.nodes if n not in ("x", "target"))
    for u, v in pic.edges():
        assert pic.nodes[u]["layer"] < pic.nodes[v]["layer"]


def test_big_graph_is_grouped_by_name_scope(tmp_path):
    weights = [tf.Variable(tf.eye(6) * 0.9, name=f"w{i}") for i in range(60)]

    def loss(x):
        h = x
        for i, w in enumerate(weights):
            with tf.name_scope(f"layer{i}"):
                h = tf.tanh(h @ w + 0.1)
            if i == 29:
                h = gsc.mark(h, "middle")
        return tf.reduce_sum(h * h)

    s = gsc.split(loss, [tf.TensorSpec([2, 6], tf.float32)], cuts=["middle"])
    live = [n for n, d in s.graph.nodes(data=True) if d.get("stage") is not None]
    assert len(live) > 150
    pic = layout_graph(s, max_ops=150)
    assert pic.graph["scope_depth"] == 1
    assert len(pic) <= 150
    shown = sum(d["ops"] for _, d in pic.nodes(data=True))
    assert pic.graph["hidden_ops"] >= 60  # each layer's constant 0.1, the loss's axes
    assert shown + pic.graph["hidden_ops"] == len(live) + 1  # + argument x
    assert not pic.graph["chains"]
    assert {d["stage"] for _, d in pic.nodes(data=True)} == {None, 0, 1}
    counts = pixel_counts(render_split(s, tmp_path / "big.png"))
    assert counts.get(STAGE_COLOURS[0], 0) >= 100 and counts.get(STAGE_COLOURS[1], 0) >= 100


def test_missing_matplotlib_is_said_clearly(three_stages, tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: import fails
    with pytest.raises(ImportError, match=r"needs matplotlib.*pip install"):
        render_split(three_stages, tmp_path / "split.png")


def test_one_scope_holding_everything_is_drawn_as_chains_of_its_sub_scopes(tmp_path):
    """The shape of a Keras ResNet: every op in the model's scope, residual blocks whose main
    path is a chain of layers."""
    weights = [tf.Variable(tf.eye(6) * 0.5, name=f"w{i}") for i in range(24)]

    def loss(x):
        h = x
        with tf.name_scope("model"):
            for i in range(12):
                with tf.name_scope(f"block{i}_a"):
                    t = tf.tanh(h @ weights[2 * i])
                with tf.name_scope(f"block{i}_b"):
                    t = tf.tanh(t @ weights[2 * i + 1])
                with tf.name_scope(f"block{i}_add"):
                    h = h + t
                if i == 5:
                    h = gsc.mark(h, "middle")
        return tf.reduce_sum(h * h)

    s = gsc.split(loss, [tf.TensorSpec([2, 6], tf.float32)], cuts=["middle"])
    pic = layout_graph(s, max_ops=30)  # 36 layers don't fit; "model" alone says nothing
    assert pic.graph["chains"] and pic.graph["scope_depth"] == 2
    labels = [d["label"] for _, d in pic.nodes(data=True)]
    main_paths = [t for t in labels if re.match(r"block(\d+)_a \.\.\nblock\1_b\n2 groups", t)]
    assert len(main_paths) == 12
    crossing = [n for n, d in pic.nodes(data=True) if d["boundary"] and d["stage"] == 0]
    assert len(crossing) == 1 and crossing[0].endswith("gsc.mark.middle.@0")  # a chain's end
    assert {d["stage"] for _, d in pic.nodes(data=True)} == {None, 0, 1}


def test_svg_keeps_stage_colours_and_text(three_stages, tmp_path):
    path = render_split(three_stages, tmp_path / "split.svg")
    text = open(path).read()
    assert text.startswith("<?xml") and "<svg" in text
    for k in range(3):
        assert f"fill: {STAGE_COLOURS[k]}" in text
        assert f"stage {k} (" in text  # text stays text
    with pytest.raises(ValueError, match=r"must end in \.png or \.svg"):
        render_split(three_stages, tmp_path / "split.jpg")


def small_cnn():
    """Conv-BN-ReLU x3, pooling and a Dense softmax: under 150 ops once constants and
    variable reads are left out, so drawn one box per op."""
    import keras

    keras.utils.set_random_seed(3)
    layers = keras.layers
    with zoo.keras_floatx("float32"):
        inputs = keras.Input((12, 12, 3), name="x")
        h = inputs
        for i in range(3):
            h = layers.Conv2D(4, 3, padding="same", name=f"conv{i}")(h)
            h = layers.BatchNormalization(name=f"bn{i}")(h)
            h = layers.Activation("relu", name=f"relu{i}")(h)
        h = layers.GlobalAveragePooling2D(name="pool")(h)
        out = layers.Dense(4, activation="softmax", name="head")(h)
        model = keras.Model(inputs, out, name="cnn")
    case = zoo.keras_case("cnn", model, (12, 12, 3), (4,), 4, ["relu0", "relu1"],
                          tf.float32)
    return gsc.split(case.fn, case.input_signature, case.cuts)


def box_extents(fig):
    """The drawn extents (pixels) of the legend, the title and every box, after a draw."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    boxes = {t.get_gid()[4:]: t.get_bbox_patch().get_window_extent(renderer)
             for t in fig.axes[0].texts if (t.get_gid() or "").startswith("box:")}
    (legend,) = fig.legends
    (title,) = fig.texts
    return legend.get_window_extent(renderer), title.get_window_extent(renderer), boxes


@pytest.mark.parametrize("program", ["three_stages", "small_cnn"])
def test_legend_and_title_sit_outside_the_drawing_and_boxes_do_not_overlap(program,
                                                                         request):
    split = request.getfixturevalue("three_stages") if program == "three_stages" \
        else small_cnn()
    fig = draw_split(split)
    legend, title, boxes = box_extents(fig)
    assert len(boxes) == len(layout_graph(split)) > 5
    assert not [n for n, b in boxes.items() if b.overlaps(legend) or b.overlaps(title)]
    assert not legend.overlaps(title)
    named = sorted(boxes.items())
    assert not [(a, b) for i, (a, ea) in enumerate(named) for b, eb in named[i + 1:]
                if ea.overlaps(eb)]
    assert all(fig.bbox.contains(b.x0, b.y0) and fig.bbox.contains(b.x1, b.y1)
               for b in boxes.values())  # nothing cut off at the edges
    if program == "small_cnn":
        pic = layout_graph(split)
        assert pic.graph["scope_depth"] is None  # one box per op
        # top to bottom: every arrow points down the picture
        assert all(boxes[u].y0 > boxes[v].y1 for u, v in pic.edges())
