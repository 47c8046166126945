"""Vectorized walks up a parent-pointer tree (pointer doubling).

Every function takes ``parent: [M] int64`` (-1 at the root) and runs in
``O(M log depth)`` tensor work, with no python loop over nodes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["scan_to_marked", "node_depth"]


def scan_to_marked(
    parent: Tensor,
    marked: Tensor,
    values: Tensor | None = None,
    op: Callable[[Tensor, Tensor], Tensor] = torch.minimum,
    identity: float = float("inf"),
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Nearest marked ancestor-or-self of every node, and a fold of values on the way.

    Args:
        parent: ``[M]`` int64 parent ids, -1 at the root.
        marked: ``[M]`` bool.
        values: optional ``[M]`` float values to fold with ``op`` over the
            nodes strictly below the marked ancestor (``v`` itself included,
            the marked node excluded).
        op: associative fold, e.g. ``torch.minimum`` or ``torch.add``.
        identity: the fold's identity element.

    Returns:
        ``(ancestor [M] int64, found [M] bool, folded [M] float | None)``.
        Where no marked node lies on the path to the root, ``found`` is False
        and ``ancestor`` is the root.
    """
    num_nodes = parent.shape[0]
    ids = torch.arange(num_nodes, device=parent.device)
    stop = marked | (parent < 0)
    jump = torch.where(stop, ids, parent)
    agg = None
    if values is not None:
        agg = torch.where(stop, torch.full_like(values, identity), values)
    while True:
        nxt = jump[jump]
        if torch.equal(nxt, jump):
            break
        if agg is not None:
            agg = op(agg, agg[jump])
        jump = nxt
    return jump, marked[jump], agg


def node_depth(parent: Tensor) -> Tensor:
    """Edges from each node to its root: ``[M]`` int64."""
    is_root = parent < 0
    ones = (~is_root).to(torch.float64)
    _, _, depth = scan_to_marked(parent, is_root, ones, torch.add, 0.0)
    return depth.round().long()
