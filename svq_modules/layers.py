"""Scalable layers over a :class:`~svq_modules.hierarchy.Hierarchy`.

A *layer* is a cut (frontier) of the tree. Layer 0 cuts the root's subtree into
at most ``2**b0`` nodes; layer ``l`` cuts each node of layer ``l-1`` into at
most ``2**b_l`` nodes. A vector whose leaf is already reached sends nothing
more. After the listed layers one *final* layer takes every vector the rest of
the way to its leaf, so decoding all layers gives back the exact codeword.

Cuts:

* ``"greedy"`` (default here; the package's default layers are the nested
  cells of :mod:`svq_modules.nested`, cut with ``node_level``): inside each node of the previous layer, repeatedly
  open the node whose split removes the most squared error (its Ward gain),
  until ``2**b`` nodes. Vectorized as a rank within the previous-layer group of
  the bottleneck gain from the group's root.
* ``"depth"``: the seed's fixed-depth cut, ``b`` tree levels below each node.

Everything is stored as fixed-shape tensors (:class:`LayerTables`), so encoding
indices into per-layer symbols and decoding symbols back are pure gathers.

Symbols: the layer-``l`` nodes under one layer-``(l-1)`` node form a *group*,
numbered ``0..g-1`` by node id; a vector sends its node's number. The raw
(fixed-length) cost of a symbol is ``ceil(log2 g)`` bits, since the decoder
knows ``g`` from the previous layers. The entropy-coded cost uses the tree's
branch probabilities ``count(child) / count(parent)`` (see
:func:`branch_probabilities`), i.e. the symbol is coded as its path of binary
decisions down the tree, conditioned on the parent node.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
from torch import Tensor

from .groups import rank_in_runs
from .hierarchy import Hierarchy
from .tree import node_depth, scan_to_marked
from .validation import (
    PROPOSALS,
    BitProposal,
    check_bit_proposal,
    check_bits_list,
    check_indices,
    check_int,
    dataclass_fields,
)

__all__ = [
    "LayerTables",
    "LayerRates",
    "BitProposal",
    "CUTS",
    "TREE_CUTS",
    "PROPOSALS",
    "build_layers",
    "resolve_bits",
    "encode_indices",
    "decode_codes",
    "reconstruct",
    "check_tables",
    "symbol_bits",
    "group_bits",
    "layer_rates",
    "branch_probabilities",
    "node_log2_prob",
]

#: layer methods of :func:`svq_modules.nested.build_scalable`: "nested" (Lloyd-optimised cells and
#: their own tree) and the two cuts of a given tree that :func:`build_layers` makes ("greedy", the default)
CUTS = ("nested", "greedy", "depth")
TREE_CUTS = ("greedy", "depth")
# PROPOSALS and BitProposal are validation's (with the one bit-proposal check), re-exported here
# smallest probability a branch may get, so every symbol stays codable
PROB_FLOOR = 2.0**-20
_DEFAULT_PROPOSAL_LAYERS = 5


@dataclass(frozen=True)
class LayerTables:
    """Per-layer lookup tables; shapes fixed by K (leaves), M = 2K-1 and L (layers).

    Attributes:
        widths: ``[L]`` int64, nominal bits of each layer (the final layer's
            width is what its deepest remaining subtree needs, 0 if none).
        leaf_node: ``[L, K]`` int64, the layer-l node holding leaf k.
        leaf_symbol: ``[L, K]`` int64, symbol sent in layer l by vectors of
            leaf k; -1 where nothing is sent (leaf already reached).
        group_start: ``[L, M]`` int64, offset in ``members[l]`` of the group of
            layer-l nodes below node p of layer l-1 (the root for l=0).
        group_size: ``[L, M]`` int64, size of that group; 0 where p is not split.
        members: ``[L, K]`` int64, layer-l nodes ordered by (group, symbol),
            padded with -1.
    """

    widths: Tensor
    leaf_node: Tensor
    leaf_symbol: Tensor
    group_start: Tensor
    group_size: Tensor
    members: Tensor

    @property
    def num_layers(self) -> int:
        return self.widths.shape[0]

    @property
    def num_leaves(self) -> int:
        return self.leaf_node.shape[1]

    @property
    def root(self) -> int:
        return self.group_start.shape[1] - 1

    def as_dict(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, tensors: dict[str, Tensor]) -> LayerTables:
        return cls(**dataclass_fields(cls, tensors))

    def to(self, device: torch.device | str) -> LayerTables:
        """The tables on ``device`` (int64 indices all: a dtype is refused)."""
        if isinstance(device, torch.dtype):
            raise ValueError(f"LayerTables.to takes a device, got the dtype {device}: its tables stay int64")
        return LayerTables(**{k: v.to(device) for k, v in self.as_dict().items()})


class LayerRates(NamedTuple):
    """Cumulative mean bits per vector after each layer: ``[L]`` float64 each."""

    raw_bits: Tensor
    entropy_bits: Tensor


class _Cut(NamedTuple):
    opened: Tensor  # [M] bool, internal nodes split by this or earlier layers
    frontier: Tensor  # [M] bool, nodes of this layer
    owner: Tensor  # [M] int64, node of the previous layer above each node


class _Cutter:
    """Precomputed tree facts shared by every cut of one hierarchy."""

    def __init__(self, hierarchy: Hierarchy, cut: str, node_level: Tensor | None = None):
        if cut == "nested":
            raise ValueError(
                "cut='nested' moves codewords between cells, so it builds its own tree: call "
                "svq_modules.nested.build_scalable (or build_nested) with the codebook; build_layers cuts a given "
                f"tree with one of {TREE_CUTS}"
            )
        if cut not in TREE_CUTS:
            raise ValueError(f"unknown cut {cut!r}; expected one of {TREE_CUTS}")
        self.h = hierarchy
        self.cut = cut
        self.num_leaves = hierarchy.num_leaves
        self.num_nodes = hierarchy.num_nodes
        device = hierarchy.device
        self.ids = torch.arange(self.num_nodes, device=device)
        self.internal = self.ids >= self.num_leaves
        gain = torch.full((self.num_nodes,), -math.inf, dtype=torch.float64, device=device)
        gain[self.num_leaves :] = hierarchy.split_gain().to(torch.float64)
        self.gain = gain
        self.depth = node_depth(hierarchy.parent)
        self.node_level = node_level

    def start(self) -> tuple[Tensor, Tensor]:
        """(opened, frontier) before layer 0: nothing opened, the root alone."""
        opened = torch.zeros(self.num_nodes, dtype=torch.bool, device=self.ids.device)
        frontier = torch.zeros_like(opened)
        frontier[-1] = True
        return opened, frontier

    def scan(self, frontier: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(owner, under, key)``: each node's frontier ancestor-or-self, whether it has one, and
        the least split gain on the way below it (see :func:`~svq_modules.tree.scan_to_marked`)."""
        return scan_to_marked(self.h.parent, frontier, self.gain, torch.minimum, math.inf)

    def step(
        self,
        opened: Tensor,
        frontier: Tensor,
        bits: int | None,
        level: int | None = None,
        scan: tuple[Tensor, Tensor, Tensor] | None = None,
    ) -> _Cut:
        """Cut every frontier node into at most ``2**bits`` nodes (``None``: to the leaves).

        With ``level`` (a constrained layer, see :mod:`svq_modules.refine`), open
        exactly the nodes whose ``node_level <= level``. ``scan``: :meth:`scan` of
        ``frontier``, if already known.
        """
        owner, under, key = self.scan(frontier) if scan is None else scan
        candidates = under & self.internal & ~opened
        if level is not None:
            new = candidates & (self.node_level <= level)
        elif bits is None:
            new = candidates
        elif self.cut == "depth":
            new = candidates & (self.depth - self.depth[owner] < bits)
        else:
            new = torch.zeros_like(candidates)
            cand = candidates.nonzero().squeeze(1)
            if cand.numel():
                # order: group, then bottleneck gain from the group root (desc), then depth, then id
                order = torch.argsort(self.depth[cand], stable=True)
                order = order[torch.argsort(-key[cand][order], stable=True)]
                order = order[torch.argsort(owner[cand][order], stable=True)]
                grp = owner[cand][order]
                rank = rank_in_runs(grp)
                new[cand[order[rank < (1 << bits) - 1]]] = True
        opened = opened | new
        has_parent = self.h.parent >= 0
        parent_opened = torch.zeros_like(opened)
        parent_opened[has_parent] = opened[self.h.parent[has_parent]]
        frontier = ~opened & (parent_opened | ~has_parent)
        return _Cut(opened, frontier, owner)

    def remaining_error(self, opened: Tensor) -> float:
        """Squared error still removable below a cut: sum of unopened split gains."""
        return float(self.gain[self.internal & ~opened].sum())

    def deepest_remaining_bits(self, frontier: Tensor) -> int:
        biggest = int(self.h.size[frontier].max())
        return math.ceil(math.log2(biggest)) if biggest > 1 else 0


