"""Drawing only: coloured point clouds in panels, and rate-distortion curves.

This module imports nothing of :mod:`svq_modules`: everything it draws comes
in as plain arrays (NumPy arrays, torch tensors or nested lists), and what to
draw is computed elsewhere (e.g. :func:`svq_modules.compat.visualize_layers`
turns scalable layers into per-point node ids for :func:`plot_point_panels`).

Figures are built with :class:`matplotlib.figure.Figure` directly, not through
``pyplot``: nothing global is touched, nothing needs closing, and it works in
headless jobs and threads (Agg canvas). Every function returns the figure and,
given ``path``, also writes it (format from the file's suffix, e.g. PNG).
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

__all__ = [
    "RATE_LABELS",
    "METRIC_LABELS",
    "node_colors",
    "project_points",
    "plot_point_panels",
    "plot_rate_distortion",
]

#: x-axis label of each ``rate=`` name of :func:`plot_rate_distortion` (any other string is used as given)
RATE_LABELS = {"bits": "bits per vector", "bpp": "bits per pixel", "bpd": "bits per dimension"}
#: y-axis label of each ``metric=`` name of :func:`plot_rate_distortion` (any other string is used as given)
METRIC_LABELS = {"mse": "MSE", "psnr": "PSNR (dB)"}

_GOLDEN = 0.6180339887498949
_PCA_SAMPLE = 50_000


def _as_array(values: Any, name: str, dtype: Any = np.float64) -> np.ndarray:
    """A NumPy copy of an array-like (torch tensors are detached and moved to the CPU)."""
    if torch.is_tensor(values):
        values = values.detach().cpu()
        values = (values.double() if values.dtype in (torch.float16, torch.bfloat16) else values).numpy()
    try:
        return np.asarray(values, dtype=dtype)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a numeric array (NumPy array, torch tensor or nested list), got {e}") from None


def node_colors(keys: Any) -> np.ndarray:
    """Distinct-looking RGB colours for integer keys (e.g. node ids).

    Keys are ranked first, then spread over the hue circle by the golden ratio,
    so neighbouring ranks get far-apart hues; equal keys get equal colours.

    Args:
        keys: ``[n]`` integers (any array-like).

    Returns:
        ``[n, 3]`` float64 in ``[0, 1]``.
    """
    keys = _as_array(keys, "keys", np.int64).reshape(-1)
    if keys.size == 0:
        return np.zeros((0, 3))
    _, rank = np.unique(keys, return_inverse=True)
    rank = rank.reshape(-1).astype(np.float64)
    hsv = np.stack(
        [np.mod(rank * _GOLDEN, 1.0), 0.55 + 0.35 * np.mod(rank * 0.37, 1.0), 0.95 - 0.3 * np.mod(rank * 0.23, 1.0)],
        axis=1,
    )
    return hsv_to_rgb(hsv)


def project_points(points: Any, *others: Any) -> tuple[np.ndarray, ...]:
    """Coordinates to draw: unchanged for D <= 3, a 2-D PCA projection otherwise.

    Args:
        points: ``[n, D]`` float (array-like); the PCA is fitted on them (on a
            fixed sample of 50 000 rows beyond that).
        others: more ``[m, D]`` arrays projected the same way.

    Returns:
        float64 arrays ``[n, d]`` (and ``[m, d]``): d = D for 2 <= D <= 3, D = 1
        gets a zero second column, else d = 2.
    """
    pts = _as_array(points, "points")
    if pts.ndim != 2 or pts.shape[1] == 0:
        raise ValueError(f"points must be [n, D] with D >= 1, got shape {list(pts.shape)}")
    rest = [_as_array(o, f"others[{i}]").reshape(-1, pts.shape[1]) for i, o in enumerate(others)]
    dim = pts.shape[1]
    if dim == 1:
        pad = lambda a: np.concatenate([a, np.zeros_like(a)], axis=1)  # noqa: E731
        return (pad(pts), *(pad(o) for o in rest))
    if dim <= 3:
        return (pts, *rest)
    mean = pts.mean(0, keepdims=True)
    sample = pts if pts.shape[0] <= _PCA_SAMPLE else pts[_subsample(pts.shape[0], _PCA_SAMPLE, 0)]
    _, _, vt = np.linalg.svd(sample - mean, full_matrices=False)
    basis = vt[:2].T
    return ((pts - mean) @ basis, *((o - mean) @ basis for o in rest))


def _subsample(n: int, max_points: int, seed: int) -> np.ndarray:
    """Sorted row indices: all ``n`` rows, or a fixed random ``max_points`` of them."""
    if n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_points, replace=False))


def _grid(num_panels: int, three_d: bool, title: str | None) -> tuple[Figure, list[Any]]:
    ncols = min(3, num_panels)
    nrows = math.ceil(num_panels / ncols)
    fig = Figure(figsize=(4.6 * ncols, 4.2 * nrows))
    FigureCanvasAgg(fig)
    kwargs = {"projection": "3d"} if three_d else {}
    axes = [fig.add_subplot(nrows, ncols, i + 1, **kwargs) for i in range(num_panels)]
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
    if isinstance(path, bool) or not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"path must be a file path (str or os.PathLike) or None, got {path!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")


def plot_point_panels(
    points: Any,
    panel_keys: Sequence[Any],
    panel_centers: Sequence[Any] | None = None,
    panel_titles: Sequence[str] | None = None,
    *,
    path: str | os.PathLike | None = None,
    title: str | None = None,
    max_points: int = 20_000,
    point_size: float = 3.0,
    dpi: int = 120,
    seed: int = 0,
) -> Figure:
    """One panel per grouping of the same points: points coloured by their group key.

    A 3-D scatter for D = 3, the points themselves for D <= 2, a 2-D PCA
    projection (fitted on the points) otherwise.

    Args:
        points: ``[N, D]`` float (array-like).
        panel_keys: one ``[N]`` int array per panel: the group of each point
            (equal keys, equal colours).
        panel_centers: one ``[M_p, D]`` float array per panel, drawn as black
            crosses (e.g. the groups' centers); ``None``: no crosses.
        panel_titles: one title per panel; ``None``: ``"panel i"``.
        path: where to write the figure; ``None``: only return it.
        title: figure title.
        max_points: points drawn at most (a fixed random subsample beyond that).
        point_size: marker area of the points.
        seed: seed of that subsample.

    Returns:
        The :class:`matplotlib.figure.Figure` (one axes per panel).

    Raises:
        ValueError: no panel, or arrays whose shapes do not match ``points``.
    """
    num_panels = len(panel_keys)
    if num_panels == 0:
        raise ValueError("panel_keys is empty: nothing to draw")
    if isinstance(max_points, bool) or not isinstance(max_points, (int, np.integer)) or max_points < 1:
        raise ValueError(f"max_points must be a positive int, got {max_points!r}")
    pts = _as_array(points, "points")
    if pts.ndim != 2 or pts.shape[0] == 0:
        raise ValueError(f"points must be [N, D] with N >= 1, got shape {list(pts.shape)}")
    pick = _subsample(pts.shape[0], int(max_points), seed)
    keys = []
    for i, k in enumerate(panel_keys):
        k = _as_array(k, f"panel_keys[{i}]", np.int64)
        if k.shape != (pts.shape[0],):
            raise ValueError(f"panel_keys[{i}] must be [N] = [{pts.shape[0]}] (one key per point), got {list(k.shape)}")
        keys.append(k[pick])
    centers = [np.zeros((0, pts.shape[1]))] * num_panels if panel_centers is None else list(panel_centers)
    titles = [f"panel {i}" for i in range(num_panels)] if panel_titles is None else [str(t) for t in panel_titles]
    if len(centers) != num_panels or len(titles) != num_panels:
        raise ValueError(
            f"panel_keys has {num_panels} panels but panel_centers {len(centers)} and panel_titles {len(titles)}"
        )
    projected = project_points(pts[pick], *centers)
    xy, centers_xy = projected[0], projected[1:]
    fig, axes = _grid(num_panels, xy.shape[1] == 3, title)
    for ax, k, cxy, name in zip(axes, keys, centers_xy, titles):
        _scatter(ax, xy, node_colors(k), point_size, alpha=0.7, linewidths=0, rasterized=True)
        if cxy.shape[0]:
            _scatter(ax, cxy, np.zeros((cxy.shape[0], 3)), 14.0, marker="x", linewidths=0.8)
        ax.set_title(name, fontsize=10)
        ax.tick_params(labelsize=7)
    _save(fig, path, dpi)
    return fig


# --------------------------------------------------------------------------- rate-distortion


def _rd_points(values: Any, label: str) -> np.ndarray:
    arr = _as_array(values, f"series {label!r}")
    if arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] == 0:
        raise ValueError(
            f"series {label!r} must be a non-empty list of (rate, value) pairs, i.e. shape [P, 2], got shape {list(arr.shape)}"
        )
    if not np.isfinite(arr).all():
        raise ValueError(f"series {label!r} contains NaN or Inf (e.g. the PSNR of an exact reconstruction); leave it out")
    return arr


def _point_labels(annotation: Any, label: str, num_points: int) -> list[str]:
    if annotation is True:
        return [f"L{i}" for i in range(num_points)]
    if annotation is False or annotation is None:
        return []
    if isinstance(annotation, (str, bytes)) or not isinstance(annotation, Sequence | np.ndarray | torch.Tensor):
        raise ValueError(f"annotations[{label!r}] must be True or a list of one text per point, got {annotation!r}")
    texts = annotation.tolist() if hasattr(annotation, "tolist") else list(annotation)
    if len(texts) != num_points:
        raise ValueError(f"annotations[{label!r}] has {len(texts)} texts but series {label!r} has {num_points} points")
    return [str(t) for t in texts]


def plot_rate_distortion(
    series: Mapping[str, Any] | Sequence[Any],
    path: str | os.PathLike | None = None,
    *,
    metric: str = "mse",
    rate: str = "bits",
    annotations: Mapping[str, Any] | None = None,
    styles: Mapping[str, Mapping[str, Any]] | None = None,
    title: str | None = None,
    xlabel: str | None = None,
    ylabel: str | None = None,
    logx: bool = False,
    logy: bool | None = None,
    figsize: tuple[float, float] = (6.0, 4.2),
    dpi: int = 120,
) -> Figure:
    """Rate-distortion curves: one line per named series (ours per layer, peers, ...).

    Example: our layers (annotated L0, L1, ...) against two peers, in bits
    per pixel and PSNR::

        plot_rate_distortion(
            {"ScalableVQ": [(0.5, 24.1), (0.9, 27.3), (1.4, 30.2)],
             "k-means (one rate each)": [(0.5, 24.6), (1.0, 27.9)],
             "residual VQ": rvq_points},                 # any [P, 2] array-like
            "rd.png", rate="bpp", metric="psnr",
            annotations={"ScalableVQ": True},            # or ["base", "L1", "final"]
            styles={"residual VQ": {"linestyle": "--"}})

    Args:
        series: ``{label: points}``, or a list of ``points`` (labelled
            ``series 0, 1, ...``). ``points``: ``[P, 2]`` ``(rate, value)``
            pairs (list, NumPy array or tensor), finite; drawn as markers joined
            in increasing rate.
        path: where to write the figure (PNG by suffix); ``None``: only return it.
        metric: ``"mse"`` (y = MSE, log axis by default), ``"psnr"`` (dB,
            linear), or any other string, used as the y label.
        rate: ``"bits"`` (bits per vector), ``"bpp"`` (bits per pixel),
            ``"bpd"`` (bits per dimension), or any other string, used as the x label.
        annotations: ``{label: texts}``: one text per point of that series, in
            the order the points were given, written next to them; ``True``
            writes ``L0, L1, ...`` (layer numbers, for per-layer points).
        styles: ``{label: kwargs}`` passed to ``Axes.plot`` for that series
            (``color``, ``linestyle``, ``marker``, ...).
        title, xlabel, ylabel: override the labels.
        logx, logy: log axes (``logy=None``: log for ``"mse"`` only).
        figsize, dpi: figure size in inches and resolution of the written file.

    Returns:
        The :class:`matplotlib.figure.Figure` (e.g. for a logger's ``add_figure``).

    Raises:
        ValueError: no series; a series that is not ``[P, 2]`` finite numbers;
        values <= 0 on a log axis; annotations or styles for unknown series or
        with the wrong number of texts.
    """
    if isinstance(series, Mapping):
        items = [(str(k), v) for k, v in series.items()]
    elif isinstance(series, (str, bytes)) or not isinstance(series, Sequence):
        raise ValueError(f"series must be {{label: [P, 2] points}} or a list of [P, 2] points, got {type(series).__name__}")
    else:
        items = [(f"series {i}", v) for i, v in enumerate(series)]
    if not items:
        raise ValueError("series is empty: nothing to plot")
    curves = [(label, _rd_points(values, label)) for label, values in items]
    labels = {label for label, _ in curves}
    for name, extra in (("annotations", annotations), ("styles", styles)):
        unknown = sorted(set(extra or {}) - labels)
        if unknown:
            raise ValueError(f"{name} names series {unknown} that are not in series {sorted(labels)}")
    name = metric.lower()
    use_logy = logy if logy is not None else name == "mse"
    for axis, flag, column in (("x", logx, 0), ("y", use_logy, 1)):
        bad = [label for label, pts in curves if flag and (pts[:, column] <= 0).any()]
        if bad:
            raise ValueError(f"series {bad} have {axis} values <= 0, which a log {axis} axis cannot show; pass log{axis}=False")

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for label, pts in curves:
        order = np.argsort(pts[:, 0], kind="stable")
        style = {"marker": "o", "markersize": 3.5, **dict((styles or {}).get(label, {}))}
        (line,) = ax.plot(pts[order, 0], pts[order, 1], label=label, **style)
        for (x, y), text in zip(pts, _point_labels((annotations or {}).get(label), label, pts.shape[0])):
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=line.get_color())
    if use_logy:
        ax.set_yscale("log")
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel if xlabel is not None else RATE_LABELS.get(rate.lower(), rate))
    ax.set_ylabel(ylabel if ylabel is not None else METRIC_LABELS.get(name, metric))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    _save(fig, path, dpi)
    return fig
