"""Pictures of scalable layers and rate-distortion curves (matplotlib, Agg, no display needed).

Figures are built with :class:`matplotlib.figure.Figure` directly, not through
``pyplot``: nothing global is touched, nothing needs closing, and it works in
headless jobs and threads. Every function returns the figure and, given
``path``, also writes it (PNG by the file's suffix).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import hsv_to_rgb
from matplotlib.figure import Figure
from torch import Tensor

__all__ = ["visualize_layers", "plot_rate_distortion", "node_colors", "project_points"]

_GOLDEN = 0.6180339887498949


def node_colors(keys: Tensor | np.ndarray) -> np.ndarray:
    """Distinct-looking RGB colours for integer keys (e.g. node ids): ``[n, 3]`` float in [0, 1].

    Keys are ranked first, then spread over the hue circle by the golden ratio,
    so neighbouring ranks get far-apart hues.
    """
    keys = torch.as_tensor(np.asarray(keys)).reshape(-1)
    if keys.numel() == 0:
        return np.zeros((0, 3))
    _, rank = torch.unique(keys, return_inverse=True)
    rank = rank.double().numpy()
    hsv = np.stack(
        [np.mod(rank * _GOLDEN, 1.0), 0.55 + 0.35 * np.mod(rank * 0.37, 1.0), 0.95 - 0.3 * np.mod(rank * 0.23, 1.0)],
        axis=1,
    )
    return hsv_to_rgb(hsv)


def project_points(points: Tensor, *others: Tensor) -> tuple[np.ndarray, ...]:
    """Coordinates to draw: unchanged for D <= 3, a 2-D PCA projection otherwise.

    Args:
        points: ``[n, D]`` float; the PCA is fitted on them.
        others: more ``[m, D]`` tensors projected the same way.

    Returns:
        numpy arrays ``[n, d]`` (and ``[m, d]``), d = D for D <= 3 (D = 1 gets a
        zero second column), else 2.
    """
    pts = points.detach().double().cpu()
    rest = [o.detach().double().cpu() for o in others]
    dim = pts.shape[1]
    if dim == 1:
        pad = lambda t: torch.cat([t, torch.zeros_like(t)], dim=1)  # noqa: E731
        return (pad(pts).numpy(), *(pad(o).numpy() for o in rest))
    if dim <= 3:
        return (pts.numpy(), *(o.numpy() for o in rest))
    mean = pts.mean(0, keepdim=True)
    if pts.shape[0] <= 50_000:
        sample = pts
    else:
        sample = pts[torch.randperm(pts.shape[0], generator=torch.Generator().manual_seed(0))[:50_000]]
    _, _, vt = torch.linalg.svd(sample - mean, full_matrices=False)
    basis = vt[:2].T
    return (((pts - mean) @ basis).numpy(), *(((o - mean) @ basis).numpy() for o in rest))


def _grid(num_panels: int, three_d: bool, title: str | None) -> tuple[Figure, list[Any]]:
    ncols = min(3, num_panels)
    nrows = math.ceil(num_panels / ncols)
    fig = Figure(figsize=(4.6 * ncols, 4.2 * nrows))
    FigureCanvasAgg(fig)
    axes = []
    for i in range(num_panels):
        kwargs = {"projection": "3d"} if three_d else {}
        axes.append(fig.add_subplot(nrows, ncols, i + 1, **kwargs))
    if title:
        fig.suptitle(title)
    return fig, axes


def _scatter(ax: Any, xy: np.ndarray, colors: np.ndarray, size: float, **kwargs: Any) -> None:
    if xy.shape[1] == 3:
        ax.scatter(xy[:, 0], xy[:, 1], xy[:, 2], c=colors, s=size, depthshade=False, **kwargs)
    else:
        ax.scatter(xy[:, 0], xy[:, 1], c=colors, s=size, **kwargs)


def _save(fig: Figure, path: str | os.PathLike | None, dpi: int) -> None:
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")


def _subsample(n: int, max_points: int, seed: int) -> Tensor:
    if n <= max_points:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_points].sort().values


def _draw_panels(
    points: Tensor,
    panel_keys: list[Tensor],
    panel_centers: list[Tensor],
    panel_titles: list[str],
    *,
    title: str | None,
    path: str | os.PathLike | None,
    dpi: int,
    point_size: float,
) -> Figure:
    projected = project_points(points, *panel_centers)
    xy, centers_xy = projected[0], projected[1:]
    fig, axes = _grid(len(panel_keys), xy.shape[1] == 3, title)
    for ax, keys, cxy, name in zip(axes, panel_keys, centers_xy, panel_titles):
        _scatter(ax, xy, node_colors(keys), point_size, alpha=0.7, linewidths=0, rasterized=True)
        if cxy.shape[0]:
            _scatter(ax, cxy, np.zeros((cxy.shape[0], 3)), 14.0, marker="x", linewidths=0.8)
        ax.set_title(name, fontsize=10)
        ax.tick_params(labelsize=7)
    _save(fig, path, dpi)
    return fig


def visualize_layers(
    layers_or_centers: Sequence[Any] | Tensor,
    layerized_cluster_centers: Tensor | None = None,
    cluster_tree: Sequence[tuple[int, int]] | None = None,
    data: Tensor | None = None,
    quantized_data: Tensor | None = None,
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
    otherwise. Node centers are drawn as black crosses.

    Two ways to call it:

    * ``visualize_layers(layers, data=None, path="layers.png")`` with the
      ``list[Layer]`` of :func:`svq_modules.compat.functional.encode_layers`: panel l
      colours each vector by its node after layer l (``data`` ``[N, D]``: the
      encoded vectors; without it the codewords are drawn, coloured by the
      node holding them).
    * seed style, ``visualize_layers(cluster_centers, layerized_cluster_centers,
      cluster_tree, data=None, quantized_data=None, path=...)`` with what
      :func:`svq_modules.compat.functional.build_layers` returns: panels cut the tree
      every ``levels_per_panel`` levels below its roots (a leaf shallower than
      the cut keeps its own colour). ``data`` + ``quantized_data`` draw the
      data instead of the codewords.

    Args:
        path: where to write the figure (PNG); ``None``: only return it.
        max_points: points drawn at most (a fixed random subsample beyond that).
        max_panels: panels at most (seed style: the last one shows the leaves).
        levels_per_panel: tree levels between panels (seed style only).

    Returns:
        The :class:`matplotlib.figure.Figure`.

    Raises:
        ValueError: inconsistent arguments or shapes.
    """
    if torch.is_tensor(layers_or_centers):
        if layerized_cluster_centers is None or cluster_tree is None:
            raise ValueError(
                "seed-style call needs cluster_centers, layerized_cluster_centers and cluster_tree "
                "(or pass the list of layers from encode_layers)"
            )
        return _visualize_tree(
            layers_or_centers, layerized_cluster_centers, cluster_tree, data, quantized_data,
            path=path, max_points=max_points, max_panels=max_panels, levels_per_panel=levels_per_panel,
            point_size=point_size, title=title, dpi=dpi, seed=seed,
        )
    if layerized_cluster_centers is not None or cluster_tree is not None:
        raise ValueError("with a list of layers, pass data by keyword (data=...), not a tree")
    return _visualize_layer_list(
        list(layers_or_centers), data, path=path, max_points=max_points, max_panels=max_panels,
        point_size=point_size, title=title, dpi=dpi, seed=seed,
    )