def resolve_bits(
    bits: BitProposal, hierarchy: Hierarchy, num_layers: int | None = None, cut: str = "greedy"
) -> list[int]:
    """Turn a bit proposal into the list of listed-layer widths (base first).

    Args:
        bits: one of
            * a list of positive ints, e.g. ``[4, 2, 2, 2, 2]``;
            * an int ``b``: ``b`` bits for every layer (with ``num_layers``:
              ``num_layers - 1`` listed layers, else as many as it takes to
              reach every leaf);
            * ``"balanced_clusters"``: each layer multiplies the number of
              clusters by the same factor: the width of layer l is the
              smallest that gives at least ``K**((l+1)/L)`` nodes;
            * ``"balanced_values"``: each layer removes an equal share of the
              squared error the hierarchy can remove (the sum of all split
              gains): layer l's width is the smallest that leaves at most
              ``(1 - (l+1)/L)`` of it;
            * a callable ``f(hierarchy, num_listed) -> list[int]``.
        hierarchy: the tree the proposal is for.
        num_layers: total layers L including the final one (an int >= 2).
            Required for a callable; defaults to 5 for the named strategies;
            must be ``len(bits) + 1`` with a list.
        cut: the cut the widths will be used with (named strategies simulate
            it; ``"nested"`` simulates ``"greedy"``, its starting point).

    Returns:
        Widths of the listed layers (the final layer is added by :func:`build_layers`).

    Raises:
        ValueError: from :func:`~svq_modules.validation.check_bit_proposal`, the
        one bit-proposal check, or when a callable returns a bad list.
    """
    bits, num_layers = check_bit_proposal(bits, num_layers, need_num_layers=False)
    return _proposal_widths(bits, hierarchy, num_layers, cut)


