"""The raw cost of the full depth kept within ``ceil(log2 K) + 2`` bits per vector.

A vector's raw (fixed-length) cost at full depth is the sum, over the layers,
of ``ceil(log2 g)`` for the group of ``g`` nodes its symbol is drawn from
(:func:`~svq_modules.layers.symbol_bits`). The Lloyd-optimised cells of
:mod:`svq_modules.nested` spend their cells where they remove the most error,
so the many near-identical, heavily used codewords of smooth data end up
together in big cells: splitting them removes little error. The final layer
then codes each of them with as many bits as its big group needs; on the 4x4
patches of matplotlib's grace_hopper.jpg (``bench/bench_core.py``) the default
cost 12.17 raw bits per vector at K=1024 and 14.43 at K=4096, above the 12 / 14
the package promises.

:func:`cap_raw_bits` keeps the cells wherever the promise holds. Where it
does not, it re-cuts the *free* listed layers, those of at least ``log2 K``
cumulative bits (the flat k-means bound there would have at least K cells, so
it constrains nothing), inside the cells of the last layer before them, by
:func:`fewest_bits_split`: heavily used codewords get small groups. It does so
cell by cell, in the order of the least squared error added at the free
layers per raw bit saved, until the count-weighted mean cost is within the cap.
The entropy-coded cost at full depth does not change (it is ``H(indices)``
whatever the cells).

A cap, not a guarantee: without a free layer (e.g. bits ``[4, 2, 2]`` at
K=1024), or on a codebook skewed enough that even every cell re-cut is not
enough (the layers below ``log2 K`` bits are never touched, since their error
is what the flat bound constrains), the cost stays above it; the cells are
then re-cut wherever that saves bits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import accumulate

import torch
from torch import Tensor

from .layers import group_bits
from .lloyd import point_errors
from .validation import check_int

__all__ = ["cap_raw_bits", "fewest_bits_split", "nested_raw_bits", "raw_bits_cap"]


def raw_bits_cap(num_codes: int) -> int:
    """The promised raw cost of the full depth: ``ceil(log2 K) + 2`` bits per vector."""
    num_codes = check_int(num_codes, "num_codes", min=1)
    return math.ceil(math.log2(num_codes)) + 2


def nested_raw_bits(labels: Sequence[Tensor]) -> Tensor:
    """Raw bits each codeword's vectors spend over nested listed layers and the final layer.

    Args:
        labels: per listed layer (base first), ``[K]`` int cell of each
            codeword; each layer's cells are unions of the next layer's.

    Returns:
        ``[K]`` int64: the sum over the layers of ``ceil(log2 g)``, ``g`` the
        number of cells (in the final layer: codewords) of the codeword's
        cell in the layer above (the root for the base layer).
    """
    if not labels:
        raise ValueError("labels is empty; expected at least one listed layer")
    num_codes = labels[0].shape[0]
    device = labels[0].device
    bits = torch.zeros(num_codes, dtype=torch.long, device=device)
    parent = torch.zeros(num_codes, dtype=torch.long, device=device)
    for cells in [*labels, torch.arange(num_codes, device=device)]:
        _, up = torch.unique(parent, return_inverse=True)
        _, cell = torch.unique(cells, return_inverse=True)
        cell_up = torch.zeros(int(cell.max()) + 1, dtype=torch.long, device=device).scatter_(0, cell, up)
        bits += group_bits(torch.bincount(cell_up, minlength=int(up.max()) + 1))[up]
        parent = cells
    return bits


def fewest_bits_split(cells: Tensor, weights: Tensor, bits: int) -> Tensor:
    """Cut every cell into at most ``2**bits`` groups of its codewords, leaving the fewest raw bits.

    The cost of a cut of a cell into ``G`` groups is what its vectors spend
    in this layer and in a final layer below it:
    ``weight(cell) * ceil(log2 G) + sum over groups of weight(group) * ceil(log2 size(group))``.
    The codewords of a cell go, heaviest first, into consecutive groups, every
    group but the last of a power-of-two size; some best cut is always of
    that form (a group can be filled up to the next power of two from the
    groups after it at no cost), so the result is exact. All cells are cut at
    once by dynamic programming over (groups used, codewords placed), cells
    batched by size (sizes in ``(2**(j-1), 2**j]`` together, so padding at most
    doubles them): per batch, one step per number of groups and group size,
    none per cell.

    Args:
        cells: ``[K]`` int cell of each codeword.
        weights: ``[K]`` float >= 0 data counts.
        bits: bits of the layer, an int >= 1 (at most ``2**bits`` groups per cell).

    Returns:
        ``[K]`` int64 labels nested in ``cells``: ``cell * G + group``, cells
        numbered compactly, ``G = min(2**bits, largest cell)``.
    """
    bits = check_int(bits, "bits", min=1)
    device = cells.device
    _, cell = torch.unique(cells, return_inverse=True)
    num_cells = int(cell.max()) + 1
    order = torch.argsort(-weights.double(), stable=True)
    order = order[torch.argsort(cell[order], stable=True)]  # by cell, heaviest first inside
    sorted_cell, sorted_weight = cell[order], weights.double()[order]
    size = torch.bincount(cell, minlength=num_cells)
    pos = torch.arange(cell.numel(), device=device) - (torch.cumsum(size, 0) - size)[sorted_cell]
    most = min(1 << min(bits, 62), int(size.max()))
    group = torch.zeros_like(cell)  # of each codeword in sorted order
    batch = group_bits(size)  # cells of sizes in (2**(j-1), 2**j] share a batch
    local = torch.full((num_cells,), -1, dtype=torch.long, device=device)
    for j in torch.unique(batch).tolist():
        members = torch.nonzero(batch == j).squeeze(1)
        local[members] = torch.arange(members.numel(), device=device)
        row = local[sorted_cell]
        mine = row >= 0
        table = torch.zeros(members.numel(), int(size[members].max()), dtype=torch.float64, device=device)
        table[row[mine], pos[mine]] = sorted_weight[mine]
        group[mine] = _cut_positions(table, size[members], most)[row[mine], pos[mine]]
        local[members] = -1
    out = torch.empty_like(cell)
    out[order] = sorted_cell * most + group
    return out


def _cut_positions(table: Tensor, size: Tensor, most: int) -> Tensor:
    """The dynamic programme of :func:`fewest_bits_split` for one batch of cells.

    Args:
        table: ``[C, W]`` float64 weights of each cell's codewords, heaviest first, 0-padded.
        size: ``[C]`` int64 codewords per cell.
        most: groups allowed per cell.

    Returns:
        ``[C, W]`` int64 group of each position.
    """
    device = table.device
    num_cells, width = table.shape
    prefix = torch.cat([torch.zeros_like(table[:, :1]), table.cumsum(1)], 1)  # weight of the first i codewords
    placed = torch.arange(width + 1, device=device)
    rest = size[:, None] - placed  # codewords left after the first i
    rest_cost = (prefix[:, -1:] - prefix) * group_bits(rest).double()
    sizes = [1 << e for e in range(width.bit_length()) if (1 << e) <= width]
    cost = torch.where(placed == 0, 0.0, math.inf).double().expand(num_cells, -1).clone()
    best = torch.full((num_cells,), math.inf, dtype=torch.float64, device=device)
    best_groups = torch.zeros(num_cells, dtype=torch.long, device=device)
    best_placed = torch.zeros(num_cells, dtype=torch.long, device=device)
    steps: list[Tensor] = []  # per group: log2 of the size that reached each position (uint8)
    limit = min(most, width)
    for groups in range(limit):
        # close the cut: the rest of the cell in one more group; every vector of the cell
        # then also pays ceil(log2(groups + 1)) bits for this layer's symbol
        layer_cost = prefix[:, -1] * float(groups.bit_length())
        total = torch.where(rest >= 1, cost + rest_cost, math.inf) + layer_cost[:, None]
        low, at = total.min(1)
        better = low < best
        best = torch.where(better, low, best)
        best_groups = torch.where(better, groups, best_groups)
        best_placed = torch.where(better, at, best_placed)
        if groups + 1 == limit:
            break
        nxt = torch.full_like(cost, math.inf)
        step = torch.zeros(cost.shape, dtype=torch.uint8, device=device)
        for s in sizes:
            cand = cost[:, :-s] + (prefix[:, s:] - prefix[:, :-s]) * (s.bit_length() - 1)
            better = cand < nxt[:, s:]
            nxt[:, s:] = torch.where(better, cand, nxt[:, s:])
            step[:, s:] = torch.where(better, s.bit_length() - 1, step[:, s:])
        steps.append(step)
        cost = nxt
    # walk back: every group's first position is a boundary
    rows = torch.arange(num_cells, device=device)
    starts = torch.zeros(num_cells, width + 1, dtype=torch.long, device=device)
    starts[rows, best_placed] = 1  # the last group
    at = best_placed.clone()
    for groups in range(len(steps), 0, -1):
        active = best_groups >= groups
        at = torch.where(active, at - (1 << steps[groups - 1][rows, at].long()), at)
        starts[rows[active], at[active]] = 1
    starts[:, 0] = 0
    return starts.cumsum(1)[:, :width]


def cap_raw_bits(points: Tensor, weights: Tensor, labels: list[Tensor], widths: Sequence[int]) -> list[Tensor]:
    """Nested cells whose full depth costs at most :func:`raw_bits_cap` raw bits per vector (module docstring).

    Args:
        points: ``[K, D]`` float codeword data means.
        weights: ``[K]`` float >= 0 data counts (all zero: every codeword weighs 1).
        labels: per listed layer, ``[K]`` int64 nested cells.
        widths: bits of each listed layer.

    Returns:
        ``labels`` itself where the cost is within the cap, or where no listed
        layer after the base reaches ``log2 K`` bits (nothing to re-cut); else
        new labels, the same above the first free layer: the fewest cells
        re-cut that bring the cost within the cap, or every cell whose re-cut
        saves bits where that is not enough.
    """
    num_codes = points.shape[0]
    if float(weights.sum()) <= 0:
        weights = torch.ones_like(weights)
    cumulative = list(accumulate(widths))
    free = [layer for layer in range(1, len(labels)) if cumulative[layer] >= math.log2(num_codes)]
    if not free:  # nothing to re-cut: no need to count the bits (most builds of large K)
        return labels
    w = weights.double()
    raw = nested_raw_bits(labels)
    excess = float((w * raw).sum()) - raw_bits_cap(num_codes) * float(w.sum())
    if excess <= 0:
        return labels
    alternative = list(labels)
    for layer in free:
        alternative[layer] = fewest_bits_split(alternative[layer - 1], w, widths[layer])
    _, unit = torch.unique(labels[free[0] - 1], return_inverse=True)
    num_units = int(unit.max()) + 1
    saved = torch.zeros(num_units, dtype=torch.float64, device=w.device)
    saved.index_add_(0, unit, w * (raw - nested_raw_bits(alternative)))
    added = torch.zeros_like(saved)
    for layer in free:
        change = point_errors(points, weights, alternative[layer]) - point_errors(points, weights, labels[layer])
        added.index_add_(0, unit, change)
    candidates = torch.nonzero(saved > 0).squeeze(1)
    candidates = candidates[torch.argsort(added[candidates] / saved[candidates], stable=True)]
    taken = torch.cumsum(saved[candidates], 0)
    needed = int(torch.searchsorted(taken, torch.tensor(excess, dtype=taken.dtype, device=taken.device))) + 1
    chosen = torch.zeros(num_units, dtype=torch.bool, device=w.device)
    chosen[candidates[:needed]] = True
    out = list(labels)
    for layer in free:
        offset = int(labels[layer].max()) + 1
        out[layer] = torch.where(chosen[unit], alternative[layer] + offset, labels[layer])
    return out