def _visualize_layer_list(
    layers: list[Any],
    data: Tensor | None,
    *,
    path: str | os.PathLike | None,
    max_points: int,
    max_panels: int,
    point_size: float,
    title: str | None,
    dpi: int,
    seed: int,
) -> Figure:
    from .compat.functional import Layer, decode_layer, encode_known_layers, layer_codebook

    if not layers or not all(isinstance(layer, Layer) for layer in layers):
        raise ValueError("visualize_layers needs a non-empty list of svq_modules.compat.functional.Layer")
    if data is None:
        points = layer_codebook(layers)
        arange = torch.arange(points.shape[0], device=points.device)
        layers = encode_known_layers(arange, None, layers)
    else:
        if not torch.is_tensor(data) or data.dim() != 2:
            raise ValueError(f"data must be a [N, D] tensor, got {type(data).__name__}")
        if data.shape[0] != layers[0].num_vectors:
            raise ValueError(f"data has {data.shape[0]} vectors but the layers encode {layers[0].num_vectors}")
        if data.shape[1] != layers[0].cluster_centers.shape[1]:
            raise ValueError(f"data has dimension {data.shape[1]}, the layers {layers[0].cluster_centers.shape[1]}")
        points = data
    pick = _subsample(points.shape[0], max_points, seed).to(points.device)
    keys, centers, titles = [], [], []
    context = None
    for i, layer in enumerate(layers):
        _, context = decode_layer(layer, context)
        if i >= max_panels or layer.cluster_centers.shape[0] == 0:
            continue
        keys.append(context.node_id[pick].cpu())
        centers.append(layer.cluster_centers)
        titles.append(f"layer {i}: {layer.n_bit} bits, {layer.cluster_centers.shape[0]} new nodes")
    return _draw_panels(
        points[pick], keys, centers, titles, title=title, path=path, dpi=dpi, point_size=point_size
    )