def _proposal_widths(
    bits: list[int] | int | str | Callable[..., Sequence[int]], hierarchy: Hierarchy, num_layers: int | None, cut: str
) -> list[int]:
    """:func:`resolve_bits` of a proposal already passed through :func:`check_bit_proposal`."""
    cut = "greedy" if cut == "nested" else cut  # nested layers start from the greedy cut
    if isinstance(bits, list):
        return bits
    if isinstance(bits, str):
        return _balanced(bits, hierarchy, num_layers or _DEFAULT_PROPOSAL_LAYERS, cut)
    if isinstance(bits, int):
        return [bits] * (num_layers - 1) if num_layers is not None else _repeat_until_leaves(bits, hierarchy, cut)
    # a callable; check_bit_proposal made sure num_layers is given
    widths = check_bits_list(bits(hierarchy, num_layers - 1), "bits returned by the proposal")
    if len(widths) != num_layers - 1:
        raise ValueError(f"the bit proposal returned {len(widths)} widths, expected num_layers - 1 = {num_layers - 1}")
    return widths


def _repeat_until_leaves(b: int, hierarchy: Hierarchy, cut: str) -> list[int]:
    cutter = _Cutter(hierarchy, cut)
    opened, frontier = cutter.start()
    widths = []
    while not bool((frontier[: cutter.num_leaves]).all()):
        step = cutter.step(opened, frontier, b)
        opened, frontier = step.opened, step.frontier
        widths.append(b)
    return widths or [b]


