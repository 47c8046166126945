"""Known layers, new data: :func:`encode_known_layers`, :func:`transcode`, :func:`layer_codebook`.

Nothing is rebuilt: a per-codeword symbol table is derived from the layers
alone (one loop per layer), then new vectors are encoded by table lookups
after one nearest-codeword search (:func:`svq_modules.nearest.nearest_codewords`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..nearest import DEFAULT_CHUNK_ELEMENTS, nearest_codewords
from ..validation import check_int
from .inputs import check_centers, check_data, check_quantized
from .records import Layer, check_layer_list

__all__ = ["leaf_symbols", "layer_codebook", "relayer", "encode_known_layers", "transcode"]


def leaf_symbols(layers: Sequence[Layer]) -> tuple[Tensor, Tensor]:
    """Per-codeword symbol table and the codebook, from the layers alone.

    Args:
        layers: every layer of one :func:`~svq_modules.compat.encode_layers` call.

    Returns:
        ``symbols [L, K]`` int64 (-1: nothing sent in that layer) and
        ``codebook [K, D]`` float (each leaf's center). One loop per layer,
        from the last up.
    """
    layers = check_layer_list(layers)
    num_codes = layers[0].num_codes
    device = layers[0].cluster_centers.device
    dim = layers[0].cluster_centers.shape[1]
    codebook = layers[0].cluster_centers.new_zeros(num_codes, dim)
    found = torch.zeros(num_codes, dtype=torch.bool, device=device)
    symbols = torch.full((len(layers), num_codes), -1, dtype=torch.long, device=device)
    cur = torch.full((num_codes,), -1, dtype=torch.long, device=device)  # local node in the current layer
    for layer_id in range(len(layers) - 1, -1, -1):
        layer = layers[layer_id]
        leaf = layer.is_leaf
        leaf_pos = leaf.nonzero().squeeze(1)
        leaf_code = layer.node_ids[leaf_pos]
        codebook[leaf_code] = layer.cluster_centers[leaf_pos]
        found[leaf_code] = True
        cur[leaf_code] = leaf_pos
        # parent (in the previous layer) of each of this layer's nodes
        split = (layer.group_size > 0).nonzero().squeeze(1)
        split = split[torch.argsort(layer.group_offset[split])]
        parent_of = torch.repeat_interleave(split, layer.group_size[split])
        if parent_of.numel() != layer.node_ids.numel():
            raise ValueError(f"layer {layer_id}: group sizes do not cover its {layer.node_ids.numel()} nodes")
        here = cur >= 0
        parents = parent_of[cur[here]]
        symbols[layer_id, here] = cur[here] - layer.group_offset[parents]
        cur[here] = parents
    if not bool(found.all()):
        raise ValueError(f"the layers do not reach every codeword ({int((~found).sum())} missing): pass all layers")
    return symbols, codebook


def layer_codebook(layers: Sequence[Layer]) -> Tensor:
    """The ``[K, D]`` float codebook the layers end in (leaf centers by codeword index)."""
    return leaf_symbols(layers)[1]


def relayer(layers: Sequence[Layer], symbols: Tensor, indices: Tensor) -> list[Layer]:
    """The known ``layers`` with the codes of codeword ``indices [N']`` (int64), from ``symbols [L, K]``."""
    per_vector = symbols[:, indices]  # [L, N]
    out = []
    for layer_id, layer in enumerate(layers):
        codes = per_vector[layer_id]
        out.append(
            Layer(
                codes=codes[codes >= 0],
                cluster_centers=layer.cluster_centers,
                node_ids=layer.node_ids,
                group_offset=layer.group_offset,
                group_size=layer.group_size,
                n_bit=layer.n_bit,
                num_codes=layer.num_codes,
                num_vectors=int(indices.shape[0]),
            )
        )
    return out


def encode_known_layers(quantized_data: Any, cluster_centers: Any, layers: Sequence[Layer]) -> list[Layer]:
    """Encode new codeword indices with known layers (seed-compatible signature).

    Nothing is rebuilt: each code's symbols come from a per-codeword table
    derived from ``layers`` (pure lookups).

    Args:
        quantized_data: ``[N']`` integer indices into ``cluster_centers``
            (tensor, NumPy array or list).
        cluster_centers: ``[K', D]`` float codebook of ``quantized_data``; each
            row is matched to the nearest leaf of ``layers`` (so a reordered
            codebook works). ``None``: indices are already in the layers'
            codebook order.
        layers: all layers of an earlier :func:`~svq_modules.compat.encode_layers` call.

    Returns:
        New ``list[Layer]`` sharing the known layers' nodes, with new codes.

    Raises:
        ValueError: one line naming the bad argument.
    """
    symbols, codebook = leaf_symbols(layers)
    if cluster_centers is None:
        return relayer(layers, symbols, check_quantized(quantized_data, codebook.shape[0], codebook.device))
    centers = check_centers(cluster_centers)
    if centers.shape[1] != codebook.shape[1]:
        raise ValueError(f"cluster_centers have dimension {centers.shape[1]} but the layers {codebook.shape[1]}")
    indices = check_quantized(quantized_data, centers.shape[0], centers.device).to(codebook.device)
    centers = centers.to(device=codebook.device, dtype=codebook.dtype)
    if not (centers.shape == codebook.shape and torch.equal(centers, codebook)):
        indices = nearest_codewords(centers, codebook)[0][indices]
    return relayer(layers, symbols, indices)


def transcode(data: Any, layers: Sequence[Layer], *, block_size: int | None = None) -> list[Layer]:
    """Encode new vectors with known layers: nearest codeword, then table lookups.

    Args:
        data: ``[N', D]`` vectors (float or integer; tensor, NumPy array or
            list), computed in the layers' dtype.
        layers: all layers of an earlier :func:`~svq_modules.compat.encode_layers` call.
        block_size: largest distance block (elements) of the nearest-codeword
            search (a memory knob; the result does not depend on it).

    Returns:
        ``list[Layer]`` for ``data``; decoding all of them gives each vector's
        nearest codeword.

    Raises:
        ValueError: one line naming the bad argument.
    """
    symbols, codebook = leaf_symbols(layers)
    chunk = DEFAULT_CHUNK_ELEMENTS if block_size is None else check_int(block_size, "block_size", min=1)
    x = check_data(data, codebook)
    indices, _ = nearest_codewords(x, codebook, chunk_elements=chunk)
    return relayer(layers, symbols, indices)
