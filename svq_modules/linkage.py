"""Linkage-cost kernels of the merge tree: cheapest partners and exact pair costs.

Pure, blocked tensor functions over the merge geometry of
:class:`~svq_modules.hierarchy.MergeState`: node centroids ``mu [M+1, D]``,
weights ``weight [M+1]`` and ``sqnorm = |mu|^2``. Ward's cost of two nodes is
``|mu_a - mu_b|^2 / (1/w_a + 1/w_b)``; centroid linkage's is ``|mu_a - mu_b|^2``.
The last row (id ``M``) is a sentinel that pads candidate lists.

With a constraint label per node, only nodes of the same label are partners.
:func:`candidate_rows` then compares each row with its own label's nodes only
(:mod:`svq_modules.groups`), so a constrained scan costs the sum over labels
of rows x label size instead of rows x all nodes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .groups import piece_batches, split_pieces

__all__ = ["LINKAGES", "candidate_rows", "pair_costs"]

LINKAGES = ("ward", "centroid")

# at least this many rows per block of a dense scan: fewer, larger products for large K
_MIN_BLOCK_ROWS = 64
# rows of one label per piece of a constrained scan
_PIECE_ROWS = 256


def candidate_rows(
    rows: Tensor,
    active: Tensor,
    mu: Tensor,
    weight: Tensor,
    sqnorm: Tensor,
    linkage: str,
    k: int,
    block_elements: int,
    label: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The ``k`` cheapest active partners of each node in ``rows``.

    Blocked so that about ``block_elements`` costs are in memory at once.

    Args:
        rows: ``[R]`` int64 node ids (all active).
        active: ``[m]`` int64 active node ids, sorted ascending.
        mu, weight, sqnorm: merge geometry, ``[M+1, D]``, ``[M+1]``, ``[M+1]``.
        linkage: one of :data:`LINKAGES`.
        k: list length.
        block_elements: memory knob.
        label: optional ``[M+1]`` int64 constraint label of each node; then
            only nodes of the same label are partners.

    Returns:
        ``(cand [R, k] int64, cost [R, k] float)`` sorted by cost; missing
        partners (fewer than k others) are padded with the sentinel id
        ``mu.shape[0] - 1`` and cost ``inf``.
    """
    sentinel = mu.shape[0] - 1
    cand = torch.full((rows.shape[0], k), sentinel, dtype=torch.long, device=mu.device)
    cost = torch.full((rows.shape[0], k), math.inf, dtype=mu.dtype, device=mu.device)
    if active.shape[0] < 2 or rows.shape[0] == 0:
        return cand, cost
    if label is None:
        _dense_rows(rows, active, mu, weight, sqnorm, linkage, block_elements, cand, cost)
    else:
        _labelled_rows(rows, active, mu, weight, sqnorm, linkage, block_elements, label, cand, cost)
    cand[~torch.isfinite(cost)] = sentinel
    return cand, cost


