"""Progressive decoding of seed-compatible layers: :func:`decode_layer`, :func:`decode_layers`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .records import DecodingContext, Layer

__all__ = ["decode_layer", "decode_layers"]


def decode_layer(layer: Layer, context: DecodingContext | None = None) -> tuple[Tensor, DecodingContext]:
    """Decode one more layer.

    Args:
        layer: the next layer (layer 0 with ``context=None``).
        context: what the previous call returned.

    Returns:
        ``(decoded, context)``: ``decoded`` ``[N, D]`` float, each vector's
        reconstruction after this layer (the center of its node; vectors whose
        leaf was reached earlier keep their codeword), and the new context.

    Raises:
        ValueError: a layer out of order, the wrong number of symbols, or a
        symbol outside its group.
    """
    if not isinstance(layer, Layer):
        raise ValueError(
            f"layer must be a Layer from svq_modules.compat.functional.encode_layers, got {type(layer).__name__}"
        )
    if context is not None and not isinstance(context, DecodingContext):
        raise ValueError(
            "context must be the DecodingContext the previous decode_layer call returned (None for the base layer), "
            f"got {type(context).__name__}"
        )
    device = layer.cluster_centers.device
    if context is None:
        num_vectors = layer.num_vectors
        if layer.group_size.shape[0] != 1:
            raise ValueError("decode_layer(layer, None) needs the base layer (layer 0) first")
        node = torch.zeros(num_vectors, dtype=torch.long, device=device)
        decoded = layer.cluster_centers.new_zeros(num_vectors, layer.cluster_centers.shape[1])
        node_id = torch.full((num_vectors,), -1, dtype=torch.long, device=device)
        index = torch.full((num_vectors,), -1, dtype=torch.long, device=device)
        active = torch.ones(num_vectors, dtype=torch.bool, device=device)
        done = 0
    else:
        if context.decoded.shape[0] != layer.num_vectors:
            raise ValueError(
                f"layer encodes {layer.num_vectors} vectors but the context holds {context.decoded.shape[0]}"
            )
        decoded, node, node_id, index = (t.clone() for t in (context.decoded, context.node, context.node_id, context.index))
        active = index < 0
        done = context.num_layers
    if layer.codes.shape[0] != int(active.sum()):
        raise ValueError(
            f"layer {done} has {layer.codes.shape[0]} codes but {int(active.sum())} vectors are still active "
            "(layers out of order, or from another encoding?)"
        )
    parent = node[active]
    if parent.numel() and int(parent.max()) >= layer.group_size.shape[0]:
        raise ValueError(f"layer {done} does not follow the previous layer (node index out of range)")
    size = layer.group_size[parent]
    codes = layer.codes.to(device)
    bad = (codes < 0) | (codes >= size)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(
            f"invalid code {int(codes[i])} in layer {done} for active vector {i}: its group has {int(size[i])} symbols"
        )
    new = layer.group_offset[parent] + codes
    node[active] = new
    ids = layer.node_ids[new]
    node_id[active] = ids
    decoded[active] = layer.cluster_centers[new].to(decoded.dtype)
    index[active] = torch.where(ids < layer.num_codes, ids, -1)
    return decoded, DecodingContext(decoded, node, node_id, index, done + 1)


def decode_layers(layers: Sequence[Layer]) -> Tensor:
    """Decode every given layer, in order; returns the last reconstruction ``[N, D]`` float.

    Raises:
        ValueError: ``layers`` is not a non-empty list of :class:`Layer`, or
        the layers do not follow each other (see :func:`decode_layer`).
    """
    if isinstance(layers, Layer) or not isinstance(layers, Sequence):
        raise ValueError(f"layers must be the list of Layer that encode_layers returned, got {type(layers).__name__}")
    if len(layers) == 0:
        raise ValueError("layers is empty: pass the list encode_layers returned")
    context = None
    decoded = None
    for layer in layers:
        decoded, context = decode_layer(layer, context)
    return decoded
