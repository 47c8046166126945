"""Count-weighted Lloyd iterations on codewords that stay inside fixed parent cells.

The points are the K codewords' data means ``p_k`` with weights ``w_k`` (data
counts), so the weighted squared error of a partition of the codewords is the
data's squared error under that partition, up to a constant (the scatter of
the data around its own codeword). A *cell* is a set of codewords; cells are
nested in *parent* cells and a codeword only ever moves among the cells of its
own parent, so the nesting holds by construction and no cell is created.

* :func:`lloyd_within`: one level: each codeword joins the nearest centroid
  among its parent's cells.
* :func:`seed_within`: starting cells: weighted k-means++ seeds inside each parent.
* :func:`joint_lloyd`: two nested levels at once: a codeword picks the cell
  *and* the sub-cell inside it that together cost the least
  ``lam[0] |p - c|^2 + lam[1] |p - c'|^2``. Every iteration lowers that sum,
  so the coarse level may only move where the fine level follows.

Distances are computed per parent in padded batches (:mod:`svq_modules.groups`):
no Python loop per cell, about ``block_elements`` floats at a time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .groups import piece_batches, rank_in_runs, split_pieces
from .validation import check_int

__all__ = [
    "CellTable", "OptionScanner", "cell_table", "cell_centroids", "cell_error", "lloyd_within", "joint_lloyd", "point_errors",
    "seed_within",
]

_DEFAULT_BLOCK_ELEMENTS = 1 << 19
_PIECE_ROWS = 1024
# a codeword moves only when that lowers its cost by more than this share of its scale
_MOVE_MARGIN = 1e-6


class CellTable(NamedTuple):
    """Cells listed per parent.

    Attributes:
        cell: ``[n]`` int64 compact cell of each point, ``0..C-1``.
        parent: ``[n]`` int64 compact parent of each point, ``0..P-1``.
        options: ``[P, G]`` int64 cells of each parent, ``-1``-padded.
        slot: ``[C]`` int64 column of each cell in its parent's row.
    """

    cell: Tensor
    parent: Tensor
    options: Tensor
    slot: Tensor


def cell_table(cells: Tensor, parents: Tensor) -> CellTable:
    """Compact labels and the table of cells per parent.

    Args:
        cells: ``[n]`` int labels; every cell lies inside one parent.
        parents: ``[n]`` int parent labels.
    """
    device = cells.device
    _, cell = torch.unique(cells, return_inverse=True)
    _, parent = torch.unique(parents, return_inverse=True)
    num_cells = int(cell.max()) + 1
    cell_parent = torch.zeros(num_cells, dtype=torch.long, device=device).scatter_(0, cell, parent)
    order = torch.argsort(cell_parent, stable=True)
    sorted_parent = cell_parent[order]
    slot_sorted = rank_in_runs(sorted_parent)
    options = torch.full((int(parent.max()) + 1, int(slot_sorted.max()) + 1), -1, dtype=torch.long, device=device)
    options[sorted_parent, slot_sorted] = order
    slot = torch.empty_like(slot_sorted)
    slot[order] = slot_sorted
    return CellTable(cell=cell, parent=parent, options=options, slot=slot)


def cell_centroids(points: Tensor, weights: Tensor, cell: Tensor, num_cells: int) -> tuple[Tensor, Tensor]:
    """``(centers [C, D], mass [C])``: weighted mean and total weight of each cell (0 where empty)."""
    mass = torch.zeros(num_cells, dtype=points.dtype, device=points.device).index_add_(0, cell, weights)
    total = torch.zeros(num_cells, points.shape[1], dtype=points.dtype, device=points.device)
    total.index_add_(0, cell, points * weights[:, None])
    return total / mass.clamp_min(torch.finfo(points.dtype).tiny)[:, None], mass


def point_errors(points: Tensor, weights: Tensor, cells: Tensor) -> Tensor:
    """``[n]`` float64: each point's weighted squared distance to its cell's centroid.

    Args:
        points: ``[n, D]`` float; ``weights``: ``[n]`` float >= 0; ``cells``: ``[n]`` int labels.
    """
    _, cell = torch.unique(cells, return_inverse=True)
    centers, _ = cell_centroids(points, weights, cell, int(cell.max()) + 1)
    return weights.double() * (points - centers[cell]).pow(2).sum(-1).double()


def cell_error(points: Tensor, weights: Tensor, cells: Tensor) -> float:
    """Weighted squared error of ``points [n, D]`` around their cells' centroids (float64 sum)."""
    return float(point_errors(points, weights, cells).sum())