def _balanced(name: str, hierarchy: Hierarchy, num_layers: int, cut: str) -> list[int]:
    cutter = _Cutter(hierarchy, cut)
    num_listed = max(1, num_layers - 1)
    max_bits = max(1, math.ceil(math.log2(max(2, hierarchy.num_leaves))))
    total_error = cutter.remaining_error(torch.zeros_like(cutter.internal))
    opened, frontier = cutter.start()
    widths = []
    for layer in range(num_listed):
        share = (layer + 1) / num_layers
        for b in range(1, max_bits + 1):
            step = cutter.step(opened, frontier, b)
            if name == "balanced_clusters":
                ok = int(step.frontier.sum()) >= hierarchy.num_leaves**share - 1e-9
            else:
                ok = cutter.remaining_error(step.opened) <= total_error * (1 - share) * (1 + 1e-9)
            if ok or bool(step.frontier[: cutter.num_leaves].all()):
                break
        widths.append(b)
        opened, frontier = step.opened, step.frontier
    return widths


def build_layers(
    hierarchy: Hierarchy,
    bits: BitProposal,
    *,
    cut: str = "greedy",
    num_layers: int | None = None,
    node_level: Tensor | None = None,
    constrained_layers: int = 0,
) -> LayerTables:
    """Cut the hierarchy into scalable layers.

    Args:
        hierarchy: the merge tree.
        bits: bit proposal (see :func:`resolve_bits`). A list gives
            ``len(bits)`` listed layers plus one final layer.
        cut: ``"greedy"`` (default) or ``"depth"`` (seed-compatible).
        num_layers: total number of layers L, final layer included.
        node_level: ``[M]`` int64 from a constrained build (see
            :mod:`svq_modules.refine`); with ``constrained_layers = C``, layer
            ``l < C`` opens exactly the nodes of level ``<= l`` instead of cutting.
        constrained_layers: C.

    Returns:
        :class:`LayerTables` on the hierarchy's device.
    """
    constrained_layers = check_int(constrained_layers, "constrained_layers", min=0)
    if constrained_layers and node_level is None:
        raise ValueError("constrained_layers needs node_level")
    if node_level is not None and (not torch.is_tensor(node_level) or node_level.is_floating_point()
                                   or node_level.is_complex() or tuple(node_level.shape) != (hierarchy.num_nodes,)):
        raise ValueError(f"node_level must be a [{hierarchy.num_nodes}] integer tensor (one level per node of the "
                         f"hierarchy), got " + (f"shape {list(node_level.shape)} {node_level.dtype}"
                                                 if torch.is_tensor(node_level) else type(node_level).__name__))
    cutter = _Cutter(hierarchy, cut, node_level)
    bits, num_layers = check_bit_proposal(bits, num_layers, need_num_layers=False)
    widths = _proposal_widths(bits, hierarchy, num_layers, cut)
    # an int without num_layers repeats until every leaf is reached: no separate final layer
    explicit_final = not (isinstance(bits, int) and num_layers is None)
    num_leaves, num_nodes = hierarchy.num_leaves, hierarchy.num_nodes
    device = hierarchy.device

    schedule: list[int | None] = list(widths) + ([None] if explicit_final else [])
    num_total = len(schedule)
    leaf_node = torch.empty(num_total, num_leaves, dtype=torch.long, device=device)
    leaf_symbol = torch.empty_like(leaf_node)
    members = torch.full_like(leaf_node, -1)
    group_start = torch.zeros(num_total, num_nodes, dtype=torch.long, device=device)
    group_size = torch.zeros_like(group_start)
    width_out = torch.zeros(num_total, dtype=torch.long, device=device)

    opened, frontier = cutter.start()
    scan = None
    for layer, bits_l in enumerate(schedule):
        width_out[layer] = cutter.deepest_remaining_bits(frontier) if bits_l is None else bits_l
        step = cutter.step(opened, frontier, bits_l, layer if layer < constrained_layers else None, scan)
        # layer-l nodes that are new, grouped under their layer-(l-1) node
        nodes = (step.frontier & ~frontier).nonzero().squeeze(1)
        grp = step.owner[nodes]
        order = torch.argsort(grp * num_nodes + nodes)
        nodes, grp = nodes[order], grp[order]
        start_of = torch.searchsorted(grp, grp)
        symbol = torch.arange(nodes.numel(), device=device) - start_of
        members[layer, : nodes.numel()] = nodes
        node_symbol = torch.full((num_nodes,), -1, dtype=torch.long, device=device)
        node_symbol[nodes] = symbol
        group_size[layer].index_add_(0, grp, torch.ones_like(grp))
        group_start[layer, grp] = start_of

        scan = cutter.scan(step.frontier)  # also the next layer's owners
        anc = scan[0]
        leaf_node[layer] = anc[:num_leaves]
        leaf_symbol[layer] = node_symbol[anc[:num_leaves]]
        opened, frontier = step.opened, step.frontier

    return LayerTables(
        widths=width_out,
        leaf_node=leaf_node,
        leaf_symbol=leaf_symbol,
        group_start=group_start,
        group_size=group_size,
        members=members,
    )


