"""Keras layer names -> the graph tensors that are their outputs."""

from __future__ import annotations

from collections import defaultdict

import networkx as nx


def layer_outputs(g: nx.MultiDiGraph, models: list) -> dict[str, list[str]]:
    """For each layer of ``models`` (nested models included), its output tensors in ``g``.

    A layer's ops sit in a name scope ending in the layer's name (``.../<layer>/...``, with a
    ``_<n>`` suffix when the scope name was taken); its outputs are the floating-point tensors
    produced inside that scope and read by an op outside it.
    """
    names = set()
    for model in models:
        names |= _layer_names(model)
    scope_nodes: dict[str, list[str]] = defaultdict(list)
    for node in g.nodes:
        parts = node.split("/")[:-1]
        for depth, part in enumerate(parts):
            layer = _strip_suffix(part, names)
            if layer is not None:
                scope_nodes[(layer, "/".join(parts[: depth + 1]))].append(node)
    found: dict[str, list[str]] = defaultdict(list)
    for (layer, scope), nodes in scope_nodes.items():
        members = set(nodes)
        prefix = scope + "/"
        for node in nodes:
            for _, dst, a in g.out_edges(node, data=True):
                if a["control"] or dst in members or dst.startswith(prefix):
                    continue
                outputs = g.nodes[node].get("outputs") or []
                i = a["src_output"]
                dtype = outputs[i][0] if i < len(outputs) else None
                if dtype is not None and not dtype.is_floating:
                    continue
                name = f"{node}:{i}"
                if name not in found[layer]:
                    found[layer].append(name)
    return dict(found)


def _layer_names(model) -> set[str]:
    names = set()
    for layer in getattr(model, "layers", []):
        names.add(layer.name)
        if hasattr(layer, "layers"):
            names |= _layer_names(layer)
    return names


def _strip_suffix(part: str, names: set[str]) -> str | None:
    if part in names:
        return part
    base, _, suffix = part.rpartition("_")
    if suffix.isdigit() and base in names:
        return base
    return None
