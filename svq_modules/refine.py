"""Lloyd refinement of the layers, keeping them nested.

The greedy cut of a Ward tree is close to a flat k-means of the same size, but
the tree fixes which leaves travel together. Refinement lets each layer's
partition move: top-down, layer by layer,

1. cut layer l inside every cell of layer l-1 (greedy cut of the current tree),
2. run count-weighted Lloyd iterations on the leaves, each leaf choosing among
   the layer-l cells of its own layer-(l-1) cell (so the nesting holds),
3. rebuild the tree with those cells as constraints (merges stay inside the
   finest cells first, then inside coarser ones), so every refined cell is a
   subtree and the next layer cuts inside it.

Costs one tree build per listed layer; every step is batched tensor work.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .hierarchy import Hierarchy, build_constrained_hierarchy
from .layers import LayerTables, build_layers, resolve_bits
from .validation import BitProposal, check_bit_proposal, check_int

__all__ = ["build_refined", "lloyd_within"]


def lloyd_within(cells: Tensor, parents: Tensor, points: Tensor, weights: Tensor, iters: int = 10) -> Tensor:
    """Count-weighted Lloyd on leaves, each moving only among its parent's cells.

    Args:
        cells: ``[K]`` int64 cell label of each leaf.
        parents: ``[K]`` int64 parent-cell label (cells never straddle parents).
        points: ``[K, D]`` float leaf positions (data means).
        weights: ``[K]`` float > 0 leaf weights (data counts).
        iters: maximum Lloyd iterations, an int >= 0 (stops early when nothing moves).

    Returns:
        ``[K]`` int64 refined cell labels (a subset of the input labels).
    """
    iters = check_int(iters, "iters", min=0)
    uniq, cell = torch.unique(cells, return_inverse=True)
    num_cells = uniq.numel()
    cell_parent = torch.zeros(num_cells, dtype=torch.long, device=cells.device).scatter_(0, cell, parents)
    # cells of each parent, padded: table [P, G]
    _, parent_id = torch.unique(cell_parent, return_inverse=True)
    order = torch.argsort(parent_id, stable=True)
    sorted_parent = parent_id[order]
    slot = torch.arange(num_cells, device=cells.device) - torch.searchsorted(sorted_parent, sorted_parent)
    width = int(slot.max()) + 1
    table = torch.full((int(parent_id.max()) + 1, width), -1, dtype=torch.long, device=cells.device)
    table[sorted_parent, slot] = order
    options = table[parent_id[cell]]  # [K, G] candidate cells of each leaf
    valid = options >= 0
    options_safe = options.clamp_min(0)
    w = weights.to(points.dtype)
    for _ in range(iters):
        mass = torch.zeros(num_cells, dtype=points.dtype, device=points.device).index_add_(0, cell, w)
        total = torch.zeros(num_cells, points.shape[1], dtype=points.dtype, device=points.device)
        total.index_add_(0, cell, points * w[:, None])
        centers = total / mass.clamp_min(torch.finfo(points.dtype).tiny)[:, None]
        dist = (points[:, None, :] - centers[options_safe]).pow(2).sum(-1)
        dist = dist.masked_fill(~valid | (mass[options_safe] <= 0), float("inf"))
        new_cell = options_safe.gather(1, dist.argmin(1, keepdim=True)).squeeze(1)
        if torch.equal(new_cell, cell):
            break
        cell = new_cell
    return uniq[cell]


def build_refined(
    codebook: Tensor,
    counts: Tensor | None = None,
    sums: Tensor | None = None,
    bits: BitProposal = (4, 2, 2, 2, 2),
    *,
    num_layers: int | None = None,
    iters: int = 10,
    linkage: str = "ward",
    cut: str = "greedy",
    block_size: int | None = None,
    progress: bool = False,
    unconstrained: Hierarchy | None = None,
) -> tuple[Hierarchy, LayerTables]:
    """Hierarchy and layer tables with Lloyd-refined, nested layers.

    Args:
        codebook: ``[K, D]`` float codewords.
        counts, sums: per-code statistics (see :func:`~svq_modules.hierarchy.code_statistics`).
        bits: bit proposal (see :func:`~svq_modules.layers.resolve_bits`).
        num_layers: total layers L (final layer included) for non-list proposals.
        iters: Lloyd iterations per layer (an int >= 0).
        unconstrained: the plain tree of the same inputs, if already built
            (saves one build).
        linkage, block_size, progress, cut: as for
            :func:`~svq_modules.hierarchy.build_hierarchy` /
            :func:`~svq_modules.layers.build_layers`.

    Returns:
        ``(hierarchy, tables)``: every listed layer's nodes are its refined
        cells; decoding all layers still gives the exact codewords.
    """
    # check the arguments before the first (costly) build
    bits, num_layers = check_bit_proposal(bits, num_layers, need_num_layers=False)
    iters = check_int(iters, "iters", min=0)
    build = dict(linkage=linkage, block_size=block_size, progress=progress)
    if unconstrained is None:
        hierarchy, level = build_constrained_hierarchy(codebook, counts, sums, **build)
    else:  # no layer is constrained yet, so the node levels are not needed
        hierarchy, level = unconstrained, None
    widths = resolve_bits(bits, hierarchy, num_layers, cut)
    num_codes = codebook.shape[0]
    leaf_count = hierarchy.count[:num_codes]
    points = hierarchy.center[:num_codes].clone()
    if sums is not None and counts is not None:
        has_data = leaf_count > 0
        points[has_data] = sums.to(points)[has_data] / leaf_count[has_data, None]
    weights = leaf_count.clamp_min(1e-6) if counts is not None else torch.ones_like(leaf_count)
    labels: list[Tensor] = []
    for layer in range(len(widths)):
        tables = build_layers(hierarchy, widths[: layer + 1], cut=cut, node_level=level, constrained_layers=layer)
        parents = labels[-1] if labels else torch.zeros(num_codes, dtype=torch.long, device=codebook.device)
        labels.append(lloyd_within(tables.leaf_node[layer], parents, points, weights, iters))
        hierarchy, level = build_constrained_hierarchy(codebook, counts, sums, torch.stack(labels), **build)
    tables = build_layers(hierarchy, widths, cut=cut, node_level=level, constrained_layers=len(widths))
    return hierarchy, tables
