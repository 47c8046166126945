"""Records of the seed-compatible API: :class:`Layer`, :class:`DecodingContext`, :class:`EncodedLayers`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..hierarchy import Hierarchy
from ..layers import LayerTables

__all__ = ["Layer", "DecodingContext", "EncodedLayers", "check_layer_list"]


@dataclass(frozen=True, eq=False)
class Layer:
    """One scalable layer: the symbols of the vectors still active, and that layer's nodes.

    ``M_prev`` is the number of nodes of the previous layer (1 for layer 0: the
    tree's root), ``M_l`` the number of nodes this layer creates, ``N_l`` the
    number of vectors whose leaf was not reached by the previous layers.

    Attributes:
        codes: ``[N_l]`` int64 symbols, in the order of the vectors (only the
            vectors still active). A symbol is the rank of the vector's new
            node among the children group of its previous node, in
            ``[0, group_size[parent])`` and so ``< 2**n_bit``.
        cluster_centers: ``[M_l, D]`` float centers of this layer's nodes, in
            group order: the codeword for a leaf, the count-weighted mean of
            the data below it for an internal node.
        node_ids: ``[M_l]`` int64 node id of each of these nodes in the
            :class:`~svq_modules.hierarchy.Hierarchy` (``< num_codes``: a leaf,
            i.e. codeword ``node_ids``).
        group_offset: ``[M_prev]`` int64, index in this layer of the first child
            of each previous-layer node (0 where it is not split).
        group_size: ``[M_prev]`` int64, number of this layer's nodes below each
            previous-layer node; 0 where it is not split (its vectors are done).
        n_bit: nominal bits of the layer (a symbol needs at most this many).
        num_codes: K, the size of the codebook the layers were cut from.
        num_vectors: N, the number of vectors encoded (all layers share it).
    """

    codes: Tensor
    cluster_centers: Tensor
    node_ids: Tensor
    group_offset: Tensor
    group_size: Tensor
    n_bit: int
    num_codes: int
    num_vectors: int

    def __post_init__(self) -> None:
        for field in ("codes", "cluster_centers", "node_ids", "group_offset", "group_size"):
            value = getattr(self, field)
            if not torch.is_tensor(value):
                raise ValueError(f"Layer.{field} must be a torch.Tensor, got {type(value).__name__}")
        if self.codes.dim() != 1 or self.codes.dtype != torch.long:
            raise ValueError(f"Layer.codes must be [N_l] int64, got {self.codes.dtype} {list(self.codes.shape)}")
        if self.cluster_centers.dim() != 2 or not self.cluster_centers.is_floating_point():
            raise ValueError(f"Layer.cluster_centers must be [M_l, D] float, got {list(self.cluster_centers.shape)}")
        if self.node_ids.shape != (self.cluster_centers.shape[0],):
            raise ValueError("Layer.node_ids must have one entry per cluster center")
        if self.group_offset.dim() != 1 or self.group_offset.shape != self.group_size.shape:
            raise ValueError("Layer.group_offset and Layer.group_size must be 1-D of the same length")

    @property
    def is_leaf(self) -> Tensor:
        """``[M_l]`` bool: the node is a codeword (its vectors send nothing more)."""
        return self.node_ids < self.num_codes

    @property
    def n_leaf(self) -> int:
        """Number of this layer's nodes that are codewords (the seed's ``Layer.n_leaf``)."""
        return int(self.is_leaf.sum())

    @property
    def codebook(self) -> Tensor:
        """Alias of :attr:`node_ids` (the seed stores its own node identifiers here)."""
        return self.node_ids

    def to(self, device: torch.device | str) -> Layer:
        """Copy of the layer on ``device``."""
        return Layer(
            codes=self.codes.to(device),
            cluster_centers=self.cluster_centers.to(device),
            node_ids=self.node_ids.to(device),
            group_offset=self.group_offset.to(device),
            group_size=self.group_size.to(device),
            n_bit=self.n_bit,
            num_codes=self.num_codes,
            num_vectors=self.num_vectors,
        )


class DecodingContext(NamedTuple):
    """State carried from one :func:`decode_layer` call to the next.

    Attributes:
        decoded: ``[N, D]`` float reconstruction after the layers decoded so far.
        node: ``[N]`` int64 index of each vector's node among the nodes of the
            layer that created it.
        node_id: ``[N]`` int64 hierarchy node id of each vector's node.
        index: ``[N]`` int64 codeword index once the vector's leaf is reached, else -1.
        num_layers: layers decoded so far.
    """

    decoded: Tensor
    node: Tensor
    node_id: Tensor
    index: Tensor
    num_layers: int

    @property
    def active(self) -> Tensor:
        """``[N]`` bool: the vector still expects symbols."""
        return self.index < 0


class EncodedLayers(NamedTuple):
    """What :func:`~svq_modules.compat.encode_scalable` returns: the layers and the core objects behind them."""

    layers: list[Layer]
    hierarchy: Hierarchy
    tables: LayerTables


def check_layer_list(layers: Any, name: str = "layers") -> list[Layer]:
    """``layers`` as a non-empty ``list[Layer]`` of one encoding (same K and D); one-line ``ValueError`` otherwise."""
    if isinstance(layers, Layer) or not isinstance(layers, Sequence) or isinstance(layers, (str, bytes)):
        raise ValueError(f"{name} must be the list of Layer that encode_layers returned, got {type(layers).__name__}")
    layers = list(layers)
    if not layers:
        raise ValueError(f"{name} is empty: pass the list encode_layers returned")
    bad = [i for i, layer in enumerate(layers) if not isinstance(layer, Layer)]
    if bad:
        raise ValueError(f"{name}[{bad[0]}] is a {type(layers[bad[0]]).__name__}, not a Layer from encode_layers")
    first = layers[0]
    for i, layer in enumerate(layers):
        if layer.num_codes != first.num_codes or layer.cluster_centers.shape[1] != first.cluster_centers.shape[1]:
            raise ValueError(
                f"{name}[{i}] comes from another encoding (K={layer.num_codes}, D={layer.cluster_centers.shape[1]}; "
                f"{name}[0] has K={first.num_codes}, D={first.cluster_centers.shape[1]})"
            )
    return layers
