"""Work per group of rows, batched: variable-size groups cut into padded pieces.

Several kernels compare every row of a group with a few *columns* of the same
group (a node with the other nodes of its cell, a codeword with the cells of
its parent). Looping over groups would cost one Python iteration per cell;
one dense product over everything would cost rows x all columns. Instead the
rows are ordered by group, cut into *pieces* (at most ``max_rows`` rows of one
group each), and consecutive pieces are stacked into padded batches of bounded
size, so one batched product serves many groups and the padding stays small.
The caller orders the groups so that the sizes it pads to shrink along the
pieces; a batch then pads to the sizes of its first piece.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["Pieces", "rank_in_runs", "split_pieces", "piece_batches"]


class Pieces(NamedTuple):
    """Rows ordered by group rank, cut into pieces of one group each.

    Attributes:
        order: ``[n]`` int64 row positions (into the caller's rows), by group rank.
        start: ``[P]`` int64 offset of each piece in ``order``.
        length: ``[P]`` int64 rows of each piece (1..max_rows).
        group: ``[P]`` int64 group of each piece.
    """

    order: Tensor
    start: Tensor
    length: Tensor
    group: Tensor

    @property
    def num_pieces(self) -> int:
        return self.start.shape[0]

    def by_length(self) -> Pieces:
        """The same pieces, longest first (so padded heights shrink along them)."""
        order = torch.argsort(-self.length, stable=True)
        return Pieces(order=self.order, start=self.start[order], length=self.length[order], group=self.group[order])

    def rows(self, first: int, last: int, width: int) -> tuple[Tensor, Tensor]:
        """Row positions of pieces ``first..last-1`` padded to ``width``: ``([b, width] int64, valid [b, width] bool)``.

        ``width`` must be at least the longest of these pieces."""
        offset = torch.arange(width, device=self.order.device)
        valid = offset[None, :] < self.length[first:last, None]
        pos = (self.start[first:last, None] + offset[None, :]).clamp_max(self.order.shape[0] - 1)
        return self.order[pos], valid


def rank_in_runs(keys: Tensor) -> Tensor:
    """``[n]`` int64 position of each element among its equal keys, for ``keys [n]`` sorted
    ascending: ``[3, 3, 5, 7, 7, 7] -> [0, 1, 0, 0, 1, 2]``."""
    return torch.arange(keys.shape[0], device=keys.device) - torch.searchsorted(keys, keys)


def split_pieces(row_group: Tensor, group_rank: Tensor, max_rows: int) -> Pieces:
    """Order rows by ``group_rank[row_group]`` and cut each group's rows into pieces.

    Args:
        row_group: ``[n]`` int64 group of each row, in ``[0, G)``.
        group_rank: ``[G]`` int64 position of each group in the wanted order
            (a permutation of ``0..G-1``).
        max_rows: most rows per piece.

    Returns:
        :class:`Pieces` (pieces follow the group order).
    """
    rank = group_rank[row_group]
    order = torch.argsort(rank, stable=True)
    rank_sorted = rank[order]
    pos = rank_in_runs(rank_sorted)
    start = ((pos % max_rows) == 0).nonzero().squeeze(1)
    length = torch.diff(start, append=start.new_tensor([order.shape[0]]))
    return Pieces(order=order, start=start, length=length, group=row_group[order[start]])


def piece_batches(
    height: Tensor, width: Tensor, block_elements: int, extra: int = 0
) -> Iterator[tuple[int, int, int, int]]:
    """Consecutive pieces in batches of about ``block_elements`` padded cells.

    Args:
        height: ``[P]`` int64 rows each piece pads to, non-increasing.
        width: ``[P]`` int64 columns each piece pads to, non-increasing.
        block_elements: padded ``rows x (columns + extra)`` cells per batch (a
            batch holds at least one piece).
        extra: cells per row beside the columns (e.g. the row's own features).

    Yields:
        ``(first, last, rows, cols)``: pieces ``first..last-1`` padded to
        ``rows x cols`` (the sizes of the batch's first piece).
    """
    heights, widths = height.tolist(), width.tolist()
    first, total = 0, len(heights)
    while first < total:
        rows, cols = max(1, heights[first]), max(1, widths[first])
        last = min(total, first + max(1, block_elements // (rows * (cols + extra))))
        yield first, last, rows, cols
        first = last
