"""Nested layers near the flat k-means bound: the default (``cut="nested"``) of every build.

A layer of ``b`` bits splits every cell of the layer above into at most ``2**b``
cells. The greedy cut of a Ward tree (:mod:`svq_modules.layers`, option
``cut="greedy"``) gets close to a flat k-means with as many cells, but the tree
fixes which codewords travel together, so its coarse layers stay 3-15 % above
the bound. Here the cells themselves are optimised, top-down, with
count-weighted Lloyd iterations on the K codewords (their data means, weighted
by their data counts, so the codewords' error is the data's error up to a
constant):

1. a Ward tree (:func:`~svq_modules.hierarchy.build_hierarchy`) and its greedy
   cut give every layer a starting partition and a reference error. Up to
   :data:`MAX_START_UNITS` codewords the tree is built on the codewords; above,
   on that many *start units* (:func:`start_units`: a top-down weighted k-means
   of the codewords, split by at most 16 per pass), which keeps the start
   cheap at any K (about 7 s at K=65536, D=64 on 2 CPU cores, where a Ward
   tree of all the codewords takes 25-30 s);
2. layer by layer, with the layer above fixed, this layer and the next one
   are refined inside their parent cells (:mod:`svq_modules.lloyd`):

   * *joint*: both levels at once (each codeword picks a cell and a sub-cell
     together), which moves coarse cells only where the finer layer follows;
     the layer after then starts from the new finer cells, each cut again by
     Ward agglomeration (:func:`~svq_modules.hierarchy.ward_clusters`, on the
     Ward tree's finer cells as units);
   * for the base layer also *sequential*: this level alone first, then the
     next level is cut again inside the new cells by Ward agglomeration and
     both levels are refined jointly from there (in ``bench/bench_core.py``
     this lowered the 6-bit layers by up to 6 %, against refining the next
     level alone, for at most 1.5 % more on the base layer); of the two, the one
     whose worse level, as a ratio to the greedy cut's error at that level,
     is lower is kept;
3. where the cells would cost more than ``ceil(log2 K) + 2`` raw bits per
   vector at full depth, the listed layers of at least ``log2 K`` bits are
   re-cut cell by cell so that heavily used codewords get small groups, until
   they do not or all are re-cut (:func:`~svq_modules.raw_cap.cap_raw_bits`;
   the layers below ``log2 K`` bits stay as they are);
4. one constrained build (:func:`~svq_modules.hierarchy.build_constrained_hierarchy`)
   turns the nested labels into a tree: Ward inside the finest cells, then
   inside each coarser cell, so every cell is a subtree, and
   :func:`~svq_modules.layers.build_layers` cuts exactly those cells.

Two tree builds in all (the second one only merges inside small cells), a few
Lloyd iterations per layer; every step is batched tensor work on the
codebook's device. Full depth still decodes the exact codeword, and the
layers' entropy-coded cost telescopes to ``H(indices)`` at full depth whatever
the cells are (:func:`~svq_modules.layers.layer_rates`).

Measured and not kept (the data of ``bench/bench_core.py``, MSE as a ratio to
its flat bound; default: china pixels K=1024 base layer 0.931, splats K=1024
1.055 / 1.076 at 6 / 8 bits):

* more Lloyd iterations (10, 20): pixels 0.928, splats 1.053 / 1.074;
* the base layer's best of 4-16 weighted k-means++ restarts (on the codewords,
  or on the greedy cut's finer cells): pixels 0.916-0.948 by the random stream,
  and 0.05-0.3 s more at K=4096, where the build must stay 100x faster than the
  seed (108x on the 2-core machine of that run);
* the finer level's weight times 0.5, 2 or 4 in the joint step, and per parent
  the better of the Ward split and a k-means++ split as the finer level's start:
  splats 1.053-1.058 / 1.071-1.078;
* the base layer alone as the best of 8 batched weighted k-means++ starts (20
  Lloyd iterations), when better than the greedy start's: pixels K=1024 0.916-0.928
  by the random stream, but its 8-bit layer 1.010-1.052, and 0.04-0.1 s more at K=4096;
* after the layers are built, Lloyd over whole paths (each codeword picks its
  cells at every listed layer at once, the levels weighted by their inverse
  errors): changes of at most 0.003 (a local optimum of the nested cells);
* the starting tree on 2048 or 1024 start units at K=4096 (instead of all the
  codewords): 12 % / 15 % faster, but the 10-bit layer up to 1.018 (pixels) and
  1.113 (splats) with 1024, and flower patches 0.74-0.80 -> 0.79-0.84 with 2048.

Without the nesting, weighted k-means of the codewords (scikit-learn
``KMeans``, 10 starts) reaches 1.033 / 1.028 on splats at 6 / 8 bits: there
the nesting itself costs 2-5 %.

:func:`build_scalable` is the one entry point for every option: the nested
layers (``cut="nested"``, default), a cut of the plain Ward tree
(``"greedy"``, ``"depth"``), or the per-layer rebuild of
:func:`~svq_modules.refine.build_refined` (``refine=True``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .hierarchy import Hierarchy, build_constrained_hierarchy, build_hierarchy, code_points, ward_clusters
from .layers import CUTS, LayerTables, build_layers, resolve_bits
from .lloyd import cell_error, joint_lloyd, lloyd_within, seed_within
from .raw_cap import cap_raw_bits
from .refine import build_refined
from .validation import BitProposal, check_bit_proposal, check_int

__all__ = ["MAX_START_UNITS", "build_nested", "build_scalable", "nested_cells", "start_units"]

# a finer level's error weighs at most this many times the coarser one's in the joint step
_MAX_LEVEL_WEIGHT = 16.0
# the Ward splits of the last listed layer merge the greedy cut's cells this many bits deeper
_UNIT_BITS = 2
# above this many codewords the starting Ward tree is built on this many top-down k-means cells of them
MAX_START_UNITS = 16384
# cells a top-down split makes at most
_SPLIT = 16


def build_scalable(
    codebook: Tensor,
    counts: Tensor | None = None,
    sums: Tensor | None = None,
    bits: BitProposal = (4, 2, 2, 2, 2),
    *,
    num_layers: int | None = None,
    cut: str = "nested",
    refine: bool = False,
    linkage: str = "ward",
    block_size: int | None = None,
    progress: bool = False,
    unconstrained: Hierarchy | None = None,
) -> tuple[Hierarchy, LayerTables]:
    """Hierarchy and layer tables of a codebook, by any of the package's methods.

    Args:
        codebook: ``[K, D]`` float codewords.
        counts, sums: per-code statistics (see :func:`~svq_modules.hierarchy.code_statistics`).
        bits: bit proposal (see :func:`~svq_modules.layers.resolve_bits`).
        num_layers: total layers L (final layer included) for non-list proposals.
        cut: ``"nested"`` (default, :func:`build_nested`), ``"greedy"`` or
            ``"depth"`` (cuts of the plain Ward tree, :func:`~svq_modules.layers.build_layers`).
        refine: the per-layer rebuild of :func:`~svq_modules.refine.build_refined`
            (with ``cut="nested"`` it refines greedy cuts).
        linkage, block_size, progress: as for :func:`~svq_modules.hierarchy.build_hierarchy`.
        unconstrained: the plain tree of the same inputs, if already built.

    Returns:
        ``(hierarchy, tables)``.
    """
    if cut not in CUTS:
        raise ValueError(f"unknown cut {cut!r}; expected one of {CUTS}")
    build = dict(num_layers=num_layers, linkage=linkage, block_size=block_size, progress=progress,
                 unconstrained=unconstrained)
    if refine:
        return build_refined(codebook, counts, sums, bits, cut="greedy" if cut == "nested" else cut, **build)
    if cut == "nested":
        return build_nested(codebook, counts, sums, bits, **build)
    hierarchy = unconstrained
    if hierarchy is None:
        hierarchy = build_hierarchy(codebook, counts, sums, linkage=linkage, block_size=block_size, progress=progress)
    return hierarchy, build_layers(hierarchy, bits, cut=cut, num_layers=num_layers)


def build_nested(
    codebook: Tensor,
    counts: Tensor | None = None,
    sums: Tensor | None = None,
    bits: BitProposal = (4, 2, 2, 2, 2),
    *,
    num_layers: int | None = None,
    iters: int = 5,
    linkage: str = "ward",
    block_size: int | None = None,
    progress: bool = False,
    unconstrained: Hierarchy | None = None,
) -> tuple[Hierarchy, LayerTables]:
    """Hierarchy and layer tables whose listed layers are Lloyd-optimised nested cells.

    Args:
        codebook: ``[K, D]`` float codewords.
        counts, sums: per-code statistics (see :func:`~svq_modules.hierarchy.code_statistics`);
            without them every codeword weighs 1 and stands for its data.
        bits: bit proposal (see :func:`~svq_modules.layers.resolve_bits`),
            resolved on the starting Ward tree; a final layer reaching every
            codeword is always added.
        num_layers: total layers L (final layer included) for non-list proposals.
        iters: Lloyd iterations per refinement (an int >= 0; 0 keeps the greedy
            cut of the plain Ward tree).
        linkage, block_size, progress: as for :func:`~svq_modules.hierarchy.build_hierarchy`.
        unconstrained: the plain tree of the same inputs, if already built
            (then it is the starting tree, whatever K).

    Returns:
        ``(hierarchy, tables)`` on the codebook's device: layer ``l`` of the
        tables holds the nested cells of layer ``l``; decoding all layers gives
        the exact codewords.
    """
    bits, num_layers = check_bit_proposal(bits, num_layers, need_num_layers=False)
    iters = check_int(iters, "iters", min=0)
    points, weights = code_points(codebook, counts, sums)
    num_codes = points.shape[0]
    if iters == 0 or num_codes < 3:
        return build_scalable(codebook, counts, sums, bits, num_layers=num_layers, cut="greedy", linkage=linkage,
                              block_size=block_size, progress=progress, unconstrained=unconstrained)
    build = dict(linkage=linkage, block_size=block_size, progress=progress)
    centred = points - points.mean(0, keepdim=True)  # precision of the expanded distances
    if unconstrained is not None or num_codes <= MAX_START_UNITS:
        unit, tree = None, unconstrained
        if tree is None:
            tree = build_hierarchy(codebook, counts, sums, **build)
    else:
        unit = start_units(centred, weights, MAX_START_UNITS, iters=iters)
        tree = build_hierarchy(*_unit_statistics(codebook, points, weights, unit), **build)
    widths = resolve_bits(bits, tree, num_layers)
    # the greedy cut, one layer deeper than listed: its finer cells are the units of the Ward splits
    greedy = build_layers(tree, [*widths, _UNIT_BITS])
    start = [cells if unit is None else cells[unit] for cells in greedy.leaf_node[: len(widths) + 1]]
    labels = nested_cells(centred, weights, start, widths, iters=iters, block_size=block_size)
    labels = cap_raw_bits(centred, weights, labels, widths)
    built = build_constrained_hierarchy(codebook, counts, sums, torch.stack(labels), **build)
    tables = build_layers(built.hierarchy, widths, node_level=built.node_level, constrained_layers=len(widths))
    return built.hierarchy, tables


def start_units(points: Tensor, weights: Tensor, max_units: int, *, iters: int = 5, seed: int = 0) -> Tensor:
    """Top-down weighted k-means of the codewords into at most ``max_units`` cells.

    Every cell is split into up to ``16`` (:func:`~svq_modules.lloyd.seed_within`,
    then :func:`~svq_modules.lloyd.lloyd_within`) until there are ``max_units``
    cells: a few batched passes over the codewords, no distance matrix between them.

    Args:
        points: ``[K, D]`` float codeword data means.
        weights: ``[K]`` float >= 0 data counts.
        max_units: cells wanted, an int >= 1.
        iters: Lloyd iterations per split.
        seed: seed of the generator (on the points' device), so a build is reproducible.

    Returns:
        ``[K]`` int64 unit of each codeword, numbered ``0..U-1`` (``U <= max_units``).
    """
    max_units = check_int(max_units, "max_units", min=1)
    generator = torch.Generator(device=points.device).manual_seed(seed)
    cells = torch.zeros(points.shape[0], dtype=torch.long, device=points.device)
    count, split = 1, min(_SPLIT, max_units)
    while split >= 2:
        seeded = seed_within(points, weights, cells, split, generator=generator)
        cells = lloyd_within(seeded, cells, points, weights, iters)
        count *= split
        split = min(_SPLIT, max_units // count)
    return torch.unique(cells, return_inverse=True)[1]


def _unit_statistics(codebook: Tensor, points: Tensor, weights: Tensor, unit: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(codebook [U, D], counts [U], sums [U, D])`` of groups of codewords (*units*).

    Args:
        codebook: ``[K, D]`` what a unit without data stands for: the mean of its members' rows.
        points: ``[K, D]`` codeword data means; ``weights``: ``[K]`` data counts.
        unit: ``[K]`` int64 unit of each codeword, ``0..U-1``.
    """
    num_units, dim = int(unit.max()) + 1, points.shape[1]
    members = torch.bincount(unit, minlength=num_units).to(points.dtype)
    plain = points.new_zeros(num_units, dim).index_add_(0, unit, codebook.to(points)) / members[:, None]
    counts = weights.new_zeros(num_units).index_add_(0, unit, weights)
    sums = points.new_zeros(num_units, dim).index_add_(0, unit, points * weights[:, None])
    return plain, counts, sums


def nested_cells(
    points: Tensor,
    weights: Tensor,
    start: list[Tensor],
    widths: list[int],
    *,
    iters: int = 5,
    block_size: int | None = None,
) -> list[Tensor]:
    """Nested cells of every listed layer, top-down (steps 2 of the module docstring).

    Args:
        points: ``[K, D]`` float codeword data means.
        weights: ``[K]`` float >= 0 data counts.
        start: per listed layer and one more, ``[K]`` int64 nested cells of
            the greedy cut of the Ward tree: the starting cells, the reference
            errors of the base-layer choice, and (one layer finer) the units
            the Ward splits merge.
        widths: bits of each listed layer.
        iters: Lloyd iterations per refinement.
        block_size: distance block elements.

    Returns:
        Per listed layer, ``[K]`` int64 cell labels; layer l's cells are
        unions of layer l+1's, and each holds at most ``2**widths[l+1]`` of them.
    """
    num_listed = len(widths)
    reference = [cell_error(points, weights, cells) for cells in start[:2]]  # of the base-layer choice
    parent = torch.zeros(points.shape[0], dtype=torch.long, device=points.device)
    current, finer = start[0], (start[1] if num_listed > 1 else None)

    def split(cells: Tensor, layer: int) -> Tensor:  # cells cut into layer ``layer``'s, on layer + 1's greedy cells
        return _ward_split(points, weights, cells, start[layer + 1], widths[layer], block_size)

    out: list[Tensor] = []
    for layer in range(num_listed):
        if finer is None:  # the last listed layer, on its own
            out.append(lloyd_within(current, parent, points, weights, iters))
            break
        # the base layer's start is the greedy cut, whose errors are the references already measured
        errors = reference if layer == 0 else [cell_error(points, weights, cells) for cells in (current, finer)]
        lam = _level_weights(*errors)
        joint = joint_lloyd(parent, current, finer, points, weights, lam, iters)
        if layer == 0:  # the base layer may also take the sequential candidate (see the module docstring)
            alone = lloyd_within(current, parent, points, weights, iters)
            sequential = joint_lloyd(parent, alone, split(alone, layer + 1), points, weights, lam, iters)
            joint = min(
                (joint, sequential),
                key=lambda cand: max(
                    cell_error(points, weights, cand[i]) / max(reference[layer + i], 1e-30) for i in (0, 1)
                ),
            )
        out.append(joint[0])
        parent, current = joint
        finer = split(current, layer + 2) if layer + 2 < num_listed else None
    return out


def _level_weights(coarse_error: float, fine_error: float) -> tuple[float, float]:
    """Weights making both levels' relative errors (their :func:`~svq_modules.lloyd.cell_error`)
    count alike in :func:`~svq_modules.lloyd.joint_lloyd`."""
    if coarse_error <= 0:
        return 1.0, 1.0
    return 1.0, coarse_error / max(fine_error, coarse_error / _MAX_LEVEL_WEIGHT)


def _ward_split(
    points: Tensor, weights: Tensor, cells: Tensor, units: Tensor | None, bits: int, block_size: int | None
) -> Tensor:
    """Cut every cell into at most ``2**bits`` cells by Ward agglomeration.

    The items merged are *units*: the codewords of one cell that share a label
    of ``units [K]`` (finer cells of the Ward tree), or single codewords
    (``units=None``). Returns ``[K]`` int64 labels nested in ``cells``.
    """
    num_codes = points.shape[0]
    finer = torch.arange(num_codes, device=points.device) if units is None else units
    _, cell = torch.unique(cells, return_inverse=True)
    _, unit = torch.unique(cell * (int(finer.max()) + 1) + finer, return_inverse=True)
    centers, mass = code_points(*_unit_statistics(points, points, weights, unit))
    num_units = centers.shape[0]
    unit_cell = torch.zeros(num_units, dtype=torch.long, device=points.device).scatter_(0, unit, cell)
    clusters = ward_clusters(centers, mass, unit_cell, 1 << min(bits, 62), block_size=block_size)
    return clusters[unit]
