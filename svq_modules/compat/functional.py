"""Seed-compatible functional API: ``encode_layers`` / ``decode_layer`` and friends.

A user of the ``scalablevq`` package switches by changing the import::

    from svq_modules.compat.functional import encode_layers, decode_layer

    layers = encode_layers(data, quantized_data, cluster_centers, [4, 2, 2, 2, 2])
    context = None
    for layer in layers:
        decoded, context = decode_layer(layer, context)   # [N, D], better each layer

Everything here is a thin layer over the core (:mod:`svq_modules.hierarchy`,
:mod:`svq_modules.layers`): per-code statistics in one scatter pass, the Ward
merge tree, the layer tables, and per-layer :class:`Layer` records cut out of
them with gathers (one python loop per *layer*, none per cluster or vector).

Differences from the seed (see ``docs/seed-compat.md``):

* both call conventions are accepted: the README's full list
  ``encode_layers(data, q, c, [4, 2, 2, 2, 2])`` and the package's
  ``encode_layers(data, q, c, n_bit_baselayer=4, n_bits_proposal=[2, 2, 2, 2])``;
* codebooks with empty clusters (codes no vector uses) are accepted;
* with a list of bits the number of layers is fixed, ``len(bits) + 1``: a layer
  where no vector has anything left to send is kept (empty ``codes``) instead
  of being dropped, so layer ``l`` always means the same thing;
* internal node centers are count-weighted data means, leaves are the codewords,
  so decoding every layer gives back exactly ``cluster_centers[quantized_data]``.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Union

import torch
from torch import Tensor

from .. import layers as _core_layers
from ..hierarchy import Hierarchy, build_hierarchy, code_statistics
from ..layers import LayerTables, symbol_bits
from ..refine import build_refined
from ..tree import node_depth, scan_to_marked
from ..validation import check_bits_list, check_codebook, check_indices, check_vectors

__all__ = [
    "Layer",
    "DecodingContext",
    "EncodedLayers",
    "ClusterTree",
    "encode_layers",
    "encode_scalable",
    "decode_layer",
    "decode_layers",
    "encode_known_layers",
    "transcode",
    "layer_codebook",
    "build_layers",
    "visualize_layers",
]

SeedProposal = Callable[[int, Tensor, Tensor], Sequence[int]]
CoreProposal = Callable[[Hierarchy, int], Sequence[int]]
NBitsProposal = Union[int, Sequence[int], str, SeedProposal, CoreProposal]

_DEFAULT_BASE_BITS = 4
_DEFAULT_PROPOSAL = (2, 2, 2, 2)
# elements of one distance block in nearest-codeword searches
_NEAREST_BLOCK_ELEMENTS = 1 << 22


# --------------------------------------------------------------------------- records


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
    """What :func:`encode_scalable` returns: the layers and the core objects behind them."""

    layers: list[Layer]
    hierarchy: Hierarchy
    tables: LayerTables


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


# --------------------------------------------------------------------------- input checks


def _check_inputs(
    data: Tensor | None, quantized_data: Tensor, cluster_centers: Tensor
) -> tuple[Tensor | None, Tensor, Tensor]:
    codebook = check_codebook(cluster_centers)
    if data is not None:
        data = check_vectors(data, dim=codebook.shape[1], name="data")
        if data.device != codebook.device:
            raise ValueError(f"data is on {data.device} but cluster_centers on {codebook.device}")
        # compute in the codebook's precision so that the leaves stay the exact codewords
        data = data.to(codebook.dtype)
    expected = None if data is None else data.shape[0]
    indices = check_indices(quantized_data, codebook.shape[0], expected_len=expected, name="quantized_data")
    if indices.numel() == 0:
        raise ValueError("quantized_data is empty: need at least one vector")
    if indices.device != codebook.device:
        raise ValueError(f"quantized_data is on {indices.device} but cluster_centers on {codebook.device}")
    return data, indices, codebook


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    value = int(value)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def _is_bits_sequence(value: Any) -> bool:
    if isinstance(value, (str, bytes)) or callable(value):
        return False
    if torch.is_tensor(value):
        return value.dim() == 1
    return isinstance(value, Sequence)


# --------------------------------------------------------------------------- bit proposals


def _seed_prefix_codes(hierarchy: Hierarchy, base_tables: LayerTables, n_bit_baselayer: int) -> Tensor:
    """Prefix codes of the nodes below the base cut, as the seed hands them to a proposal.

    A base node with symbol ``s`` gets ``(1 << b0) | s``; a left child
    ``2 * code(parent)``, a right child ``2 * code(parent) + 1`` (so the bit
    length minus one is the depth in bits). Returns ``[K + m]`` int64: the K
    leaves first (by codeword index), then the m internal nodes below the base
    cut in merge order. Loops once per tree level (at most 62).
    """
    num_leaves, num_nodes = hierarchy.num_leaves, hierarchy.num_nodes
    device = hierarchy.device
    code = torch.full((num_nodes,), -1, dtype=torch.long, device=device)
    base = base_tables.members[0]
    base = base[base >= 0]
    if base.numel() == 0:  # K == 1
        base = torch.tensor([hierarchy.root], device=device)
    code[base] = (1 << n_bit_baselayer) | torch.arange(base.numel(), device=device)
    depth = node_depth(hierarchy.parent)
    below_base, found, _ = scan_to_marked(hierarchy.parent, code >= 0)
    rel = torch.where(found, depth - depth[below_base], 0)
    if int(rel.max()) + n_bit_baselayer > 62:
        raise ValueError(
            "the tree is too deep for the seed's 64-bit prefix codes "
            f"({int(rel.max())} levels below the base layer); pass a list of bits instead"
        )
    frontier = base
    while True:
        frontier = frontier[frontier >= num_leaves]
        if frontier.numel() == 0:
            break
        kids = hierarchy.children[frontier - num_leaves]
        code[kids[:, 0]] = code[frontier] * 2
        code[kids[:, 1]] = code[frontier] * 2 + 1
        frontier = kids.reshape(-1)
    internal = torch.arange(num_leaves, num_nodes, device=device)
    internal = internal[code[internal] >= 0]
    return torch.cat([code[:num_leaves], code[internal]])


def _callable_arity(fn: Callable) -> int | None:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return None
    return len(positional)


def _tables_until_leaves(hierarchy: Hierarchy, base: int, step: int, cut: str) -> LayerTables:
    """``[base, step, step, ...]`` with as many layers as it takes to reach every leaf."""
    depth_bits = max(1, math.ceil(math.log2(max(2, hierarchy.num_leaves))))
    repeats = max(1, math.ceil(depth_bits / step))
    while True:
        tables = _core_layers.build_layers(hierarchy, [base] + [step] * repeats, cut=cut)
        if int(tables.widths[-1]) == 0:  # the final catch-all layer had nothing left to do
            sent = (tables.leaf_symbol >= 0).any(dim=1)
            last = int(sent.nonzero().max()) if bool(sent.any()) else 0
            return LayerTables(**{k: v[: last + 1] for k, v in tables.as_dict().items()})
        repeats *= 2


def _resolve_tables(
    hierarchy: Hierarchy,
    indices: Tensor,
    n_bit_baselayer: Any,
    n_bits_proposal: Any,
    cut: str,
    num_layers: int | None,
) -> LayerTables:
    """Turn the seed's / the README's bit arguments into core layer tables."""
    if _is_bits_sequence(n_bit_baselayer):
        if n_bits_proposal is not None:
            raise ValueError(
                "pass either a full bits list as the 4th argument (README style, e.g. [4, 2, 2, 2, 2]) "
                "or n_bit_baselayer + n_bits_proposal (package style), not both"
            )
        values = n_bit_baselayer.tolist() if torch.is_tensor(n_bit_baselayer) else list(n_bit_baselayer)
        bits = check_bits_list(values, "n_bits_proposal")
        return _core_layers.build_layers(hierarchy, bits, cut=cut, num_layers=num_layers)

    proposal = _DEFAULT_PROPOSAL if n_bits_proposal is None else n_bits_proposal
    if isinstance(proposal, str) or (callable(proposal) and _callable_arity(proposal) == 2):
        # core strategies choose every width, the base layer's included
        if n_bit_baselayer is not None:
            raise ValueError(
                f"n_bits_proposal={proposal!r} chooses the base layer's width too; leave n_bit_baselayer unset"
            )
        return _core_layers.build_layers(hierarchy, proposal, cut=cut, num_layers=num_layers)

    base = _DEFAULT_BASE_BITS if n_bit_baselayer is None else _check_positive_int(n_bit_baselayer, "n_bit_baselayer")
    if isinstance(proposal, bool):
        raise ValueError(f"n_bits_proposal must be an int, a list of ints or a callable, got {proposal!r}")
    if hasattr(proposal, "__index__") and not torch.is_tensor(proposal):
        step = _check_positive_int(proposal, "n_bits_proposal")
        if num_layers is not None:
            return _core_layers.build_layers(
                hierarchy, [base] + [step] * max(0, int(num_layers) - 2), cut=cut, num_layers=num_layers
            )
        return _tables_until_leaves(hierarchy, base, step, cut)
    if callable(proposal):
        base_tables = _core_layers.build_layers(hierarchy, [base], cut=cut)
        codes = _seed_prefix_codes(hierarchy, base_tables, base)
        # like the seed, the callable returns every listed width, the base layer's included
        widths = check_bits_list(list(proposal(base, codes, indices)), "bits returned by n_bits_proposal")
        return _core_layers.build_layers(hierarchy, widths, cut=cut, num_layers=num_layers)
    if _is_bits_sequence(proposal):
        values = proposal.tolist() if torch.is_tensor(proposal) else list(proposal)
        widths = [base] + (check_bits_list(values, "n_bits_proposal") if values else [])
        return _core_layers.build_layers(hierarchy, widths, cut=cut, num_layers=num_layers)
    raise ValueError(f"n_bits_proposal must be an int, a list of ints, a name or a callable, got {proposal!r}")


# --------------------------------------------------------------------------- encoding


def _layers_from_tables(
    hierarchy: Hierarchy, tables: LayerTables, indices: Tensor
) -> list[Layer]:
    """Cut per-layer records out of the core tables: gathers, one loop per layer."""
    num_codes = tables.num_leaves
    num_vectors = indices.shape[0]
    device = tables.members.device
    symbols = tables.leaf_symbol[:, indices.to(device)]  # [L, N]
    prev_nodes = torch.tensor([hierarchy.root], device=device)
    out: list[Layer] = []
    for layer in range(tables.num_layers):
        row = tables.members[layer]
        nodes = row[row >= 0]
        width = int(tables.widths[layer])
        codes = symbols[layer]
        codes = codes[codes >= 0]
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
    data: Tensor | None,
    quantized_data: Tensor,
    cluster_centers: Tensor,
    n_bit_baselayer: int | Sequence[int] | None = None,
    n_bits_proposal: NBitsProposal | None = None,
    *,
    cut: str = "greedy",
    linkage: str = "ward",
    num_layers: int | None = None,
    n_bit_limit: int | None = None,
    block_size: int | None = None,
    progress: bool = False,
    refine: bool = False,
) -> EncodedLayers:
    """:func:`encode_layers`, also returning the hierarchy and layer tables behind the layers.

    Same arguments as :func:`encode_layers`. Returns :class:`EncodedLayers`
    ``(layers, hierarchy, tables)``.
    """
    data, indices, codebook = _check_inputs(data, quantized_data, cluster_centers)
    if data is not None:
        counts, sums = code_statistics(data, indices, codebook.shape[0])
    else:
        counts = torch.bincount(indices, minlength=codebook.shape[0]).to(codebook.dtype)
        sums = None
    hierarchy = build_hierarchy(codebook, counts, sums, linkage=linkage, block_size=block_size, progress=progress)
    tables = _resolve_tables(hierarchy, indices, n_bit_baselayer, n_bits_proposal, cut, num_layers)
    if refine:  # same widths, Lloyd-refined nested layers (svq_modules.refine)
        widths = tables.widths[:-1].tolist() or tables.widths.tolist()
        hierarchy, tables = build_refined(
            codebook, counts, sums, widths, linkage=linkage, cut=cut, progress=progress, unconstrained=hierarchy
        )
    if n_bit_limit is not None:
        limit = _check_positive_int(n_bit_limit, "n_bit_limit")
        worst = int(symbol_bits(tables).sum(0).max())
        if worst > limit:
            raise ValueError(f"a codeword needs {worst} raw bits over all layers, more than n_bit_limit={limit}")
    return EncodedLayers(_layers_from_tables(hierarchy, tables, indices), hierarchy, tables)


def encode_layers(
    data: Tensor | None,
    quantized_data: Tensor,
    cluster_centers: Tensor,
    n_bit_baselayer: int | Sequence[int] | None = None,
    n_bits_proposal: NBitsProposal | None = None,
    *,
    cut: str = "greedy",
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

    Args:
        data: ``[N, D]`` float vectors (any float dtype; computed in the
            codebook's dtype). They only feed per-code statistics (count, sum)
            that weight the merges and make internal centers the exact data
            means. ``None``: counts from ``quantized_data``, codewords as means.
        quantized_data: ``[N]`` int codeword index of each vector.
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
        cut: ``"greedy"`` (best cut of each subtree, default) or ``"depth"``
            (the seed's fixed-depth cut).
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
            :func:`svq_modules.plotting.visualize_layers`).

    Returns:
        ``list[Layer]``, base layer first.

    Raises:
        ValueError: NaN/Inf, indices out of range, mismatched shapes, empty
        input, non-positive bits, ambiguous bit arguments.
    """
    if visualize is True:
        raise ValueError("visualize must be a file path for the PNG (there is no window to open)")
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


