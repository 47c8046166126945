"""What to draw for seed-compatible layers: :func:`visualize_layers` (the drawing is :mod:`svq_modules.plotting`).

This module computes per-panel node ids of every point (by decoding the
layers, or by cutting a seed-style cluster tree) and hands plain arrays to
:func:`svq_modules.plotting.plot_point_panels`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import Tensor

from ..plotting import plot_point_panels
from ..tree import node_depth, scan_to_marked
from ..validation import check_int
from .decode import decode_layer
from .inputs import as_tensor, check_centers, check_data, check_quantized
from .records import Layer, check_layer_list
from .transcode import leaf_symbols, relayer

__all__ = ["visualize_layers", "layer_panels", "tree_panels"]


def visualize_layers(
    layers_or_centers: Sequence[Layer] | Any,
    layerized_cluster_centers: Any = None,
    cluster_tree: Sequence[tuple[int, int]] | None = None,
    data: Any = None,
    quantized_data: Any = None,
    *,
    path: str | os.PathLike | None = None,
    max_points: int = 20_000,
    max_panels: int = 6,
    levels_per_panel: int = 2,
    point_size: float = 3.0,
    title: str | None = None,
    dpi: int = 120,
    seed: int = 0,
) -> Figure:
    """Draw the layers: one panel per layer, points coloured by their node.

    A 3-D scatter for D = 3, the data itself for D <= 2, a 2-D PCA projection
    otherwise. Node centers are drawn as black crosses. Array arguments may be
    tensors, NumPy arrays or nested lists.

    Two ways to call it:

    * ``visualize_layers(layers, data=None, path="layers.png")`` with the
      ``list[Layer]`` of :func:`~svq_modules.compat.encode_layers`: panel l
      colours each vector by its node after layer l (``data`` ``[N, D]``: the
      encoded vectors; without it the codewords are drawn, coloured by the
      node holding them).
    * seed style, ``visualize_layers(cluster_centers, layerized_cluster_centers,
      cluster_tree, data=None, quantized_data=None, path=...)`` with what
      :func:`~svq_modules.compat.build_layers` returns: panels cut the tree
      every ``levels_per_panel`` levels below its roots (a leaf shallower than
      the cut keeps its own colour). ``data`` + ``quantized_data`` draw the
      data instead of the codewords.

    Args:
        path: where to write the figure (PNG); ``None``: only return it.
        max_points: points drawn at most (a fixed random subsample beyond that).
        max_panels: panels at most (seed style: the last one shows the leaves).
        levels_per_panel: tree levels between panels (seed style only).
        point_size, title, dpi, seed: see :func:`svq_modules.plotting.plot_point_panels`.

    Returns:
        The :class:`matplotlib.figure.Figure`.

    Raises:
        ValueError: one line naming the inconsistent argument.
    """
    max_panels = check_int(max_panels, "max_panels", min=1)
    max_points = check_int(max_points, "max_points", min=1)
    draw = dict(path=path, max_points=max_points, point_size=point_size, title=title, dpi=dpi, seed=seed)
    if isinstance(layers_or_centers, (list, tuple)) and layers_or_centers and isinstance(layers_or_centers[0], Layer):
        if layerized_cluster_centers is not None or cluster_tree is not None:
            raise ValueError("with a list of layers, pass data by keyword (data=...), not a tree")
        if quantized_data is not None:
            raise ValueError("quantized_data is not used with a list of layers (they hold the codes); leave it out")
        points, keys, centers, titles = layer_panels(layers_or_centers, data, max_panels)
    else:
        if layerized_cluster_centers is None or cluster_tree is None:
            raise ValueError(
                "layers_or_centers: pass the list of layers from encode_layers, or the seed-style "
                "cluster_centers, layerized_cluster_centers, cluster_tree (what build_layers returns)"
            )
        levels_per_panel = check_int(levels_per_panel, "levels_per_panel", min=1)
        points, keys, centers, titles = tree_panels(
            layers_or_centers, layerized_cluster_centers, cluster_tree, data, quantized_data, max_panels, levels_per_panel
        )
    return plot_point_panels(points, keys, centers, titles, **draw)


def layer_panels(
    layers: Sequence[Layer], data: Any, max_panels: int
) -> tuple[Tensor, list[Tensor], list[Tensor], list[str]]:
    """Points and, per layer (up to ``max_panels``), each point's node id, the layer's node centers, a title.

    Returns:
        ``(points [N, D], keys: [N] int64 per panel, centers: [M_l, D] per panel, titles)``;
        without ``data`` the points are the K codewords.
    """
    layers = check_layer_list(layers)
    if data is None:
        symbols, points = leaf_symbols(layers)
        layers = relayer(layers, symbols, torch.arange(points.shape[0], device=points.device))
    else:
        points = check_data(data, layers[0].cluster_centers)
        if points.shape[0] != layers[0].num_vectors:
            raise ValueError(f"data has {points.shape[0]} vectors but the layers encode {layers[0].num_vectors}")
    keys, centers, titles = [], [], []
    context = None
    for i, layer in enumerate(layers):
        if len(keys) >= max_panels:
            break
        _, context = decode_layer(layer, context)
        if layer.cluster_centers.shape[0] == 0:
            continue
        keys.append(context.node_id)
        centers.append(layer.cluster_centers)
        titles.append(f"layer {i}: {layer.n_bit} bits, {layer.cluster_centers.shape[0]} new nodes")
    return points, keys, centers, titles


def _tree_parent(num_codes: int, cluster_tree: Any) -> Tensor:
    """``[K + m]`` int64 parent of each node of a seed-style merge list (-1: a root)."""
    try:
        merges = torch.as_tensor(cluster_tree if torch.is_tensor(cluster_tree) else list(cluster_tree), dtype=torch.long)
    except (TypeError, ValueError, RuntimeError):
        got = repr(cluster_tree)[:80]
        raise ValueError(f"cluster_tree must be a list of (a, b) int pairs as build_layers returns, got {got}") from None
    merges = merges.reshape(-1, 2) if merges.numel() else merges.reshape(0, 2)
    num_nodes = num_codes + merges.shape[0]
    if merges.numel() and (
        int(merges.min()) < 0 or bool((merges >= torch.arange(num_codes, num_nodes)[:, None]).any())
    ):
        raise ValueError("cluster_tree: entry i must merge two node ids < K + i (as build_layers returns)")
    merged = merges.reshape(-1)
    if merged.unique().numel() != merged.numel():
        raise ValueError("cluster_tree merges some node twice; pass the tree build_layers returned")
    parent = torch.full((num_nodes,), -1, dtype=torch.long)
    parent[merged] = torch.arange(num_codes, num_nodes).repeat_interleave(2)
    return parent


def tree_panels(
    cluster_centers: Any,
    layerized_cluster_centers: Any,
    cluster_tree: Any,
    data: Any,
    quantized_data: Any,
    max_panels: int,
    levels_per_panel: int,
) -> tuple[Tensor, list[Tensor], list[Tensor], list[str]]:
    """Seed-style panels: cuts of the merge tree every ``levels_per_panel`` levels below its roots.

    Returns:
        ``(points [N, D], keys [N] int64 per panel, centers [M_p, D] per panel, titles)``
        on the CPU; the points are the data with ``quantized_data``, else the codewords.
    """
    codebook = check_centers(cluster_centers).detach().cpu()
    num_codes = codebook.shape[0]
    parent = _tree_parent(num_codes, cluster_tree)
    num_nodes = parent.shape[0]
    centers_all = check_centers(layerized_cluster_centers, "layerized_cluster_centers").detach().cpu()
    if centers_all.shape != (num_nodes, codebook.shape[1]):
        raise ValueError(
            f"layerized_cluster_centers must be [K + merges, D] = {[num_nodes, codebook.shape[1]]}, "
            f"got {list(centers_all.shape)}"
        )
    if data is not None or quantized_data is not None:
        if data is None or quantized_data is None:
            raise ValueError("pass both data and quantized_data (the codeword index of each row), or neither")
        points = check_data(as_tensor(data, "data", "data").detach().cpu(), codebook)
        labels = as_tensor(quantized_data, "quantized_data", "indices").detach().cpu()
        owner_leaf = check_quantized(labels, num_codes, codebook.device, expected_len=points.shape[0])
    else:
        points = codebook
        owner_leaf = torch.arange(num_codes)

    depth = node_depth(parent)
    is_leaf = torch.arange(num_nodes) < num_codes
    max_depth = int(depth.max())
    levels = sorted(set(list(range(0, max_depth, levels_per_panel))[: max(1, max_panels - 1)] + [max_depth]))
    keys, centers, titles = [], [], []
    for level in levels:  # one pass per panel
        marked = (depth == level) | (is_leaf & (depth < level))
        anc, _, _ = scan_to_marked(parent, marked)
        nodes = torch.unique(anc[:num_codes])
        keys.append(anc[owner_leaf.cpu()])
        centers.append(centers_all[nodes[nodes >= num_codes]])
        titles.append(f"depth {level}: {nodes.numel()} groups")
    return points, keys, centers, titles
