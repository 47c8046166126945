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
The default layers (:mod:`svq_modules.nested`) reach the same quality with one
constrained build in all; this per-layer rebuild stays as the option
``refine=True``. :func:`lloyd_within` lives in :mod:`svq_modules.lloyd`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .hierarchy import Hierarchy, build_constrained_hierarchy, code_points
from .layers import LayerTables, build_layers, resolve_bits
from .lloyd import lloyd_within
from .validation import BitProposal, check_bit_proposal, check_int

__all__ = ["build_refined", "lloyd_within"]


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
    points, weights = code_points(codebook, counts, sums)
    weights = weights.clamp_min(1e-6)
    labels: list[Tensor] = []
    for layer in range(len(widths)):
        tables = build_layers(hierarchy, widths[: layer + 1], cut=cut, node_level=level, constrained_layers=layer)
        parents = labels[-1] if labels else torch.zeros(num_codes, dtype=torch.long, device=codebook.device)
        labels.append(lloyd_within(tables.leaf_node[layer], parents, points, weights, iters))
        hierarchy, level = build_constrained_hierarchy(codebook, counts, sums, torch.stack(labels), **build)
    tables = build_layers(hierarchy, widths, cut=cut, node_level=level, constrained_layers=len(widths))
    return hierarchy, tables
