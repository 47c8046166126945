"""Cluster hierarchy: sufficient statistics and a batched merge tree over K codewords.

The tree is built bottom-up with *reciprocal nearest neighbours* (RNN): in each
round every active node knows its nearest neighbour under the linkage cost, and
all mutually-nearest pairs merge at once. For Ward's linkage (reducible) this
gives the same tree as the textbook greedy algorithm, up to ties, while the
work per round is a handful of blocked matrix products on the input's device.

Only per-code statistics (count, sum of assigned vectors) are needed: Ward's
cost ``n_a n_b / (n_a + n_b) * ||mu_a - mu_b||^2`` is exactly the increase of
the squared error when two clusters merge, and the count-weighted centroid of a
node is the MSE-optimal reconstruction of the data below it.

Layout: :func:`build_constrained_hierarchy` checks the inputs, starts a
:class:`MergeState` (every tensor one build reads and writes), chains codes
without data onto their nearest code (:func:`_absorb_empty_codes`), then runs
one *phase* per constraint row and a free one (:func:`_merge_phase`). A phase
is a loop of rounds (:func:`_merge_round`): merge all mutually-nearest pairs
(:func:`_record_merges`), then update the candidate lists of the surviving
roots (:func:`_update_survivors`) and of the new nodes
(:func:`_inherit_candidates`). Distances come from the pure blocked kernels
of :mod:`svq_modules.linkage`; a constrained phase compares each node with its
own label's nodes only. Small groups, and any phase once few roots are left
(``_DENSE_SWITCH``), merge in padded dense rounds instead (:func:`_dense_phase`:
every pair cost of a group in one matrix per round, no candidate lists).
:func:`ward_clusters` runs one such phase stopped early (at most m clusters per
label), for the nested layers (:mod:`svq_modules.nested`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .groups import rank_in_runs
from .linkage import LINKAGES, candidate_rows, pair_costs
from .tree import scan_to_marked
from .validation import check_codebook, check_finite, check_indices, check_int, dataclass_fields, working_dtype

__all__ = [
    "Hierarchy",
    "ConstrainedHierarchy",
    "build_hierarchy",
    "build_constrained_hierarchy",
    "ward_clusters",
    "code_statistics",
    "code_points",
    "LINKAGES",
]

# weight given to codes no vector uses: they merge first, at (almost) no cost,
# and barely move the centroid of the node they join.
_EMPTY_WEIGHT = 1e-6
# elements of one block of the distance matrix (rows x active nodes)
_DEFAULT_BLOCK_ELEMENTS = 1 << 19
# partners remembered per node by the Ward merge loop
_CANDIDATES = 8
# longer lists for very large codebooks, where full rescans dominate
_CANDIDATES_LARGE = 64
_LARGE_CODEBOOK = 32768
_MIN_BLOCK_ROWS = 64
# a phase whose groups need at most this many pair costs (padded) runs on dense per-group matrices
_DENSE_PHASE_ELEMENTS = 1 << 24
# ... and no group is larger than this (larger ones reuse work across rounds with candidate lists)
_DENSE_MAX_GROUP = 512
# a phase with candidate lists goes on in dense rounds once this many roots are left
_DENSE_SWITCH = 256
# small groups share one padded table up to this many pair costs, else one table per size class
_DENSE_ONE_TABLE = 1 << 14


def code_statistics(
    x: Tensor, indices: Tensor, num_codes: int, weights: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Per-code sufficient statistics in one scatter pass.

    Args:
        x: ``[N, D]`` float vectors.
        indices: ``[N]`` int code index of each vector, in ``[0, num_codes)``.
        num_codes: K.
        weights: optional ``[N]`` float weight per vector.

    Returns:
        ``counts [K]`` and ``sums [K, D]`` in the dtype of ``x``, float32 for float16 / bfloat16 ``x``
        (:func:`~svq_modules.validation.working_dtype`).
    """
    if not torch.is_tensor(x) or x.dim() != 2:
        raise ValueError(f"x must be a [N, D] tensor, got shape {tuple(getattr(x, 'shape', ()))}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating point tensor, got dtype {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError("x is empty: need at least one vector")
    check_finite(x, "x")
    num_codes = check_int(num_codes, "num_codes", min=1)
    indices = check_indices(indices, num_codes, expected_len=x.shape[0])
    x = x.to(working_dtype(x.dtype))
    if weights is None:
        w = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
    else:
        if not torch.is_tensor(weights) or weights.is_complex():
            raise ValueError(f"weights must be a real [N] tensor, got {type(weights).__name__} "
                             f"{getattr(weights, 'dtype', '')}".rstrip())
        if weights.shape != (x.shape[0],):
            raise ValueError(f"weights must have shape [{x.shape[0]}], got {tuple(weights.shape)}")
        check_finite(weights, "weights")
        if (weights < 0).any():
            raise ValueError("weights must be >= 0")
        w = weights.to(x.dtype)
    counts = torch.zeros(num_codes, dtype=x.dtype, device=x.device).index_add_(0, indices, w)
    sums = torch.zeros(num_codes, x.shape[1], dtype=x.dtype, device=x.device)
    sums.index_add_(0, indices, x * w[:, None])
    return counts, sums


def code_points(
    codebook: Tensor, counts: Tensor | None = None, sums: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The codewords as weighted points: where their data lies and how much of it.

    Args:
        codebook: ``[K, D]`` float codewords.
        counts, sums: per-code statistics (:func:`code_statistics`), checked as
            :func:`build_hierarchy` checks them; without them every codeword
            weighs 1 and stands for its data.

    Returns:
        ``(points [K, D], weights [K])`` on the codebook's device, in its dtype (float32 for float16 /
        bfloat16, :func:`~svq_modules.validation.working_dtype`): the
        data mean of each code (its codeword where it has no data) and its data count.
    """
    given_sums = sums is not None
    codebook, counts, sums, _ = _check_build_inputs(codebook, counts, sums, "ward", None)
    if not given_sums:  # the codewords themselves (no rounding through codeword * count / count)
        return codebook.clone(), counts
    has_data = counts > 0
    points = torch.where(has_data[:, None], sums / counts.clamp_min(torch.finfo(counts.dtype).tiny)[:, None], codebook)
    return points, counts


@dataclass(frozen=True)
class Hierarchy:
    """A binary merge tree over K leaves (codewords), M = 2K-1 nodes.

    Leaves are nodes ``0..K-1`` (node k is codeword k); internal nodes are
    ``K..2K-2`` in merge order, so a parent's id is always larger than its
    children's and node ``M-1`` is the root.

    Attributes:
        parent: ``[M]`` int64, parent node, -1 at the root.
        children: ``[K-1, 2]`` int64, children of internal node ``K+i``.
        size: ``[M]`` int64, number of leaves below each node.
        count: ``[M]`` float, data count below each node.
        center: ``[M, D]`` float; leaves hold the codewords, internal nodes the
            count-weighted mean of the data below them.
        merge_cost: ``[K-1]`` float, linkage cost at which each internal node
            was formed.
    """

    parent: Tensor
    children: Tensor
    size: Tensor
    count: Tensor
    center: Tensor
    merge_cost: Tensor

    @property
    def num_leaves(self) -> int:
        return self.children.shape[0] + 1

    @property
    def num_nodes(self) -> int:
        return self.parent.shape[0]

    @property
    def dim(self) -> int:
        return self.center.shape[1]

    @property
    def root(self) -> int:
        return self.num_nodes - 1

    @property
    def device(self) -> torch.device:
        return self.parent.device

    def as_dict(self) -> dict[str, Tensor]:
        """All tensors by field name (e.g. to copy into module buffers)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, tensors: dict[str, Tensor]) -> Hierarchy:
        return cls(**dataclass_fields(cls, tensors))

    def to(self, *args, **kwargs) -> Hierarchy:
        """Move float tensors like ``Tensor.to``; index tensors keep int64."""
        moved = {}
        for name, t in self.as_dict().items():
            if t.is_floating_point():
                moved[name] = t.to(*args, **kwargs)
            else:
                device = torch.empty(0).to(*args, **kwargs).device if args or kwargs else t.device
                moved[name] = t.to(device)
        return Hierarchy(**moved)

    def split_gain(self) -> Tensor:
        """Squared error removed by splitting each internal node into its children.

        ``n_l n_r / (n_l + n_r) * ||c_l - c_r||^2`` from counts and centers: the
        Ward cost for a tree built from data statistics. Returns ``[K-1]`` float.
        """
        if self.num_leaves == 1:
            return self.center.new_zeros(0)
        left, right = self.children[:, 0], self.children[:, 1]
        n_l, n_r = self.count[left], self.count[right]
        total = n_l + n_r
        factor = torch.where(total > 0, n_l * n_r / total.clamp_min(torch.finfo(total.dtype).tiny), 0.0)
        return factor * (self.center[left] - self.center[right]).pow(2).sum(-1)