class OptionScanner:
    """Squared distances of points to the cells of their parent's row, for many center sets.

    The batching (:mod:`svq_modules.groups`) depends only on which points
    share a parent, so it is planned once and reused by every Lloyd iteration.

    Args:
        points: ``[n, D]`` float.
        parent: ``[n]`` int64 row of ``options`` for each point.
        options: ``[P, G]`` int64 center ids, ``-1``-padded.
        block_elements: floats per batch.
    """

    def __init__(self, points: Tensor, parent: Tensor, options: Tensor, block_elements: int) -> None:
        self.points, self.parent, self.options = points, parent, options
        self.point_sq = points.pow(2).sum(-1)
        sizes = torch.bincount(parent, minlength=options.shape[0])
        rank = torch.empty_like(sizes)
        rank[torch.argsort(-sizes, stable=True)] = torch.arange(sizes.numel(), device=sizes.device)
        pieces = split_pieces(parent, rank, _PIECE_ROWS).by_length()
        width = torch.full_like(pieces.length, options.shape[1])
        self.batches = []
        for first, last, num_r, _ in piece_batches(pieces.length, width, block_elements, extra=points.shape[1]):
            pos, row_ok = pieces.rows(first, last, num_r)
            self.batches.append((pos, row_ok, pos[row_ok], options[pieces.group[first:last]]))

    def __call__(self, centers: Tensor, usable: Tensor) -> Tensor:
        """``[n, G]`` float distances to ``centers [C, D]``; ``inf`` at pads and where ``usable [C]`` is False."""
        points, options = self.points, self.options
        out = torch.empty(points.shape[0], options.shape[1], dtype=points.dtype, device=points.device)
        csq = centers.pow(2).sum(-1)
        blocked = torch.where(options >= 0, ~usable[options.clamp_min(0)], True)
        for pos, row_ok, rows, opts in self.batches:
            ids = opts.clamp_min(0)  # [b, G]
            d = torch.baddbmm(csq[ids][:, None, :], points[pos], centers[ids].transpose(1, 2), alpha=-2.0)
            d.add_(self.point_sq[pos][..., None]).clamp_(min=0.0)
            out[rows] = d[row_ok]
        return out.masked_fill_(blocked[self.parent], math.inf)


def seed_within(
    points: Tensor, weights: Tensor, parents: Tensor, k: int, *, generator: torch.Generator | None = None
) -> Tensor:
    """Starting cells: up to ``k`` weighted greedy k-means++ seeds inside every parent, each point with its nearest.

    Each seed of a parent is the best of a few candidates (``2 + ln k``, as
    greedy k-means++ does), drawn among the parent's points with probability
    proportional to ``weight * d^2`` (``d``: distance to the parent's nearest
    seed so far; the first seed by weight alone), all parents at once by
    exponential races; the candidate that leaves the least weighted error wins.
    ``k`` steps in all, each ``O(n D)`` per candidate: ``k`` is a split factor
    (a few to a few dozen), not the number of cells. A parent with fewer than
    ``k`` distinct points gets fewer cells.

    Args:
        points: ``[n, D]`` float positions.
        weights: ``[n]`` float >= 0 weights (points without weight still count a little).
        parents: ``[n]`` int parent labels.
        k: seeds per parent, an int >= 1.
        generator: random generator on the points' device (default: torch's global one).

    Returns:
        ``[n]`` int64 cell labels nested in ``parents`` (``parent * k + seed``, parents numbered compactly).
    """
    k = check_int(k, "k", min=1)
    _, parent = torch.unique(parents, return_inverse=True)
    num_parents = int(parent.max()) + 1
    w = _centroid_weights(weights, points.dtype)
    rows = torch.arange(points.shape[0], device=points.device)
    d2 = torch.full_like(w, math.inf)
    label = torch.zeros_like(parent)
    trials = 2 + int(math.log(k))
    for s in range(k):
        score = w if s == 0 else w * d2
        best_dist, best_left = d2, torch.full((num_parents,), math.inf, dtype=w.dtype, device=w.device)
        for _ in range(1 if s == 0 else trials):
            noise = torch.rand(w.shape, dtype=w.dtype, device=w.device, generator=generator)
            key = torch.where(score > 0, -torch.log(noise) / score, math.inf)
            first = torch.full((num_parents,), math.inf, dtype=w.dtype, device=w.device)
            first.scatter_reduce_(0, parent, key, "amin")
            won = (key == first[parent]) & torch.isfinite(key)
            seed = torch.full((num_parents,), -1, dtype=torch.long, device=w.device)
            seed.scatter_(0, parent[won], rows[won])
            dist = (points - points[seed.clamp_min(0)][parent]).pow(2).sum(-1)
            dist = torch.where((seed >= 0)[parent], dist, math.inf)
            kept = torch.minimum(d2, dist)
            left = torch.zeros_like(best_left).index_add_(0, parent, w * torch.nan_to_num(kept, posinf=0.0))
            left = torch.where(seed >= 0, left, math.inf)
            better = left < best_left
            best_left = torch.where(better, left, best_left)
            best_dist = torch.where(better[parent], dist, best_dist)
        closer = best_dist < d2
        label = torch.where(closer, s, label)
        d2 = torch.where(closer, best_dist, d2)
    return parent * k + label