def _visualize_tree(
    cluster_centers: Tensor,
    layerized_cluster_centers: Tensor,
    cluster_tree: Sequence[tuple[int, int]],
    data: Tensor | None,
    quantized_data: Tensor | None,
    *,
    path: str | os.PathLike | None,
    max_points: int,
    max_panels: int,
    levels_per_panel: int,
    point_size: float,
    title: str | None,
    dpi: int,
    seed: int,
) -> Figure:
    from .tree import node_depth, scan_to_marked

    num_codes = cluster_centers.shape[0]
    merges = torch.as_tensor(list(cluster_tree), dtype=torch.long).reshape(-1, 2)
    num_nodes = num_codes + merges.shape[0]
    if layerized_cluster_centers.shape[0] != num_nodes:
        raise ValueError(
            f"layerized_cluster_centers has {layerized_cluster_centers.shape[0]} rows, "
            f"expected K + merges = {num_nodes}"
        )
    if merges.numel() and (int(merges.min()) < 0 or bool((merges >= torch.arange(num_codes, num_nodes)[:, None]).any())):
        raise ValueError("cluster_tree entry i must merge two nodes with ids < K + i")
    if levels_per_panel < 1:
        raise ValueError(f"levels_per_panel must be >= 1, got {levels_per_panel}")
    parent = torch.full((num_nodes,), -1, dtype=torch.long)
    parent[merges.reshape(-1)] = torch.arange(num_codes, num_nodes).repeat_interleave(2)
    depth = node_depth(parent)
    is_leaf = torch.arange(num_nodes) < num_codes
    max_depth = int(depth.max())
    levels = list(range(0, max_depth, levels_per_panel))[: max(1, max_panels - 1)] + [max_depth]
    levels = sorted(set(levels))

    if data is not None or quantized_data is not None:
        if data is None or quantized_data is None:
            raise ValueError("pass both data and quantized_data, or neither")
        if data.dim() != 2 or quantized_data.shape != (data.shape[0],):
            raise ValueError("data must be [N, D] and quantized_data [N]")
        pick = _subsample(data.shape[0], max_points, seed)
        points = data.detach().cpu()[pick]
        owner_leaf = quantized_data.detach().cpu().long()[pick]
    else:
        points = cluster_centers.detach().cpu()
        owner_leaf = torch.arange(num_codes)
    centers_all = layerized_cluster_centers.detach().cpu()

    keys, centers, titles = [], [], []
    for level in levels:
        marked = (depth == level) | (is_leaf & (depth < level))
        anc, _, _ = scan_to_marked(parent, marked)
        group = anc[owner_leaf]
        nodes = torch.unique(anc[:num_codes])
        keys.append(group)
        centers.append(centers_all[nodes[nodes >= num_codes]])
        titles.append(f"depth {level}: {nodes.numel()} groups")
    return _draw_panels(points, keys, centers, titles, title=title, path=path, dpi=dpi, point_size=point_size)


def _as_points(values: Any, label: str) -> np.ndarray:
    arr = np.asarray(torch.as_tensor(values).detach().cpu() if torch.is_tensor(values) else values, dtype=float)
    if arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] == 0:
        raise ValueError(f"series {label!r} must be a non-empty list of (bits, value) pairs, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"series {label!r} contains NaN or Inf")
    return arr


def plot_rate_distortion(
    series: Mapping[str, Any] | Sequence[Any],
    path: str | os.PathLike | None = None,
    *,
    metric: str = "mse",
    title: str | None = None,
    xlabel: str = "bits per vector",
    logy: bool | None = None,
    dpi: int = 120,
) -> Figure:
    """Rate-distortion curves: one line per series.

    Args:
        series: ``{label: points}`` or a list of ``points`` (labelled
            ``series 0, 1, ...``); ``points`` is a list / array / tensor of
            ``(bits, value)`` pairs, ``[P, 2]``.
        path: where to write the PNG; ``None``: only return the figure.
        metric: ``"mse"`` (log y axis by default), ``"psnr"`` (dB, linear), or
            any other y-axis label.
        logy: force a log / linear y axis.

    Returns:
        The :class:`matplotlib.figure.Figure` (e.g. for a logger's ``add_figure``).

    Raises:
        ValueError: no series, or a series that is not ``[P, 2]`` finite numbers.
    """
    if isinstance(series, Mapping):
        items = [(str(k), v) for k, v in series.items()]
    else:
        items = [(f"series {i}", v) for i, v in enumerate(series)]
    if not items:
        raise ValueError("series is empty: nothing to plot")
    curves = [(label, _as_points(values, label)) for label, values in items]
    fig = Figure(figsize=(6.0, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for label, pts in curves:
        order = np.argsort(pts[:, 0], kind="stable")
        ax.plot(pts[order, 0], pts[order, 1], marker="o", markersize=3.5, label=label)
    name = metric.lower()
    ylabel = {"mse": "MSE", "psnr": "PSNR (dB)"}.get(name, metric)
    if logy if logy is not None else name == "mse":
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    _save(fig, path, dpi)
    return fig