class ConstrainedHierarchy(NamedTuple):
    """A merge tree and the constraint level each of its nodes was formed at.

    Attributes:
        hierarchy: the :class:`Hierarchy`.
        node_level: ``[M]`` int64: ``c + 1`` for a node formed while merging
            inside the labels of constraint row ``c``, 0 for a node formed
            after all constraints, -1 for leaves.
    """

    hierarchy: Hierarchy
    node_level: Tensor


def build_hierarchy(
    codebook: Tensor,
    counts: Tensor | None = None,
    sums: Tensor | None = None,
    *,
    linkage: str = "ward",
    block_size: int | None = None,
    progress: bool = False,
    constraints: Tensor | None = None,
) -> Hierarchy:
    """Build the full binary merge tree over the K codewords.

    Args:
        codebook: ``[K, D]`` float codewords.
        counts: ``[K]`` float >= 0, number (or weight) of data vectors per code.
            Codes with zero count are accepted.
        sums: ``[K, D]`` float, sum of the data vectors of each code. With
            ``counts`` it makes internal centers the exact data means; without
            it the codewords stand in for the data means.
        linkage: ``"ward"`` (count-weighted, default; with no ``counts`` every
            code weighs 1) or ``"centroid"`` (unweighted centroid linkage over
            the codewords: cost ``||mu_a - mu_b||^2`` between the plain means of
            the member codewords; usable with no data). Centroid linkage is not
            reducible, so its batched tree may differ from a greedy one.
        block_size: elements of a distance block (memory knob); default 512K.
        progress: show a tqdm bar over merges.
        constraints: optional ``[C, K]`` int64 nested leaf labels, coarse to
            fine (row c refines row c-1). Merges first stay inside the finest
            labels, then inside each coarser one, then go free, so every
            labelled cell is a subtree (see :mod:`svq_modules.refine`).

    Returns:
        :class:`Hierarchy` on the codebook's device, in its dtype (float32 for a float16 / bfloat16
        codebook, :func:`~svq_modules.validation.working_dtype`).

    Raises:
        ValueError: bad inputs, e.g. ``constraints`` whose row c has a label
        spanning two labels of row c-1.
    """
    built = build_constrained_hierarchy(
        codebook, counts, sums, constraints, linkage=linkage, block_size=block_size, progress=progress
    )
    return built.hierarchy


def build_constrained_hierarchy(
    codebook: Tensor,
    counts: Tensor | None = None,
    sums: Tensor | None = None,
    constraints: Tensor | None = None,
    *,
    linkage: str = "ward",
    block_size: int | None = None,
    progress: bool = False,
) -> ConstrainedHierarchy:
    """:func:`build_hierarchy`, also telling at which constraint level each node formed.

    The arguments are those of :func:`build_hierarchy`. Merging runs in
    phases: inside the labels of ``constraints[C-1]`` (finest) first, then of
    each coarser row, then free. Under Ward linkage, codes without data are
    first chained onto their nearest code with data (level ``C``).

    Returns:
        :class:`ConstrainedHierarchy` ``(hierarchy, node_level [M] int64)``;
        :func:`svq_modules.layers.build_layers` takes ``node_level`` to cut
        exactly the constrained cells.
    """
    codebook, counts, sums, constraints = _check_build_inputs(codebook, counts, sums, linkage, constraints)
    state = MergeState.start(codebook, counts, sums, linkage, block_size)
    bar = _progress_bar(progress, state.num_codes - 1)
    if state.num_codes > 1 and _phases_all_dense(constraints):
        _concurrent_phases(state, constraints, bar)
    else:
        merged = _merge_duplicate_roots(state, constraints)  # all tied: one merge a round otherwise
        if linkage == "ward":  # candidate lists need the codes without data out of the way
            merged += _absorb_empty_codes(state, constraints)
        if bar is not None:
            bar.update(merged)
        # phases: inside the finest labels first, then each coarser row, then free
        phases = [(c + 1, constraints[c]) for c in reversed(range(constraints.shape[0]))] + [(0, None)]
        for level, leaf_label in phases:
            _merge_phase(state, level, leaf_label, bar)
    if bar is not None:
        bar.close()
    return ConstrainedHierarchy(_finish(state, codebook), state.node_level)