def lloyd_within(
    cells: Tensor,
    parents: Tensor,
    points: Tensor,
    weights: Tensor,
    iters: int = 10,
    *,
    block_elements: int = _DEFAULT_BLOCK_ELEMENTS,
) -> Tensor:
    """Count-weighted Lloyd on points, each moving only among its parent's cells.

    Args:
        cells: ``[n]`` int64 cell label of each point.
        parents: ``[n]`` int64 parent-cell label (cells never straddle parents).
        points: ``[n, D]`` float positions (data means of the codewords).
        weights: ``[n]`` float >= 0 weights (data counts).
        iters: maximum Lloyd iterations, an int >= 0 (stops early when nothing moves).
        block_elements: floats per distance batch (memory knob).

    Returns:
        ``[n]`` int64 refined cell labels (a subset of the input labels).
    """
    iters = check_int(iters, "iters", min=0)
    uniq = torch.unique(cells)
    table = cell_table(cells, parents)
    cell, w = table.cell, _centroid_weights(weights, points.dtype)
    scale = points.pow(2).sum(-1)
    rows = torch.arange(points.shape[0], device=points.device)
    scan = OptionScanner(points, table.parent, table.options, block_elements)
    for _ in range(iters):
        centers, mass = cell_centroids(points, w, cell, uniq.numel())
        dist = scan(centers, mass > 0)
        current = dist[rows, table.slot[cell]]
        best, j = dist.min(1)
        move = best < current - _MOVE_MARGIN * (current + scale)
        if not bool(move.any()):
            break
        cell = torch.where(move, table.options[table.parent, j], cell)
    return uniq[cell]


def joint_lloyd(
    parents: Tensor,
    coarse: Tensor,
    fine: Tensor,
    points: Tensor,
    weights: Tensor,
    lam: Sequence[float] = (1.0, 1.0),
    iters: int = 10,
    *,
    block_elements: int = _DEFAULT_BLOCK_ELEMENTS,
) -> tuple[Tensor, Tensor]:
    """Lloyd on two nested levels at once, inside fixed parents.

    Each point picks, among the coarse cells of its parent and their fine
    cells, the pair ``(c, c')`` with the least ``lam[0] |p - c|^2 + lam[1] |p - c'|^2``;
    centroids are then recomputed. The weighted sum of both levels' squared
    errors never goes up.

    Args:
        parents: ``[n]`` int64 fixed parent cells.
        coarse: ``[n]`` int64 coarse cells (inside the parents).
        fine: ``[n]`` int64 fine cells (inside the coarse cells).
        points, weights: as for :func:`lloyd_within`.
        lam: weights of the two levels' errors.
        iters: maximum iterations.

    Returns:
        ``(coarse [n], fine [n])`` int64 labels, numbered ``0..C-1`` each.
    """
    iters = check_int(iters, "iters", min=0)
    top = cell_table(coarse, parents)
    sub = cell_table(fine, top.cell)
    num1, width1 = int(top.slot.numel()), top.options.shape[1]
    width2 = sub.options.shape[1]
    # fine options of each parent: [P, G1 * G2], ids offset by the coarse cells
    nested = sub.options[top.options.clamp_min(0)]
    nested = torch.where((top.options[..., None] >= 0) & (nested >= 0), nested + num1, -1)
    options = torch.cat([top.options, nested.flatten(1)], 1)
    c1, c2 = top.cell, sub.cell
    w = _centroid_weights(weights, points.dtype)
    scale = (lam[0] + lam[1]) * points.pow(2).sum(-1)
    rows = torch.arange(points.shape[0], device=points.device)
    scan = OptionScanner(points, top.parent, options, block_elements)
    for _ in range(iters):
        centers1, mass1 = cell_centroids(points, w, c1, num1)
        centers2, mass2 = cell_centroids(points, w, c2, sub.slot.numel())
        dist = scan(torch.cat([centers1, centers2]), torch.cat([mass1, mass2]) > 0)
        d1 = lam[0] * dist[:, :width1]
        d2 = lam[1] * dist[:, width1:].reshape(-1, width1, width2)
        best2, j2 = d2.min(2)
        total = d1 + best2
        current = total[rows, top.slot[c1]] - best2[rows, top.slot[c1]] + d2[rows, top.slot[c1], sub.slot[c2]]
        best, j1 = total.min(1)
        move = best < current - _MOVE_MARGIN * (current + scale)
        if not bool(move.any()):
            break
        c1 = torch.where(move, top.options[top.parent, j1], c1)
        c2 = torch.where(move, sub.options[c1, j2[rows, j1]], c2)
    return c1, c2


def _centroid_weights(weights: Tensor, dtype: torch.dtype) -> Tensor:
    """Weights for centroids: codewords without data get a tiny share, so a cell of
    only such codewords still has a centroid (their plain mean)."""
    w = weights.to(dtype)
    positive = w[w > 0]
    tiny = 1e-6 * (float(positive.mean()) if positive.numel() else 1.0)
    return torch.where(w > 0, w, torch.full_like(w, tiny))