# --------------------------------------------------------------------------- decoding


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
        raise ValueError(f"layer must be a svq_modules.compat.functional.Layer, got {type(layer).__name__}")
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
    """Decode every given layer; returns the last reconstruction ``[N, D]``."""
    if len(layers) == 0:
        raise ValueError("layers is empty")
    context = None
    decoded = None
    for layer in layers:
        decoded, context = decode_layer(layer, context)
    return decoded


# --------------------------------------------------------------------------- transcoding


def _leaf_symbols(layers: Sequence[Layer]) -> tuple[Tensor, Tensor]:
    """Per-codeword symbol table and the codebook, from the layers alone.

    Returns:
        ``symbols [L, K]`` int64 (-1: nothing sent in that layer) and
        ``codebook [K, D]`` float (each leaf's center). One loop per layer,
        from the last up.
    """
    if len(layers) == 0:
        raise ValueError("layers is empty")
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
    """The ``[K, D]`` codebook the layers end in (leaf centers by codeword index)."""
    return _leaf_symbols(layers)[1]


def _nearest(x: Tensor, codebook: Tensor, block_elements: int = _NEAREST_BLOCK_ELEMENTS) -> Tensor:
    """Index of the nearest codeword of each row of ``x``: ``[N]`` int64, blocked over rows."""
    out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    c_sq = codebook.pow(2).sum(1)
    step = max(1, block_elements // max(1, codebook.shape[0]))
    for start in range(0, x.shape[0], step):
        xb = x[start : start + step]
        dist = c_sq[None, :] - 2.0 * (xb @ codebook.T)
        out[start : start + step] = dist.argmin(1)
    return out


def _relayer(layers: Sequence[Layer], symbols: Tensor, indices: Tensor) -> list[Layer]:
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


def encode_known_layers(
    quantized_data: Tensor, cluster_centers: Tensor | None, layers: Sequence[Layer]
) -> list[Layer]:
    """Encode new codeword indices with known layers (seed-compatible signature).

    Nothing is rebuilt: each code's symbols come from a per-codeword table
    derived from ``layers`` (pure lookups).

    Args:
        quantized_data: ``[N']`` int indices into ``cluster_centers``.
        cluster_centers: ``[K', D]`` float codebook of ``quantized_data``; each
            row is matched to the nearest leaf of ``layers`` (so a reordered
            codebook works). ``None``: indices are already in the layers'
            codebook order.
        layers: all layers of an earlier :func:`encode_layers` call.

    Returns:
        New ``list[Layer]`` sharing the known layers' nodes, with new codes.
    """
    symbols, codebook = _leaf_symbols(layers)
    if cluster_centers is None:
        indices = check_indices(quantized_data, codebook.shape[0], name="quantized_data")
    else:
        centers = check_codebook(cluster_centers)
        if centers.shape[1] != codebook.shape[1]:
            raise ValueError(f"cluster_centers have dimension {centers.shape[1]}, the layers {codebook.shape[1]}")
        indices = check_indices(quantized_data, centers.shape[0], name="quantized_data")
        centers = centers.to(device=codebook.device, dtype=codebook.dtype)
        if not (centers.shape == codebook.shape and torch.equal(centers, codebook)):
            indices = _nearest(centers, codebook)[indices.to(codebook.device)]
    if indices.numel() == 0:
        raise ValueError("quantized_data is empty: need at least one vector")
    return _relayer(layers, symbols, indices.to(codebook.device))


def transcode(data: Tensor, layers: Sequence[Layer], *, block_size: int | None = None) -> list[Layer]:
    """Encode new vectors with known layers: nearest codeword, then table lookups.

    Args:
        data: ``[N', D]`` float vectors.
        layers: all layers of an earlier :func:`encode_layers` call.
        block_size: elements per distance block of the nearest-codeword search.

    Returns:
        ``list[Layer]`` for ``data``; decoding all of them gives each vector's
        nearest codeword.
    """
    symbols, codebook = _leaf_symbols(layers)
    data = check_vectors(data, dim=codebook.shape[1], name="data")
    indices = _nearest(data.to(codebook.dtype).to(codebook.device), codebook, block_size or _NEAREST_BLOCK_ELEMENTS)
    return _relayer(layers, symbols, indices)


# --------------------------------------------------------------------------- seed-style tree


def build_layers(
    cluster_centers: Tensor,
    data: Tensor | None,
    quantized_data: Tensor | None,
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
    :func:`encode_layers`.

    Args:
        cluster_centers: ``[K, D]`` float codebook (empty clusters allowed).
        data: ``[N, D]`` float vectors, or ``None`` (then unit weights per code
            unless ``quantized_data`` gives counts).
        quantized_data: ``[N]`` int codeword indices, or ``None``.
        final_clusters: number of roots to keep (>= 1).

    Returns:
        :class:`ClusterTree` ``(layerized_cluster_centers [K + m, D], cluster_tree)``,
        usable with :func:`visualize_layers`.
    """
    codebook = check_codebook(cluster_centers)
    final = _check_positive_int(final_clusters, "final_clusters")
    num_codes = codebook.shape[0]
    counts = sums = None
    if quantized_data is not None:
        data, indices, codebook = _check_inputs(data, quantized_data, codebook)
        if data is not None:
            counts, sums = code_statistics(data, indices, num_codes)
        else:
            counts = torch.bincount(indices, minlength=num_codes).to(codebook.dtype)
    elif data is not None:
        raise ValueError("data given without quantized_data")
    hierarchy = build_hierarchy(codebook, counts, sums, linkage=linkage, block_size=block_size, progress=progress)
    kept = _kept_merges(hierarchy, final)
    new_id = torch.full((hierarchy.num_nodes,), -1, dtype=torch.long, device=codebook.device)
    new_id[:num_codes] = torch.arange(num_codes, device=codebook.device)
    new_id[kept] = num_codes + torch.arange(kept.numel(), device=codebook.device)
    pairs = new_id[hierarchy.children[kept - num_codes]]
    centers = torch.cat([codebook, hierarchy.center[kept]])
    return ClusterTree(centers, [tuple(p) for p in pairs.tolist()])


def _kept_merges(hierarchy: Hierarchy, final: int) -> Tensor:
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


def visualize_layers(*args: Any, **kwargs: Any):
    """Draw layers to a PNG with matplotlib; see :func:`svq_modules.plotting.visualize_layers`."""
    from ..plotting import visualize_layers as _visualize

    return _visualize(*args, **kwargs)