def ward_clusters(
    points: Tensor, counts: Tensor, labels: Tensor, max_clusters: int, *, block_size: int | None = None
) -> Tensor:
    """Ward agglomeration inside each label, stopped at ``max_clusters`` clusters per label.

    The same batched merging as :func:`build_hierarchy` (phase of one
    constraint row), stopped early: in each label the cheapest mutually-nearest
    pairs merge until at most ``max_clusters`` clusters are left. Items without
    data (count 0) first join their nearest item with data in the same label.
    On the batched path (labels of more than a few hundred items) identical
    items (same centroid and label) first merge at zero cost, so such a label
    may end with fewer than ``max_clusters`` clusters: separate cells for
    identical items would lower no error.

    Args:
        points: ``[n, D]`` float item centroids (e.g. data means of codewords).
        counts: ``[n]`` float >= 0 item weights (data counts).
        labels: ``[n]`` int64 label of each item; clusters never straddle labels.
        max_clusters: clusters per label, an int >= 1.
        block_size: distance block elements (memory knob).

    Returns:
        ``[n]`` int64 cluster of each item, numbered ``0..C-1``.
    """
    max_clusters = check_int(max_clusters, "max_clusters", min=1)
    points = check_codebook(points)
    counts = _check_stat(counts, (points.shape[0],), "counts", points)
    if not torch.is_tensor(labels) or labels.shape != (points.shape[0],) or labels.is_floating_point():
        raise ValueError(f"labels must be a [{points.shape[0]}] integer tensor, got {list(labels.shape)}")
    labels = labels.to(device=points.device, dtype=torch.long)
    if points.shape[0] == 1:
        return torch.zeros(1, dtype=torch.long, device=points.device)
    _, group, sizes = torch.unique(labels, return_inverse=True, return_counts=True)
    if _dense_fits(sizes):
        return _dense_clusters(points, counts, group, sizes, max_clusters)
    state = MergeState.start(points, counts, points * counts[:, None], "ward", block_size)
    _merge_duplicate_roots(state, labels[None])
    _absorb_empty_codes(state, labels[None])
    _merge_phase(state, 1, labels, None, max_roots=max_clusters)
    root, _, _ = scan_to_marked(state.parent, state.alive[: state.num_nodes])
    return torch.unique(root[: points.shape[0]], return_inverse=True)[1]