def encode_indices(tables: LayerTables, indices: Tensor) -> Tensor:
    """Per-layer symbols of codeword indices.

    Args:
        indices: ``[N]`` int codeword indices.

    Returns:
        ``[L, N]`` int64 symbols, -1 where a vector sends nothing.
    """
    indices = check_indices(indices, tables.num_leaves)
    return tables.leaf_symbol[:, indices.to(tables.leaf_symbol.device)]


def decode_codes(tables: LayerTables, codes: Tensor) -> Tensor:
    """Walk per-layer symbols down the tree.

    Args:
        codes: ``[l, N]`` int symbols of layers ``0..l-1`` (-1 = nothing sent).

    Returns:
        ``[l, N]`` int64 node id of each vector after each layer.

    Raises:
        ValueError: a symbol outside its group, or a symbol where the vector's
        leaf was already reached (or -1 where a symbol is due).
    """
    if not torch.is_tensor(codes) or codes.dim() != 2:
        raise ValueError(f"codes must be a [layers, N] tensor, got shape {list(getattr(codes, 'shape', []))}")
    if codes.is_floating_point() or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor, got dtype {codes.dtype}")
    if codes.shape[0] > tables.num_layers:
        raise ValueError(f"codes have {codes.shape[0]} layers but the tables have {tables.num_layers}")
    codes = codes.long().to(tables.members.device)
    node = torch.full((codes.shape[1],), tables.root, dtype=torch.long, device=codes.device)
    out = torch.empty_like(codes)
    for layer in range(codes.shape[0]):
        sym = codes[layer]
        size = tables.group_size[layer, node]
        split = size > 0
        bad = torch.where(split, (sym < 0) | (sym >= size), sym != -1)
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ValueError(
                f"invalid code {int(sym[i])} in layer {layer} at vector {i}: "
                + (f"its group has {int(size[i])} symbols" if bool(split[i]) else "its leaf was already reached (expected -1)")
            )
        pos = (tables.group_start[layer, node] + sym).clamp_min(0)
        node = torch.where(split, tables.members[layer, pos], node)
        out[layer] = node
    return out


def check_tables(hierarchy: Hierarchy, tables: LayerTables) -> None:
    """Raise a one-line ``ValueError`` unless ``tables`` were cut from a tree of ``hierarchy``'s size."""
    if not isinstance(hierarchy, Hierarchy):
        raise ValueError(f"hierarchy must be a Hierarchy, got {type(hierarchy).__name__}")
    if not isinstance(tables, LayerTables):
        raise ValueError(f"tables must be LayerTables, got {type(tables).__name__}")
    if tables.num_leaves != hierarchy.num_leaves or tables.group_size.shape[1] != hierarchy.num_nodes:
        raise ValueError(
            f"tables are for {tables.num_leaves} leaves / {tables.group_size.shape[1]} nodes but the hierarchy "
            f"has {hierarchy.num_leaves} / {hierarchy.num_nodes}"
        )


