"""Encoding with the seed's call conventions: :func:`encode_layers` and :func:`encode_scalable`.

A thin layer over the core (:mod:`svq_modules.hierarchy`, :mod:`svq_modules.layers`):
per-code statistics in one scatter pass, the Ward merge tree, the layer tables,
and per-layer :class:`~svq_modules.compat.records.Layer` records cut out of them
with gathers (one python loop per *layer*, none per cluster or vector).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..hierarchy import Hierarchy, build_hierarchy, code_statistics
from ..layers import CUTS, TREE_CUTS, LayerTables, symbol_bits
from ..nested import build_scalable
from ..validation import check_bool, check_choice, check_int
from .bits import NBitsProposal, resolve_tables
from .inputs import check_inputs
from .records import EncodedLayers, Layer
from .visualize import visualize_layers

__all__ = ["encode_layers", "encode_scalable", "layers_from_tables"]


def layers_from_tables(hierarchy: Hierarchy, tables: LayerTables, indices: Tensor) -> list[Layer]:
    """Cut per-layer :class:`Layer` records out of the core tables for ``indices [N]`` (gathers, one loop per layer)."""
    num_codes = tables.num_leaves
    num_vectors = indices.shape[0]
    device = tables.members.device
    indices = indices.to(device)
    symbols = tables.leaf_symbol[:, indices]  # [L, N]
    # layers where every code in use has a symbol: no vector to drop
    present = torch.bincount(indices, minlength=num_codes) > 0
    complete = ((tables.leaf_symbol >= 0) | ~present).all(1).tolist()
    prev_nodes = torch.tensor([hierarchy.root], device=device)
    out: list[Layer] = []
    for layer in range(tables.num_layers):
        row = tables.members[layer]
        nodes = row[row >= 0]
        width = int(tables.widths[layer])
        codes = symbols[layer] if complete[layer] else symbols[layer][symbols[layer] >= 0]
        size = tables.group_size[layer, prev_nodes]
        offset = torch.where(size > 0, tables.group_start[layer, prev_nodes], 0)
        if layer == 0 and nodes.numel() == 0:
            # a one-code codebook: the root is the leaf; a 0-bit base layer names it
            nodes = prev_nodes.clone()
            width = 0
            size = torch.ones_like(prev_nodes)
            offset = torch.zeros_like(prev_nodes)
            codes = torch.zeros(num_vectors, dtype=torch.long, device=device)
        out.append(
            Layer(
                codes=codes,
                cluster_centers=hierarchy.center[nodes],
                node_ids=nodes,
                group_offset=offset,
                group_size=size,
                n_bit=width,
                num_codes=num_codes,
                num_vectors=num_vectors,
            )
        )
        prev_nodes = nodes
    return out


def encode_scalable(
    data: Any,
    quantized_data: Any,
    cluster_centers: Any,
    n_bit_baselayer: int | Sequence[int] | None = None,
    n_bits_proposal: NBitsProposal | None = None,
    *,
    cut: str = "nested",
    linkage: str = "ward",
    num_layers: int | None = None,
    n_bit_limit: int | None = None,
    block_size: int | None = None,
    progress: bool = False,
    refine: bool = False,
) -> EncodedLayers:
    """:func:`encode_layers`, also returning the hierarchy and layer tables behind the layers.

    Same arguments as :func:`encode_layers`. Returns
    :class:`~svq_modules.compat.records.EncodedLayers` ``(layers, hierarchy, tables)``.
    """
    progress, refine = check_bool(progress, "progress"), check_bool(refine, "refine")
    cut = check_choice(cut, "cut", CUTS)
    data, indices, codebook = check_inputs(data, quantized_data, cluster_centers)
    limit = None if n_bit_limit is None else check_int(n_bit_limit, "n_bit_limit", min=1)
    if data is not None:
        counts, sums = code_statistics(data, indices, codebook.shape[0])
    else:
        counts = torch.bincount(indices, minlength=codebook.shape[0]).to(codebook.dtype)
        sums = None
    hierarchy = build_hierarchy(codebook, counts, sums, linkage=linkage, block_size=block_size, progress=progress)
    # the widths come from the seed's conventions on the plain tree (nested cells start from its greedy cut)
    tables = resolve_tables(hierarchy, indices, n_bit_baselayer, n_bits_proposal, cut if cut in TREE_CUTS else "greedy",
                            num_layers)
    if refine or cut not in TREE_CUTS:  # same widths, cells optimised (svq_modules.nested, svq_modules.refine)
        widths = tables.widths[:-1].tolist() or tables.widths.tolist()
        hierarchy, tables = build_scalable(
            codebook, counts, sums, widths, linkage=linkage, cut=cut, refine=refine, progress=progress,
            unconstrained=hierarchy,
        )
    if limit is not None:
        worst = int(symbol_bits(tables).sum(0).max())
        if worst > limit:
            raise ValueError(f"n_bit_limit={limit}: a codeword needs {worst} raw bits over all layers; raise the limit")
    return EncodedLayers(layers_from_tables(hierarchy, tables, indices), hierarchy, tables)


def encode_layers(
    data: Any,
    quantized_data: Any,
    cluster_centers: Any,
    n_bit_baselayer: int | Sequence[int] | None = None,
    n_bits_proposal: NBitsProposal | None = None,
    *,
    cut: str = "nested",
    linkage: str = "ward",
    num_layers: int | None = None,
    n_bit_limit: int | None = None,
    block_size: int | None = None,
    progress: bool = False,
    visualize: bool | str | os.PathLike = False,
    refine: bool = False,
) -> list[Layer]:
    """Cut the vectors' codeword indices into scalable layers (seed-compatible).

    Both of the seed's conventions work::

        encode_layers(data, q, c, [4, 2, 2, 2, 2])                          # README
        encode_layers(data, q, c, 4, [2, 2, 2, 2])                          # package
        encode_layers(data, q, c, n_bit_baselayer=4, n_bits_proposal=2)     # keywords

    After the listed layers one final layer carries whatever bits remain, so
    decoding every layer gives exactly ``cluster_centers[quantized_data]``.
    Array arguments may be torch tensors, NumPy arrays (e.g. scikit-learn's
    ``KMeans().fit(data)``: ``cluster_centers_``, ``labels_``) or nested
    lists; results are torch tensors in the codebook's dtype (float64 stays
    float64; float16 and bfloat16 give float32, the dtype the tree is built
    in) and on its device.

    Args:
        data: ``[N, D]`` vectors (float, or integers such as ``uint8``
            pixels; computed in the codebook's dtype). They only feed per-code
            statistics (count, sum) that weight the merges and make internal
            centers the exact data means. ``None``: counts from
            ``quantized_data``, codewords as means.
        quantized_data: ``[N]`` integer codeword index of each vector.
        cluster_centers: ``[K, D]`` float codebook. Codes no vector uses are fine.
        n_bit_baselayer: bits of the base layer (default 4), *or* the full
            list of bits, base first (README style; then leave
            ``n_bits_proposal`` unset).
        n_bits_proposal: enhancement-layer bits (default ``[2, 2, 2, 2]``):
            * a list of ints: one listed layer each, then the final layer;
            * an int ``b``: ``b`` bits per layer until every leaf is reached
              (no separate final layer; ``num_layers`` fixes the count instead);
            * a seed-style callable ``f(n_bit_baselayer, node_codes, quantized_data)
              -> list[int]`` returning every listed width, the base layer's
              included (as in the seed, e.g. ``scalablevq.n_bits_proposal_balanced_clusters(3)``
              works unchanged). ``node_codes`` ``[K + m]`` int64 are prefix
              codes of the nodes below the base layer (leaves first, by codeword
              index; a node's depth below its base node is
              ``bit_length - 1 - n_bit_baselayer``);
            * a core strategy name (``"balanced_clusters"``, ``"balanced_values"``)
              or core callable ``f(hierarchy, num_listed)``: these choose the
              base width too (leave ``n_bit_baselayer`` unset; see
              :func:`svq_modules.layers.resolve_bits`).
        cut: ``"nested"`` (default: each layer's cells Lloyd-optimised inside
            their parents, :mod:`svq_modules.nested`), ``"greedy"`` (best cut of
            each subtree of the Ward tree) or ``"depth"`` (the seed's fixed-depth cut).
        linkage: ``"ward"`` (default) or ``"centroid"``.
        num_layers: total number of layers (final included) for named / core
            proposals, or with an int proposal.
        n_bit_limit: if given, ``ValueError`` when some codeword needs more raw
            bits than this over all layers (the seed's 64-bit code limit).
        block_size: elements per distance block while building the tree.
        progress: show a progress bar while building the tree.
        refine: Lloyd-refine each listed layer inside its parent cell
            (:mod:`svq_modules.refine`): lower distortion, one tree build per layer.
        visualize: a file path: also draw the layers there (PNG, see
            :func:`svq_modules.compat.visualize_layers`).

    Returns:
        ``list[Layer]``, base layer first.

    Raises:
        ValueError: one line naming the argument: NaN/Inf, indices out of
        range, mismatched shapes, empty input, bad bits, ambiguous bit arguments.
    """
    if visualize is True or (visualize is not False and visualize is not None and not isinstance(visualize, (str, os.PathLike))):
        raise ValueError(f"visualize must be a file path for the PNG (there is no window to open), got {visualize!r}")
    encoded = encode_scalable(
        data,
        quantized_data,
        cluster_centers,
        n_bit_baselayer,
        n_bits_proposal,
        cut=cut,
        linkage=linkage,
        num_layers=num_layers,
        n_bit_limit=n_bit_limit,
        refine=refine,
        block_size=block_size,
        progress=progress,
    )
    if visualize is not False and visualize is not None:
        visualize_layers(encoded.layers, data=data, path=visualize)
    return encoded.layers