def _check_build_inputs(
    codebook: Tensor, counts: Tensor | None, sums: Tensor | None, linkage: str, constraints: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Checked ``(codebook, counts [K], sums [K, D], constraints [C, K] int64)`` on the codebook's device, in its
    :func:`~svq_modules.validation.working_dtype` (float32 for a float16 / bfloat16 codebook)."""
    codebook = check_codebook(codebook)
    codebook = codebook.to(working_dtype(codebook.dtype))
    if linkage not in LINKAGES:
        raise ValueError(f"unknown linkage {linkage!r}; expected one of {LINKAGES}")
    num_codes, dim = codebook.shape
    device, dtype = codebook.device, codebook.dtype
    if counts is None:
        if sums is not None:
            raise ValueError("sums given without counts")
        counts = torch.ones(num_codes, dtype=dtype, device=device)
    else:
        counts = _check_stat(counts, (num_codes,), "counts", codebook)
        if (counts < 0).any():
            raise ValueError("counts must be >= 0")
    if sums is None:
        sums = codebook * counts[:, None]
    else:
        sums = _check_stat(sums, (num_codes, dim), "sums", codebook)
    if constraints is None:
        constraints = torch.zeros(0, num_codes, dtype=torch.long, device=device)
    if not torch.is_tensor(constraints):
        raise ValueError(f"constraints must be a [C, {num_codes}] integer tensor, got {type(constraints).__name__}")
    if constraints.dim() != 2 or constraints.shape[1] != num_codes or constraints.is_floating_point():
        raise ValueError(f"constraints must be a [C, {num_codes}] integer tensor, got {list(constraints.shape)}")
    constraints = constraints.to(device=device, dtype=torch.long)
    _check_nested(constraints)
    return codebook, counts, sums, constraints


def _check_nested(constraints: Tensor) -> None:
    """Raise ``ValueError`` unless every label of row ``c`` of ``constraints [C, K]`` lies inside one label of
    row ``c - 1``, naming the first label that straddles two."""
    for c in range(1, constraints.shape[0]):
        coarse, fine = constraints[c - 1], constraints[c]
        labels, cell = torch.unique(fine, return_inverse=True)
        owner = torch.empty_like(labels).scatter_(0, cell, coarse)  # one coarse label per fine label (any one)
        straddle = owner[cell] != coarse
        if bool(straddle.any()):
            i = int(straddle.nonzero()[0, 0])
            a, b = sorted((int(coarse[i]), int(owner[cell[i]])))
            raise ValueError(f"constraints must be nested (each label of a row inside one label of the row above): "
                             f"row {c} label {int(fine[i])} spans row {c - 1} labels {a} and {b}")


def _check_cost_range(mu: Tensor, weight: Tensor, linkage: str) -> None:
    """``ValueError`` unless every linkage cost of a build fits ``mu``'s dtype.

    Every centroid lies in the hull of the centred leaf means ``mu [K, D]`` (norm at most ``R``), so a
    squared distance, expanded or not, is at most ``4 R^2``, and a Ward cost ``w_a w_b / (w_a + w_b) d^2``
    at most ``W / 4 * 4 R^2`` (``W``: the total of ``weight [K]``). Past the dtype's range the merges would
    compare infinities and the tree come out wrong.
    """
    r2 = float(mu.double().pow(2).sum(-1).max())
    bound = r2 * max(4.0, float(weight.double().sum()) if linkage == "ward" else 4.0)
    if not bound <= torch.finfo(mu.dtype).max:
        raise ValueError(f"linkage costs overflow {mu.dtype} (codewords or counts too large: the largest cost could "
                         f"reach {bound:.2g}): rescale the data")


def _progress_bar(progress: bool, total: int) -> Any:
    """A tqdm bar over ``total`` merges, or None."""
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="hierarchy", unit="merge")


@dataclass
class MergeState:
    """The tensors one tree build reads and updates, round after round.

    Node ids: leaves ``0..K-1``, internal nodes ``K..M-1`` in merge order
    (M = 2K-1). The merge geometry and the candidate lists have one more row,
    the *sentinel* id M: it pads candidate lists and is never alive.

    Ward is reducible, so a node keeps a short list of its cheapest partners
    (merged partners are replaced by their new parent); a node whose nearest
    neighbour merged away re-checks that list and scans all nodes only when
    the list cannot prove its best entry is the true nearest neighbour
    (``bound``). Centroid linkage keeps one candidate and rescans every round.
    """

    linkage: str
    block_elements: int  # costs in memory at once while scanning candidates
    pair_block: int  # node pairs per block of exact pair costs
    next_id: int  # id of the next internal node
    # the tree being built
    parent: Tensor  # [M] int64, -1 while a root
    children: Tensor  # [K-1, 2] int64
    merge_cost: Tensor  # [K-1] float
    size: Tensor  # [M] int64, leaves below
    count: Tensor  # [M] float, data count below
    data_sum: Tensor  # [M, D] float, data sum below
    node_level: Tensor  # [M] int64, see ConstrainedHierarchy
    # merge geometry, [M + 1] rows
    mu: Tensor  # [M+1, D] centroid the linkage sees, minus `offset` (precision)
    offset: Tensor  # [1, D]
    weight: Tensor  # [M+1] Ward weight (data count; ~0 for codes without data), 1 for centroid linkage
    sqnorm: Tensor  # [M+1] |mu|^2
    alive: Tensor  # [M+1] bool, roots of the current forest
    some_leaf: Tensor  # [M+1] int64, one leaf below each node
    label: Tensor | None  # [M+1] int64 constraint label in the current phase (-1: sentinel); None: free
    # candidate lists, [M + 1] rows
    cand: Tensor  # [M+1, k] int64, cheapest known partners, sentinel-padded
    cand_cost: Tensor  # [M+1, k] float, their costs (NaN: unknown, inf: missing or merged)
    bound: Tensor  # [M+1] float, every partner outside the list costs at least this
    nn: Tensor  # [M+1] int64, nearest partner
    nn_cost: Tensor  # [M+1] float, its cost
    remap: Tensor  # [M+1] int64, what a list entry becomes: the parent once merged, else itself

    @property
    def num_codes(self) -> int:
        return self.children.shape[0] + 1

    @property
    def num_nodes(self) -> int:
        return self.parent.shape[0]

    @property
    def sentinel(self) -> int:
        return self.num_nodes

    @property
    def done(self) -> bool:
        return self.next_id >= self.num_nodes

    def active(self) -> Tensor:
        """``[m]`` int64 ids of the current roots, ascending."""
        return self.alive.nonzero().squeeze(1)

    @classmethod
    def start(
        cls, codebook: Tensor, counts: Tensor, sums: Tensor, linkage: str, block_size: int | None
    ) -> MergeState:
        """Every code its own root; see :func:`build_hierarchy` for the arguments."""
        num_codes, dim = codebook.shape
        device, dtype = codebook.device, codebook.dtype
        num_nodes = 2 * num_codes - 1
        count = torch.zeros(num_nodes, dtype=dtype, device=device)
        data_sum = torch.zeros(num_nodes, dim, dtype=dtype, device=device)
        count[:num_codes] = counts
        data_sum[:num_codes] = sums
        # the weights and centroids the linkage sees, centered for precision
        has_data = counts > 0
        leaf_mu = torch.where(has_data[:, None], sums / counts.clamp_min(1e-30)[:, None], codebook)
        offset = leaf_mu.mean(0, keepdim=True)
        mu = torch.zeros(num_nodes + 1, dim, dtype=dtype, device=device)
        mu[:num_codes] = leaf_mu - offset
        weight = torch.ones(num_nodes + 1, dtype=dtype, device=device)
        if linkage == "ward":
            weight[:num_codes] = torch.where(has_data, counts, counts.new_tensor(_EMPTY_WEIGHT))
        _check_cost_range(mu[:num_codes], weight[:num_codes], linkage)
        alive = torch.zeros(num_nodes + 1, dtype=torch.bool, device=device)
        alive[:num_codes] = True
        block = _DEFAULT_BLOCK_ELEMENTS if block_size is None else check_int(block_size, "block_size", min=1)
        k = (_CANDIDATES_LARGE if num_codes >= _LARGE_CODEBOOK else _CANDIDATES) if linkage == "ward" else 1
        sentinel = num_nodes

        def full(shape: tuple[int, ...], value: float, dtype: torch.dtype = dtype) -> Tensor:
            return torch.full(shape, value, dtype=dtype, device=device)

        return cls(
            linkage=linkage,
            block_elements=block,
            pair_block=max(1 << 14, block // max(dim, 1)),
            next_id=num_codes,
            parent=full((num_nodes,), -1, torch.long),
            children=torch.empty((num_codes - 1, 2), dtype=torch.long, device=device),
            merge_cost=torch.empty(num_codes - 1, dtype=dtype, device=device),
            size=torch.ones(num_nodes, dtype=torch.long, device=device),
            count=count,
            data_sum=data_sum,
            node_level=full((num_nodes,), -1, torch.long),
            mu=mu,
            offset=offset,
            weight=weight,
            sqnorm=mu.pow(2).sum(-1),
            alive=alive,
            some_leaf=torch.arange(num_nodes + 1, device=device),
            label=None,
            cand=full((num_nodes + 1, k), sentinel, torch.long),
            cand_cost=full((num_nodes + 1, k), math.inf),
            bound=full((num_nodes + 1,), math.inf),
            nn=full((num_nodes + 1,), sentinel, torch.long),
            nn_cost=full((num_nodes + 1,), math.inf),
            remap=torch.arange(num_nodes + 1, device=device),
        )


def _refresh(state: MergeState, rows: Tensor, active: Tensor) -> None:
    """Rescan the candidate lists of ``rows [R]`` against all ``active [m]`` nodes."""
    c, cost = candidate_rows(
        rows, active, state.mu, state.weight, state.sqnorm, state.linkage, state.cand.shape[1],
        state.block_elements, state.label,
    )
    state.cand[rows], state.cand_cost[rows] = c, cost
    state.nn[rows], state.nn_cost[rows] = c[:, 0], cost[:, 0]
    # complete list (fewer partners than k) -> no bound needed
    state.bound[rows] = torch.where(c[:, -1] == state.sentinel, math.inf, cost[:, -1])


def _fill_costs(state: MergeState, rows: Tensor, cand: Tensor, cost: Tensor) -> Tensor:
    """Fill the NaN (unknown) entries of ``cost [R, k]`` for partners ``cand [R, k]`` of
    ``rows [R]``; partners that are no longer roots cost inf. Returns ``cost``."""
    todo = torch.isnan(cost)
    r = rows[:, None].expand_as(cand)[todo]
    cost[todo] = pair_costs(r, cand[todo], state.mu, state.weight, state.linkage, state.pair_block, state.label)
    cost[~state.alive[cand]] = math.inf
    return cost


def _merge_phase(state: MergeState, level: int, leaf_label: Tensor | None, bar: Any, max_roots: int = 1) -> None:
    """Merge mutually-nearest pairs, round after round, until at most ``max_roots``
    roots per label of ``leaf_label [K]`` (None: one label) remain; new nodes get ``level``."""
    if state.done:
        return
    if leaf_label is None:
        state.label = None
    else:
        state.label = torch.full_like(state.some_leaf, -1)
        nodes = state.some_leaf[: state.num_nodes].clamp_max(state.num_codes - 1)
        state.label[: state.num_nodes] = leaf_label[nodes]
    active = state.active()
    groups = _small_groups(state, active)
    if groups is not None:
        _dense_phase(state, level, groups, max_roots, bar)
        return
    _refresh(state, active, active)
    while not state.done:
        merged = _merge_round(state, level, max_roots)
        if merged == 0:
            break  # every label of this phase is down to max_roots roots
        if bar is not None:
            bar.update(merged)
        active = state.active()
        if active.numel() <= min(_DENSE_SWITCH, _DENSE_MAX_GROUP):  # few roots left: padded rounds, no lists
            groups = _small_groups(state, active)
            if groups is not None:
                _dense_phase(state, level, groups, max_roots, bar)
                return


def _size_class(sizes: Tensor) -> Tensor:
    """Padded width of groups of ``sizes [G]``: the next power of two."""
    return sizes.double().log2().ceil().exp2().long()


def _dense_fits(sizes: Tensor) -> bool:
    """Whether groups of ``sizes [G]`` are small enough for :func:`_dense_phase`."""
    width = _size_class(sizes)
    return int(width.max()) <= _DENSE_MAX_GROUP and int((width * width).sum()) <= _DENSE_PHASE_ELEMENTS


def _phases_all_dense(constraints: Tensor) -> bool:
    """Whether every phase of a build under ``constraints [C, K]`` merges small groups only
    (:func:`_dense_phase`): the leaves of each finest label, the finer labels inside each
    coarser one, and the coarsest labels in the free phase."""
    if constraints.shape[0] == 0:
        return False
    labels = [torch.unique(row, return_inverse=True)[1] for row in constraints]
    if not _dense_fits(torch.bincount(labels[-1])):
        return False
    for coarse, fine in zip([torch.zeros_like(labels[0]), *labels[:-1]], labels):
        span = int(fine.max()) + 1
        pairs = torch.unique(coarse * span + fine)  # (coarser label, finer label) pairs
        if not _dense_fits(torch.bincount(pairs // span)):
            return False
    return True


def _concurrent_phases(state: MergeState, constraints: Tensor, bar: Any) -> None:
    """Every phase of a constrained build at once, when all groups are small.

    A cell's root has the cell's total weight and weighted centroid however the
    cell is merged inside, so the groups of every phase are known before any
    merge: the leaves of each finest cell, the cells of each row inside each
    cell of the next coarser row, the coarsest cells under the root. Their
    merges run in the same dense rounds (:func:`_dense_rounds`), then are
    recorded phase by phase, finest first, so parents get larger ids than their
    children. The tree is the one phase after phase would build.
    """
    num_codes, rows = state.num_codes, constraints.shape[0]
    leaf_w, leaf_mu = state.weight[:num_codes], state.mu[:num_codes]
    _, cells = torch.unique(constraints[-1], return_inverse=True)
    mus, weights, groups, sizes = [leaf_mu], [leaf_w], [cells], [num_codes]
    for phase in range(1, rows + 1):  # items: the cells of row rows - phase
        count = int(cells.max()) + 1
        w = torch.zeros(count, dtype=leaf_w.dtype, device=leaf_w.device).index_add_(0, cells, leaf_w)
        mu = torch.zeros(count, leaf_mu.shape[1], dtype=leaf_mu.dtype, device=leaf_mu.device)
        mu = mu.index_add_(0, cells, leaf_w[:, None] * leaf_mu) / w[:, None]
        row = rows - phase
        coarser = torch.unique(constraints[row - 1], return_inverse=True)[1] if row > 0 else torch.zeros_like(cells)
        groups.append(torch.zeros(count, dtype=torch.long, device=cells.device).scatter_(0, cells, coarser))
        mus.append(mu)
        weights.append(w)
        sizes.append(count)
        cells = coarser
    offsets = torch.tensor([0, *sizes], device=cells.device).cumsum(0)
    group_offsets = [0]
    for g in groups[:-1]:
        group_offsets.append(group_offsets[-1] + int(g.max()) + 1)
    group = torch.cat([g + o for g, o in zip(groups, group_offsets)])
    mu, w = torch.cat(mus), torch.cat(weights)
    link = torch.arange(group.numel(), device=group.device)
    log: list[tuple[Tensor, Tensor, Tensor]] = []

    def merge(ids: Tensor) -> int:
        log.append(_merge_pairs(ids, mu, w, link, state.linkage == "ward", 1))
        return 0

    _, compact, counts = torch.unique(group, return_inverse=True, return_counts=True)
    _dense_rounds(_group_tables(torch.arange(group.numel(), device=group.device), compact, counts), 1, merge)
    _replay_phases(state, log, link, offsets, groups, bar)


def _replay_phases(
    state: MergeState, log: list[tuple[Tensor, Tensor, Tensor]], link: Tensor, offsets: Tensor, groups: list[Tensor],
    bar: Any,
) -> None:
    """Record the merges of :func:`_concurrent_phases`: ``log`` (per round, item pairs and
    costs), ``link`` (the item each one merged into), ``offsets`` (first item of each phase),
    ``groups`` (per phase, the group of each of its items; group j holds item j of the next)."""
    rows = len(groups) - 1
    link = _merged_into(link)
    node = torch.full_like(link, -1)
    node[: state.num_codes] = torch.arange(state.num_codes, device=link.device)
    bounds = offsets.tolist()
    for phase in range(rows + 1):
        first, last = bounds[phase], bounds[phase + 1]
        if phase:  # a cell item is the root its group of the phase before merged into
            roots = torch.zeros(last - first, dtype=torch.long, device=link.device)
            roots.scatter_(0, groups[phase - 1], link[bounds[phase - 1] : first])
            node[first:last] = node[roots]
        for a, b, cost in log:
            mine = (a >= first) & (a < last)
            if not bool(mine.any()):
                continue
            a_nodes, b_nodes = node[a[mine]], node[b[mine]]
            state.nn_cost[a_nodes] = cost[mine]
            node[a[mine]] = _record_merges(state, a_nodes, b_nodes, rows - phase)
            if bar is not None:
                bar.update(int(mine.sum()))


def _small_groups(state: MergeState, active: Tensor) -> list[Tensor] | None:
    """The active nodes as padded id tables (:func:`_group_tables`) when their groups
    (labels) are small (see ``_DENSE_MAX_GROUP``); else None."""
    if state.label is None:
        group, sizes = torch.zeros_like(active), active.new_tensor([active.numel()])
    else:
        _, group, sizes = torch.unique(state.label[active], return_inverse=True, return_counts=True)
    if not _dense_fits(sizes):
        return None
    return _group_tables(active, group, sizes)


def _group_tables(items: Tensor, group: Tensor, sizes: Tensor) -> list[Tensor]:
    """``items [n]`` as padded ``[G, S]`` tables of their groups (``group [n]`` compact,
    ``sizes [G]``), ``-1``-padded: one table for all when small, else one per size class
    (sizes in ``(S/2, S]``, at most log2 n tables)."""
    width = _size_class(sizes)
    widest = int(width.max())
    if sizes.numel() * widest * widest <= _DENSE_ONE_TABLE:
        width = torch.full_like(width, widest)
    order = torch.argsort(group, stable=True)
    slot = torch.empty_like(order)
    slot[order] = rank_in_runs(group[order])
    tables = []
    for size in torch.unique(width).tolist():
        in_class = width == size
        row = torch.cumsum(in_class.long(), 0) - 1
        table = torch.full((int(in_class.sum()), size), -1, dtype=torch.long, device=items.device)
        mine = in_class[group]
        table[row[group[mine]], slot[mine]] = items[mine]
        tables.append(table)
    return tables


def _dense_phase(state: MergeState, level: int, tables: list[Tensor], max_roots: int, bar: Any) -> None:
    """:func:`_merge_phase` for small groups: each round, every group's pair costs in one
    padded matrix (no candidate lists); all mutually-nearest pairs merge, at most down to
    ``max_roots`` roots per group. ``tables``: from :func:`_small_groups`; a group leaves
    its table once it is done."""

    def merge(ids: Tensor) -> int:
        safe = ids.clamp_min(0)
        g, s, t, cost = _mutual_pairs(ids, state.mu[safe], state.weight[safe], state.linkage == "ward", max_roots)
        a, b = ids[g, s], ids[g, t]
        state.nn_cost[a] = cost
        ids[g, s] = _record_merges(state, a, b, level)
        ids[g, t] = -1
        return a.numel()

    _dense_rounds(tables, max_roots, merge, bar)


def _dense_rounds(tables: list[Tensor], max_roots: int, merge: Any, bar: Any = None) -> None:
    """Call ``merge(ids) -> merges`` on every table of groups that still have more than
    ``max_roots`` roots, round after round; ``merge`` updates ``ids [G, S]`` in place."""
    tables = [ids[(ids >= 0).sum(1) > max_roots] for ids in tables]
    tables = [ids for ids in tables if ids.shape[0]]
    while tables:
        merged, still = 0, []
        for ids in tables:
            merged += merge(ids)
            ids = ids[(ids >= 0).sum(1) > max_roots]
            if ids.shape[0]:
                still.append(ids)
        tables = still
        if bar is not None:
            bar.update(merged)


def _mutual_pairs(ids: Tensor, x: Tensor, w: Tensor, ward: bool, max_roots: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The pairs one dense round merges in groups ``ids [G, S]`` (-1 pads; every group has
    more than ``max_roots`` roots), from their centroids ``x [G, S, D]`` and weights ``w [G, S]``:
    all mutually-nearest pairs, per group at most the cheapest ``roots - max_roots``
    (a group with none, from float ties, merges its cheapest pair).

    Returns ``(g, s, t, cost)``: group, the two slots and the linkage cost of each pair.
    """
    alive = ids >= 0
    sq = x.pow(2).sum(-1)
    cost = torch.baddbmm(sq[:, :, None] + sq[:, None, :], x, x.transpose(1, 2), alpha=-2.0).clamp_(min=0.0)
    if ward:
        cost.div_(1.0 / w[:, :, None] + 1.0 / w[:, None, :])
    cols = torch.arange(ids.shape[1], device=ids.device)
    pair_ok = alive[:, :, None] & alive[:, None, :]
    pair_ok[:, cols, cols] = False
    cost.masked_fill_(~pair_ok, math.inf)
    best, nn = cost.min(2)
    mutual = (nn.gather(1, nn) == cols) & (cols < nn) & torch.isfinite(best)
    room = alive.sum(1) - max_roots
    take = mutual
    # a group has at most roots / 2 mutual pairs: only with max_roots > 1 can the room run out
    if max_roots > 1 and bool((mutual.sum(1) > room).any()):
        rank = torch.where(mutual, best, math.inf).argsort(1).argsort(1)
        take = mutual & (rank < room[:, None])
    stuck = ~take.any(1)
    if bool(stuck.any()):
        take[stuck.nonzero().squeeze(1), best[stuck].argmin(1)] = True
    g, s = take.nonzero(as_tuple=True)
    return g, s, nn[g, s], best[g, s]


def _dense_clusters(points: Tensor, counts: Tensor, group: Tensor, sizes: Tensor, max_clusters: int) -> Tensor:
    """:func:`ward_clusters` for small labels (``group [n]`` compact, ``sizes [G]``): the
    rounds of :func:`_dense_phase`, keeping only centroids and weights (no tree)."""
    n = points.shape[0]
    mu = points - points.mean(0, keepdim=True)
    has_data = counts > 0
    tiny = _EMPTY_WEIGHT * (float(counts[has_data].mean()) if bool(has_data.any()) else 1.0)
    w = torch.where(has_data, counts, torch.full_like(counts, tiny))
    link = torch.arange(n, device=points.device)  # the item each one was merged into

    def merge(ids: Tensor) -> int:
        return _merge_pairs(ids, mu, w, link, True, max_clusters)[0].numel()

    _dense_rounds(_group_tables(torch.arange(n, device=points.device), group, sizes), max_clusters, merge)
    return torch.unique(_merged_into(link), return_inverse=True)[1]


def _merge_pairs(
    ids: Tensor, mu: Tensor, w: Tensor, link: Tensor, ward: bool, max_roots: int
) -> tuple[Tensor, Tensor, Tensor]:
    """One dense round on items, in place: the pairs :func:`_mutual_pairs` picks in groups
    ``ids [G, S]`` merge; the kept item ``a`` takes the pair's centroid (``mu [n, D]``) and
    weight (``w [n]``), ``link[b] = a``, and ``b`` leaves ``ids``. Returns ``(a, b, cost)``."""
    safe = ids.clamp_min(0)
    g, s, t, cost = _mutual_pairs(ids, mu[safe], w[safe], ward, max_roots)
    a, b = ids[g, s], ids[g, t]
    wa, wb = w[a], w[b]
    mu[a] = (wa[:, None] * mu[a] + wb[:, None] * mu[b]) / (wa + wb)[:, None]
    w[a] = wa + wb
    link[b] = a
    ids[g, t] = -1
    return a, b, cost


def _merged_into(link: Tensor) -> Tensor:
    """``[n]`` the item each one finally merged into, from ``link [n]`` (the item it merged into, itself if none)."""
    self_linked = link == torch.arange(link.numel(), device=link.device)
    return scan_to_marked(torch.where(self_linked, -1, link), self_linked)[0]


def _merge_round(state: MergeState, level: int, max_roots: int = 1) -> int:
    """Merge every mutually-nearest pair at once (with ``max_roots > 1``, only the
    cheapest pairs that leave a label at least ``max_roots`` roots), then update
    the candidate lists.

    Returns the number of merges (0: no two roots may merge in this phase).
    """
    active = state.active()
    partner = state.nn[active]
    eligible = torch.isfinite(state.nn_cost[active])
    if max_roots > 1:
        eligible &= _label_has_room(state, active, max_roots)
    mutual = (state.nn[partner] == active) & (active < partner) & eligible
    a = active[mutual]
    if max_roots > 1 and a.numel():
        a = _cheapest_within_room(state, active, a, max_roots)
    if a.numel() == 0:  # float ties / rounding: merge the globally cheapest pair
        i = torch.where(eligible, state.nn_cost[active], math.inf).argmin()
        if not bool(eligible[i]):
            return 0
        a = active[i].reshape(1)
    b = state.nn[a]
    new = _record_merges(state, a, b, level)
    if state.done:
        return a.numel()
    active = state.active()
    if state.linkage != "ward":
        _refresh(state, active, active)
        return a.numel()
    state.remap[a] = new
    state.remap[b] = new
    _update_survivors(state, state.next_id - a.numel(), active)
    _inherit_candidates(state, a, b, new, active)
    return a.numel()


def _label_groups(state: MergeState, active: Tensor) -> tuple[Tensor, Tensor]:
    """``(group [m] int64, roots [G] int64)``: label group of each active node and roots per group."""
    if state.label is None:
        return torch.zeros_like(active), active.new_tensor([active.numel()])
    _, group, roots = torch.unique(state.label[active], return_inverse=True, return_counts=True)
    return group, roots


def _label_has_room(state: MergeState, active: Tensor, max_roots: int) -> Tensor:
    """``[m]`` bool: the active node's label still has more than ``max_roots`` roots."""
    group, roots = _label_groups(state, active)
    return roots[group] > max_roots


def _cheapest_within_room(state: MergeState, active: Tensor, a: Tensor, max_roots: int) -> Tensor:
    """The pairs ``a [P]`` (first nodes of mutually-nearest pairs) to merge now: per label,
    the cheapest ``roots - max_roots`` of them. Returns them ascending."""
    group, roots = _label_groups(state, active)
    g = group[torch.searchsorted(active, a)]
    order = torch.argsort(state.nn_cost[a], stable=True)
    order = order[torch.argsort(g[order], stable=True)]
    g_sorted = g[order]
    rank = rank_in_runs(g_sorted)
    keep = order[rank < (roots - max_roots)[g_sorted]]
    return a[keep.sort().values]


def _record_merges(state: MergeState, a: Tensor, b: Tensor, level: int) -> Tensor:
    """Merge node pairs ``(a[i], b[i])`` into new nodes; returns their ``[P]`` ids."""
    num_codes, num_pairs = state.num_codes, a.numel()
    new = torch.arange(state.next_id, state.next_id + num_pairs, device=a.device)
    state.next_id += num_pairs
    state.node_level[new] = level
    state.some_leaf[new] = state.some_leaf[a]
    if state.label is not None:
        state.label[new] = state.label[a]
    state.parent[a] = new
    state.parent[b] = new
    state.children[new - num_codes] = torch.stack([a, b], dim=1)
    state.merge_cost[new - num_codes] = state.nn_cost[a]
    state.size[new] = state.size[a] + state.size[b]
    state.count[new] = state.count[a] + state.count[b]
    state.data_sum[new] = state.data_sum[a] + state.data_sum[b]
    weight, mu = state.weight, state.mu
    w = weight[a] + weight[b]
    weight[new] = w
    mu[new] = (weight[a, None] * mu[a] + weight[b, None] * mu[b]) / w[:, None]
    state.sqnorm[new] = mu[new].pow(2).sum(-1)
    state.alive[a] = False
    state.alive[b] = False
    state.alive[new] = True
    return new


def _update_survivors(state: MergeState, first_new: int, active: Tensor) -> None:
    """Point the lists of the older roots at the new nodes; re-find the nearest
    neighbour of those whose nearest merged away (list first, full scan if unproven)."""
    old = active[active < first_new]
    before = state.cand[old]
    after = state.remap[before]
    state.cand[old] = after
    state.cand_cost[old] = torch.where(after != before, math.nan, state.cand_cost[old])
    # reducibility: a node whose neighbour survived keeps it
    stale = old[~state.alive[state.nn[old]]]
    if stale.numel() == 0:
        return
    c = state.cand[stale]
    cost = _fill_costs(state, stale, c, state.cand_cost[stale])
    state.cand_cost[stale] = cost
    best, j = cost.min(dim=1)
    proven = best <= state.bound[stale]
    state.nn[stale[proven]] = c[proven, j[proven]]
    state.nn_cost[stale[proven]] = best[proven]
    unproven = stale[~proven]
    if unproven.numel():
        _refresh(state, unproven, active)


def _inherit_candidates(state: MergeState, a: Tensor, b: Tensor, new: Tensor, active: Tensor) -> None:
    """Give each new node the merged lists of its children ``a, b``.

    Any node outside both lists costs at least ``min(bound[a], bound[b])`` to
    either child, hence (reducibility) at least that much to the merged node.
    """
    k, sentinel = state.cand.shape[1], state.sentinel
    inherited = state.remap[torch.cat([state.cand[a], state.cand[b]], dim=1)]
    inherited[inherited == new[:, None]] = sentinel
    inherited = inherited.sort(dim=1).values
    inherited[:, 1:][inherited[:, 1:] == inherited[:, :-1]] = sentinel
    unknown = torch.full(inherited.shape, math.nan, dtype=state.mu.dtype, device=new.device)
    cost = _fill_costs(state, new, inherited, unknown)
    cost, j = torch.topk(cost, k, dim=1, largest=False, sorted=True)
    state.cand[new] = torch.where(torch.isfinite(cost), inherited.gather(1, j), sentinel)
    state.cand_cost[new] = cost
    lower = torch.minimum(state.bound[a], state.bound[b])
    # entries dropped by the top-k cost at least the k-th kept one
    state.bound[new] = torch.where(torch.isfinite(cost[:, -1]), torch.minimum(lower, cost[:, -1]), lower)
    state.nn[new], state.nn_cost[new] = state.cand[new, 0], cost[:, 0]
    unproven = new[~(cost[:, 0] <= state.bound[new])]
    if unproven.numel():
        _refresh(state, unproven, active)


def _merge_duplicate_roots(state: MergeState, constraints: Tensor) -> int:
    """Merge the roots with identical centroids (and finest label of ``constraints [C, K]``) first, at zero cost.

    Identical points are each other's nearest neighbours at cost 0, all tied: a
    round of mutually-nearest pairs merges one pair per group of duplicates, so
    a group of ``n`` (e.g. dead codes a learner reset to the same vector) would
    take ``n`` rounds. Here every group merges in pairs, ``ceil(log2 n)``
    batched rounds. The merges cost 0 under any linkage, so the tree above them
    is the one the rounds would build. Under Ward linkage codes without data are
    left to :func:`_absorb_empty_codes`. Returns the number of merges.
    """
    nodes = state.active()
    if state.linkage == "ward":
        nodes = nodes[state.count[nodes] > 0]
    if nodes.numel() < 2:
        return 0
    mu = state.mu[nodes]
    # identical rows have equal keys, so they sit side by side in key order (rows with equal keys
    # that differ may interleave and split a group: fewer merges here, never a wrong one)
    order = torch.argsort((mu * torch.linspace(1.0, 2.0, mu.shape[1], dtype=mu.dtype, device=mu.device)).sum(1))
    same = (mu[order[1:]] == mu[order[:-1]]).all(1)
    if not bool(same.any()):
        return 0
    group = torch.empty_like(order)
    group[order] = torch.cat([same.new_zeros(1, dtype=torch.long), (~same).long().cumsum(0)])
    if constraints.shape[0]:  # and the same finest label (labels compacted: any int64 values)
        fine = torch.unique(constraints[-1], return_inverse=True)[1][state.some_leaf[nodes]]
        _, group = torch.unique(group * (int(fine.max()) + 1) + fine, return_inverse=True)
    order = torch.argsort(group, stable=True)  # groups stay contiguous round after round
    nodes, group = nodes[order], group[order]
    merged = 0
    while True:
        rank = rank_in_runs(group)
        first = torch.zeros_like(rank, dtype=torch.bool)
        first[:-1] = (group[1:] == group[:-1]) & (rank[:-1] % 2 == 0)  # pairs (rank 2i, 2i + 1) in each group
        if not bool(first.any()):
            return merged
        i = first.nonzero().squeeze(1)
        a, b = nodes[i], nodes[i + 1]
        state.nn_cost[a] = 0.0
        nodes[i] = _record_merges(state, a, b, constraints.shape[0])  # the pair's new node takes its place
        merged += a.numel()
        keep = torch.ones_like(first)
        keep[i + 1] = False
        nodes, group = nodes[keep], group[keep]


def _absorb_empty_codes(state: MergeState, constraints: Tensor) -> int:
    """Merge every code without data into its nearest code with data, first.

    A code no vector uses would be the cheapest Ward partner of everything
    (its weight is ~0) and make every candidate list useless. It carries no
    data, so where it joins changes no distortion: each one is chained onto its
    nearest root with data (a code, or a group of identical codes merged by
    :func:`_merge_duplicate_roots`; same finest label of ``constraints [C, K]``)
    at ~zero cost, before the regular merging. Returns the number of merges.
    """
    num_codes = state.num_codes
    mu, sqnorm = state.mu, state.sqnorm
    empty = (state.count[:num_codes] <= 0).nonzero().squeeze(1)
    full = (state.alive[: state.num_nodes] & (state.count > 0)).nonzero().squeeze(1)  # roots with data
    if empty.numel() == 0 or full.numel() == 0:
        return 0
    target = torch.empty_like(empty)
    best = torch.empty(empty.shape, dtype=mu.dtype, device=mu.device)
    step = max(_MIN_BLOCK_ROWS, state.block_elements // full.numel())
    fine = constraints[-1] if constraints.shape[0] else None
    for start in range(0, empty.numel(), step):
        e = empty[start : start + step]
        d = (sqnorm[e, None] + sqnorm[full][None, :]) - 2.0 * (mu[e] @ mu[full].T)
        if fine is not None:
            d.masked_fill_(fine[e][:, None] != fine[state.some_leaf[full]][None, :], math.inf)
        best[start : start + step], j = d.min(dim=1)
        target[start : start + step] = full[j]
    keep = torch.isfinite(best)  # an empty code alone in its constraint cell stays for later
    empty, target, best = empty[keep], target[keep], best[keep].clamp_min(0.0)
    if empty.numel() == 0:
        return 0
    order = torch.argsort(target * num_codes + empty)
    _chain_empty_codes(state, empty[order], target[order], best[order], constraints.shape[0])
    return empty.numel()


def _chain_empty_codes(state: MergeState, empty: Tensor, target: Tensor, dist: Tensor, level: int) -> None:
    """Chain ``empty [E]`` codes (sorted by ``target [E]``) onto their target root,
    one merge each: ``((target + e1) + e2) + ...``; ``dist [E]`` squared distances."""
    num_codes, weight = state.num_codes, state.weight
    new = state.next_id + torch.arange(empty.numel(), device=empty.device)
    state.next_id += empty.numel()
    first = torch.ones_like(empty, dtype=torch.bool)
    first[1:] = target[1:] != target[:-1]
    previous = torch.where(first, target, new - 1)  # chain: code, then one merge per empty code
    rank = rank_in_runs(target)
    state.parent[empty] = new
    state.parent[previous] = new
    state.children[new - num_codes] = torch.stack([previous, empty], dim=1)
    w_t, w_e = weight[target] + rank * weight[empty], weight[empty]
    state.merge_cost[new - num_codes] = w_t * w_e / (w_t + w_e) * dist
    state.size[new] = state.size[target] + rank + 1
    state.count[new] = state.count[target]
    state.data_sum[new] = state.data_sum[target]
    weight[new] = w_t + w_e
    state.mu[new] = state.mu[target]
    state.sqnorm[new] = state.sqnorm[target]
    state.node_level[new] = level
    state.some_leaf[new] = state.some_leaf[target]
    state.alive[empty] = False
    state.alive[previous] = False
    state.alive[new] = True
    last = torch.ones_like(first)
    last[:-1] = first[1:]
    state.alive[new[~last]] = False  # only the top of each chain stays


def _finish(state: MergeState, codebook: Tensor) -> Hierarchy:
    """The :class:`Hierarchy` of a finished build: leaves hold the codewords,
    internal nodes their data mean (or, without data, the weighted mean of their codewords)."""
    num_codes, num_nodes = state.num_codes, state.num_nodes
    internal = state.count[num_codes:]
    center = torch.empty(num_nodes, codebook.shape[1], dtype=codebook.dtype, device=codebook.device)
    center[:num_codes] = codebook
    if num_codes > 1:
        fallback = state.mu[num_codes:num_nodes] + state.offset
        center[num_codes:] = torch.where(
            (internal > 0)[:, None], state.data_sum[num_codes:] / internal.clamp_min(1e-30)[:, None], fallback
        )
    return Hierarchy(
        parent=state.parent, children=state.children, size=state.size, count=state.count, center=center,
        merge_cost=state.merge_cost,
    )


def _check_stat(t: Tensor, shape: tuple[int, ...], name: str, codebook: Tensor) -> Tensor:
    if not torch.is_tensor(t):
        raise ValueError(f"{name} must be a tensor")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if not t.is_floating_point():
        t = t.to(codebook.dtype)
    check_finite(t, name)
    return t.to(device=codebook.device, dtype=codebook.dtype)
