"""The seed's ``build_layers``: merge the codebook's clusters into a tree with ``final_clusters`` roots.

Not to be confused with the core :func:`svq_modules.layers.build_layers`
(layer tables over a :class:`~svq_modules.hierarchy.Hierarchy`): this one keeps
the seed's name and result, a :class:`ClusterTree`
``(layerized_cluster_centers, cluster_tree)``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..hierarchy import Hierarchy, build_hierarchy, code_statistics
from ..tree import node_depth, scan_to_marked
from ..validation import check_int
from .inputs import check_centers, check_inputs

__all__ = ["ClusterTree", "build_layers", "kept_merges"]


class ClusterTree(NamedTuple):
    """Seed-style result of :func:`build_layers` (unpacks as a pair like the seed's).

    Attributes:
        layerized_cluster_centers: ``[K + m, D]`` float: the K codewords, then
            the centers of the m merged nodes in merge order (count-weighted
            data means).
        cluster_tree: ``m`` pairs ``(a, b)``: node ``K + i`` merges nodes ``a``
            and ``b`` (both ``< K + i``). ``K - m`` nodes stay roots.
    """

    layerized_cluster_centers: Tensor
    cluster_tree: list[tuple[int, int]]


def build_layers(
    cluster_centers: Any,
    data: Any,
    quantized_data: Any,
    final_clusters: int,
    *,
    linkage: str = "ward",
    block_size: int | None = None,
    progress: bool = False,
) -> ClusterTree:
    """Merge the K clusters until ``final_clusters`` roots remain (seed-compatible).

    The full tree is built (:func:`~svq_modules.hierarchy.build_hierarchy`) and
    cut greedily from the top: internal nodes are opened by decreasing
    bottleneck split gain from the root (then by depth), the same order the
    core's ``"greedy"`` cut uses for the base layer, so with
    ``final_clusters = 2**b0`` the roots here are the base layer of
    :func:`~svq_modules.compat.encode_layers` with ``cut="greedy"`` (its
    default nested layers move the cells, :mod:`svq_modules.nested`).

    Args:
        cluster_centers: ``[K, D]`` float codebook (empty clusters allowed);
            tensor, NumPy array or nested list.
        data: ``[N, D]`` vectors, or ``None`` (then unit weights per code
            unless ``quantized_data`` gives counts).
        quantized_data: ``[N]`` integer codeword indices, or ``None``.
        final_clusters: number of roots to keep (>= 1; K or more: no merge).
        linkage, block_size, progress: as for
            :func:`~svq_modules.hierarchy.build_hierarchy`.

    Returns:
        :class:`ClusterTree` ``(layerized_cluster_centers [K + m, D], cluster_tree)``
        in the codebook's dtype (float32 for float16 / bfloat16) and device, usable with
        :func:`~svq_modules.compat.visualize_layers`.

    Raises:
        ValueError: one line naming the bad argument.
    """
    final = check_int(final_clusters, "final_clusters", min=1)
    counts = sums = None
    if quantized_data is not None:
        data, indices, codebook = check_inputs(data, quantized_data, cluster_centers)
        num_codes = codebook.shape[0]
        if data is not None:
            counts, sums = code_statistics(data, indices, num_codes)
        else:
            counts = torch.bincount(indices, minlength=num_codes).to(codebook.dtype)
    elif data is not None:
        raise ValueError("data was given without quantized_data: pass both (the codeword index of each row) or neither")
    else:
        codebook = check_centers(cluster_centers)
        num_codes = codebook.shape[0]
    hierarchy = build_hierarchy(codebook, counts, sums, linkage=linkage, block_size=block_size, progress=progress)
    kept = kept_merges(hierarchy, final)
    new_id = torch.full((hierarchy.num_nodes,), -1, dtype=torch.long, device=codebook.device)
    new_id[:num_codes] = torch.arange(num_codes, device=codebook.device)
    new_id[kept] = num_codes + torch.arange(kept.numel(), device=codebook.device)
    pairs = new_id[hierarchy.children[kept - num_codes]]
    centers = torch.cat([codebook, hierarchy.center[kept]])
    return ClusterTree(centers, [tuple(p) for p in pairs.tolist()])


def kept_merges(hierarchy: Hierarchy, final: int) -> Tensor:
    """Internal node ids below the greedy cut with ``final`` roots, ascending: ``[m]`` int64."""
    num_leaves, num_nodes = hierarchy.num_leaves, hierarchy.num_nodes
    internal = torch.arange(num_leaves, num_nodes, device=hierarchy.device)
    num_open = min(max(final, 1), num_leaves) - 1
    if num_open <= 0:
        return internal
    gain = torch.full((num_nodes,), math.inf, dtype=torch.float64, device=hierarchy.device)
    gain[num_leaves:] = hierarchy.split_gain().to(torch.float64)
    is_root = hierarchy.parent < 0
    _, _, key = scan_to_marked(hierarchy.parent, is_root, gain, torch.minimum, math.inf)
    key = key[internal]
    depth = node_depth(hierarchy.parent)[internal]
    order = torch.argsort(internal, stable=True)
    order = order[torch.argsort(depth[order], stable=True)]
    order = order[torch.argsort(-key[order], stable=True)]
    opened = torch.zeros(internal.numel(), dtype=torch.bool, device=hierarchy.device)
    opened[order[:num_open]] = True
    return internal[~opened]