def reconstruct(hierarchy: Hierarchy, tables: LayerTables, indices: Tensor, num_layers: int) -> Tensor:
    """Reconstruction of codeword indices after ``num_layers`` layers.

    Args:
        indices: ``[N]`` int codeword indices.
        num_layers: 1..L; L gives the exact codewords.

    Returns:
        ``[N, D]`` float centers of the layer ``num_layers-1`` nodes.
    """
    check_tables(hierarchy, tables)
    num_layers = check_int(num_layers, "num_layers", min=1, max=tables.num_layers)
    indices = check_indices(indices, tables.num_leaves)
    return hierarchy.center[tables.leaf_node[num_layers - 1, indices.to(tables.leaf_node.device)]]


def symbol_bits(tables: LayerTables) -> Tensor:
    """Raw bits leaf k's vectors spend in layer l: ``ceil(log2(group size))``; ``[L, K]`` int64."""
    prev = torch.cat(
        [torch.full_like(tables.leaf_node[:1], tables.root), tables.leaf_node[:-1]], dim=0
    )
    bits = group_bits(tables.group_size.gather(1, prev))
    return torch.where(tables.leaf_symbol >= 0, bits, 0)


def group_bits(size: Tensor) -> Tensor:
    """Raw bits of a symbol drawn from a group of ``size`` nodes: ``ceil(log2 size)``, 0 for 0 or 1; int64, same shape."""
    return torch.ceil(torch.log2(size.clamp_min(1).double())).long()


def branch_probabilities(hierarchy: Hierarchy) -> Tensor:
    """Probability of the left child of each internal node: ``[K-1]`` float64.

    ``count(left) / count(node)``, clamped to ``[PROB_FLOOR, 1 - PROB_FLOOR]``;
    0.5 where the node holds no data. This is the entropy model of the layers:
    a layer symbol costs the sum of ``-log2`` of the branches it takes.
    """
    if hierarchy.num_leaves == 1:
        return torch.zeros(0, dtype=torch.float64, device=hierarchy.device)
    count = hierarchy.count.to(torch.float64)
    left = count[hierarchy.children[:, 0]]
    total = count[hierarchy.num_leaves :]
    p = torch.where(total > 0, left / total.clamp_min(1e-300), 0.5)
    return p.clamp(PROB_FLOOR, 1 - PROB_FLOOR)


def node_log2_prob(hierarchy: Hierarchy) -> Tensor:
    """``log2 P(node | root)`` under :func:`branch_probabilities`: ``[M]`` float64."""
    num_leaves = hierarchy.num_leaves
    p_left = branch_probabilities(hierarchy)
    step = torch.zeros(hierarchy.num_nodes, dtype=torch.float64, device=hierarchy.device)
    if num_leaves > 1:
        step[hierarchy.children[:, 0]] = torch.log2(p_left)
        step[hierarchy.children[:, 1]] = torch.log2(1 - p_left)
    is_root = hierarchy.parent < 0
    _, _, logp = scan_to_marked(hierarchy.parent, is_root, step, torch.add, 0.0)
    return logp


def layer_rates(hierarchy: Hierarchy, tables: LayerTables, indices: Tensor | None = None) -> LayerRates:
    """Cumulative mean bits per vector after each layer.

    Args:
        indices: ``[N]`` codeword indices of the data to rate; by default the
            hierarchy's own counts weigh the codes.

    Returns:
        :class:`LayerRates` with raw (fixed-length) and ideal entropy-coded bits,
        each ``[L]`` float64.
    """
    check_tables(hierarchy, tables)
    if indices is None:
        weight = hierarchy.count[: tables.num_leaves].to(torch.float64)
        if float(weight.sum()) <= 0:
            weight = torch.ones_like(weight)
    else:
        indices = check_indices(indices, tables.num_leaves)
        weight = torch.bincount(indices.to(tables.leaf_node.device), minlength=tables.num_leaves).double()
        if indices.numel() == 0:
            raise ValueError("indices is empty")
    weight = weight / weight.sum()
    raw = symbol_bits(tables).double() @ weight
    logp = node_log2_prob(hierarchy)
    prev = torch.cat([torch.full_like(tables.leaf_node[:1], tables.root), tables.leaf_node[:-1]], dim=0)
    ent = (logp[prev] - logp[tables.leaf_node]) @ weight
    return LayerRates(raw_bits=raw.cumsum(0), entropy_bits=ent.cumsum(0))