def _dense_rows(
    rows: Tensor, active: Tensor, mu: Tensor, weight: Tensor, sqnorm: Tensor, linkage: str, block_elements: int,
    cand: Tensor, cost: Tensor,
) -> None:
    """:func:`candidate_rows` without labels: blocks of rows against every active node (fills ``cand``, ``cost``)."""
    num_rows, num_active = rows.shape[0], active.shape[0]
    kk = min(cand.shape[1], num_active - 1)
    # squared distances in one product: [mu_r, |mu_r|^2, 1] . [-2 mu_a, 1, |mu_a|^2]
    cols = torch.cat([-2.0 * mu[active], torch.ones_like(sqnorm[active])[:, None], sqnorm[active, None]], 1)
    cols = cols.T.contiguous()
    w_inv = 1.0 / weight[active]
    self_pos = torch.searchsorted(active, rows)
    step = max(_MIN_BLOCK_ROWS, block_elements // num_active)
    buf = None
    for start in range(0, num_rows, step):
        r = rows[start : start + step]
        dist = torch.cat([mu[r], sqnorm[r, None], torch.ones_like(sqnorm[r])[:, None]], 1) @ cols
        if linkage == "ward":
            if buf is None or buf.shape[0] != r.shape[0]:
                buf = torch.empty_like(dist)
            dist.div_(torch.add(w_inv[None, :], (1.0 / weight[r])[:, None], out=buf))
        dist[torch.arange(r.shape[0], device=r.device), self_pos[start : start + step]] = math.inf
        if kk == 1:
            c, j = dist.min(dim=1, keepdim=True)
        else:  # the largest of the negated costs: the same k, a faster kernel on CPU than largest=False
            c, j = torch.topk(dist.neg_(), kk, dim=1, sorted=True)
            c.neg_()
        cand[start : start + step, :kk] = active[j]
        cost[start : start + step, :kk] = c.clamp_(min=0.0)


def _labelled_rows(
    rows: Tensor, active: Tensor, mu: Tensor, weight: Tensor, sqnorm: Tensor, linkage: str, block_elements: int,
    label: Tensor, cand: Tensor, cost: Tensor,
) -> None:
    """:func:`candidate_rows` with labels: each row against its own label's active nodes, in padded
    batches of label pieces (largest labels first); fills ``cand``, ``cost``."""
    device = mu.device
    uniq, inverse, size = torch.unique(label[active], return_inverse=True, return_counts=True)
    by_size = torch.argsort(-size, stable=True)
    rank = torch.empty_like(by_size)
    rank[by_size] = torch.arange(by_size.numel(), device=device)
    col_sorted = active[torch.argsort(rank[inverse], stable=True)]  # active nodes by label rank
    col_start = torch.empty_like(size)
    col_start[by_size] = torch.cumsum(size[by_size], 0) - size[by_size]
    row_group = torch.searchsorted(uniq, label[rows])
    pieces = split_pieces(row_group, rank, _PIECE_ROWS)
    width = size[pieces.group]
    height = width.clamp_max(_PIECE_ROWS)  # a label's rows are among its active nodes
    dim = mu.shape[1]
    offsets = torch.arange(int(width[0]), device=device)
    for first, last, num_r, num_c in piece_batches(height, width, block_elements, extra=dim + 2):
        pos, row_ok = pieces.rows(first, last, num_r)
        r = rows[pos]  # [b, R]
        group = pieces.group[first:last]
        col_ok = offsets[None, :num_c] < size[group][:, None]
        c = col_sorted[(col_start[group][:, None] + offsets[None, :num_c]).clamp_max(col_sorted.numel() - 1)]
        x = torch.cat([mu[r], sqnorm[r][..., None], torch.ones_like(sqnorm[r])[..., None]], -1)
        y = torch.cat([-2.0 * mu[c], torch.ones_like(sqnorm[c])[..., None], sqnorm[c][..., None]], -1)
        dist = torch.bmm(x, y.transpose(1, 2))  # [b, R, W]
        if linkage == "ward":
            dist.div_((1.0 / weight[r])[..., None] + (1.0 / weight[c])[:, None, :])
        dist.masked_fill_(~col_ok[:, None, :] | (c[:, None, :] == r[..., None]), math.inf)
        kk = min(cand.shape[1], num_c)
        best, j = torch.topk(dist, kk, dim=2, largest=False, sorted=True)
        picked = torch.gather(c[:, None, :].expand(-1, num_r, -1), 2, j)
        out = pos[row_ok]
        cand[out, :kk] = picked[row_ok]
        cost[out, :kk] = best[row_ok].clamp_(min=0.0)


def pair_costs(
    rows: Tensor, cols: Tensor, mu: Tensor, weight: Tensor, linkage: str, block: int, label: Tensor | None = None
) -> Tensor:
    """Exact linkage cost of node pairs ``(rows[i], cols[i])``: ``[P]`` float (inf across labels)."""
    out = torch.empty(rows.shape, dtype=mu.dtype, device=mu.device)
    for start in range(0, rows.shape[0], block):
        r, c = rows[start : start + block], cols[start : start + block]
        d = (mu[c] - mu[r]).pow(2).sum(-1)
        if linkage == "ward":
            d = d * (weight[r] * weight[c] / (weight[r] + weight[c]))
        if label is not None:
            d = d.masked_fill(label[r] != label[c], math.inf)
        out[start : start + block] = d
    return out
