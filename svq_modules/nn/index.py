"""``ScalableIndex``: the structure half of :class:`~svq_modules.nn.ScalableVQ`.

It holds the merge tree (:class:`~svq_modules.hierarchy.Hierarchy`) and the
layer tables (:class:`~svq_modules.layers.LayerTables`) in registered buffers
of fixed shape (``M = 2K-1`` nodes, ``L`` layers), builds them from
``(codebook, counts, sums)`` and maps codeword indices to per-layer codes and
reconstructions. It learns nothing (see :mod:`svq_modules.nn.codebook`) and
writes no bytes (see :mod:`svq_modules.coding`): like the CDF tables of
CompressAI's entropy models, it is the model both ends of a stream must share.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .. import distributed as svq_dist
from ..hierarchy import LINKAGES, Hierarchy
from ..layers import (
    CUTS,
    LayerRates,
    LayerTables,
    decode_codes,
    encode_indices,
    layer_rates,
    node_log2_prob,
    reconstruct,
)
from ..nearest import layered_codebook
from ..nested import build_scalable
from ..validation import BitProposal, check_bit_proposal, check_bool, check_choice, check_int, check_layer_weights

__all__ = ["ScalableIndex", "TREE_FIELDS", "LAYER_FIELDS"]

# buffers mirroring Hierarchy / LayerTables fields: name -> (shape symbols, integer?)
TREE_FIELDS: dict[str, tuple[tuple[str, ...], bool]] = {
    "parent": (("M",), True),
    "children": (("K-1", "2"), True),
    "size": (("M",), True),
    "count": (("M",), False),
    "center": (("M", "D"), False),
    "merge_cost": (("K-1",), False),
}
LAYER_FIELDS: dict[str, tuple[tuple[str, ...], bool]] = {
    "widths": (("L",), True),
    "leaf_node": (("L", "K"), True),
    "leaf_symbol": (("L", "K"), True),
    "group_start": (("L", "M"), True),
    "group_size": (("L", "M"), True),
    "members": (("L", "K"), True),
}
_TREE_PREFIX = "tree_"
_LAYER_PREFIX = "layers_"


class ScalableIndex(nn.Module):
    """Merge tree + layer tables of a codebook, in fixed-shape buffers.

    Args:
        num_codes: K, number of codewords (leaves).
        dim: D, dimension of the codewords.
        bits: bit proposal, checked by
            :func:`~svq_modules.validation.check_bit_proposal`: a list of ints
            (base layer first; a final layer reaching every leaf is added), an
            int, a proposal name or a callable (those three need ``num_layers``).
        num_layers: L, total layers including the final one (int >= 2).
        linkage: one of :data:`~svq_modules.hierarchy.LINKAGES`.
        cut: one of :data:`~svq_modules.layers.CUTS`: "nested" (default: Lloyd-optimised nested
            cells, :mod:`svq_modules.nested`), "greedy" or "depth" (cuts of the plain Ward tree).
        refine: Lloyd-refine each layer inside its parent cell
            (:func:`~svq_modules.refine.build_refined`).
        block_size: distance block elements of :func:`build_hierarchy` (None = its default).

    State (``state_dict``): ``built_version`` (int64 scalar: the codebook
    version the tables were built for, -1 = never built), one buffer per field
    of :class:`Hierarchy` (``tree_parent [M]``, ``tree_children [K-1, 2]``,
    ``tree_size [M]``, ``tree_count [M]``, ``tree_center [M, D]``,
    ``tree_merge_cost [K-1]``) and of :class:`LayerTables` (``layers_widths
    [L]``, ``layers_leaf_node / layers_leaf_symbol / layers_members [L, K]``,
    ``layers_group_start / layers_group_size [L, M]``). Integer buffers are
    int64 and stay so under ``.double()``; float ones follow the module dtype.
    """

    built_version: Tensor

    def __init__(
        self,
        num_codes: int,
        dim: int,
        bits: BitProposal = (4, 2, 2, 2, 2),
        num_layers: int | None = None,
        *,
        linkage: str = "ward",
        cut: str = "nested",
        refine: bool = False,
        block_size: int | None = None,
    ) -> None:
        super().__init__()
        self.num_codes = check_int(num_codes, "codebook_size", min=1)
        self.dim = check_int(dim, "dim", min=1)
        self.bits, num_layers = check_bit_proposal(bits, num_layers, need_num_layers=True)
        self._num_layers = int(num_layers)
        self.linkage = check_choice(linkage, "linkage", LINKAGES)
        self.cut = check_choice(cut, "cut", CUTS)
        self.refine = check_bool(refine, "refine")
        self.block_size = None if block_size is None else check_int(block_size, "block_size", min=1)
        k, m = self.num_codes, 2 * self.num_codes - 1
        sizes = {"M": m, "K": k, "K-1": k - 1, "D": self.dim, "L": self._num_layers, "2": 2}
        self.register_buffer("built_version", torch.tensor(-1, dtype=torch.long))
        for prefix, spec in ((_TREE_PREFIX, TREE_FIELDS), (_LAYER_PREFIX, LAYER_FIELDS)):
            for name, (shape, integer) in spec.items():
                size = tuple(sizes[s] for s in shape)
                self.register_buffer(prefix + name, torch.full(size, -1, dtype=torch.long) if integer else torch.zeros(size))
        self._built = False  # Python mirror of `built_version >= 0`: no device sync per call
        self.stale_warned = False  # the owner's "tables are stale" warning was shown for this build

    @property
    def num_layers(self) -> int:
        """L, total number of layers (the last one reaches every codeword)."""
        return self._num_layers

    @property
    def num_nodes(self) -> int:
        """M = 2K - 1, number of tree nodes."""
        return 2 * self.num_codes - 1

    def extra_repr(self) -> str:
        return (
            f"num_codes={self.num_codes}, dim={self.dim}, bits={self.bits!r}, num_layers={self.num_layers}, "
            f"linkage={self.linkage!r}, cut={self.cut!r}, refine={self.refine}"
        )

    # ------------------------------------------------------------------ state
    @property
    def is_built(self) -> bool:
        """True once :meth:`build` filled the buffers (also after loading built ones)."""
        return int(self.built_version) >= 0

    def is_stale(self, codebook: Tensor, version: Tensor | int) -> bool:
        """True when built and ``codebook [K, D]`` (at ``version``) is not what the tables were built for.

        Detected by the version counter and by comparing the tree's leaves with
        the codebook (catches changes that bypass the counter, e.g. optimizer steps).
        """
        if not self.is_built:
            return False
        if int(version) != int(self.built_version):
            return True
        leaves = self.tree_center[: self.num_codes]
        return not torch.equal(leaves, codebook.detach().to(leaves.dtype))

    @torch.compiler.disable
    def require_built(self) -> None:
        """Raise ``RuntimeError`` unless the tables were built (runs eagerly under ``torch.compile``)."""
        if not self._built:
            raise RuntimeError(
                "ScalableVQ has no hierarchy yet: call update() (after training the codebook, "
                "or load a checkpoint saved after update()) before using layers "
                "(forward(num_layers=...), encode, decode, reconstruct, rates, compress, decompress)"
            )

    @property
    def hierarchy(self) -> Hierarchy:
        """The merge tree as a :class:`Hierarchy` view of the buffers (no copy). Needs :meth:`build`."""
        self.require_built()
        return Hierarchy.from_dict({k: getattr(self, _TREE_PREFIX + k) for k in TREE_FIELDS})

    @property
    def tables(self) -> LayerTables:
        """The layer tables as a :class:`LayerTables` view of the buffers (no copy). Needs :meth:`build`."""
        self.require_built()
        return LayerTables.from_dict({k: getattr(self, _LAYER_PREFIX + k) for k in LAYER_FIELDS})

    # ------------------------------------------------------------------ build
    @torch.no_grad()
    def build(
        self, codebook: Tensor, counts: Tensor, sums: Tensor, version: Tensor | int, *, progress: bool = False,
        sync: bool = False,
    ) -> None:
        """Build tree and tables from ``codebook [K, D]``, ``counts [K]``, ``sums [K, D]`` into the buffers.

        Runs on the buffers' device; marks the tables as built for codebook
        ``version``. With ``sync`` (every rank must call it) the built buffers
        are broadcast from rank 0, so all ranks hold identical tables.
        """
        num_layers = None if isinstance(self.bits, list) else self.num_layers
        hierarchy, tables = build_scalable(
            codebook, counts, sums, self.bits, num_layers=num_layers, cut=self.cut, refine=self.refine,
            linkage=self.linkage, block_size=self.block_size, progress=progress,
        )
        if tables.num_layers != self.num_layers:
            raise RuntimeError(f"build_layers returned {tables.num_layers} layers, expected {self.num_layers}")
        pairs = []  # every field checked before any buffer changes
        for prefix, spec, src in ((_TREE_PREFIX, TREE_FIELDS, hierarchy), (_LAYER_PREFIX, LAYER_FIELDS, tables)):
            values = src.as_dict()
            if set(values) != set(spec):
                raise RuntimeError(f"core returned fields {sorted(values)}, the module stores {sorted(spec)}")
            for name, value in values.items():
                buf = getattr(self, prefix + name)
                if buf.shape != value.shape:
                    raise RuntimeError(f"{prefix + name}: built shape {list(value.shape)} != buffer shape {list(buf.shape)}")
                if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                    raise RuntimeError(f"the built tree has non-finite {prefix + name} (counts or distances beyond "
                                       f"{value.dtype}): rescale the data or its counts")
                value = value.to(buf.dtype)
                if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                    raise RuntimeError(
                        f"the quantizer's {buf.dtype} buffers cannot hold its tree ({prefix + name} overflows, e.g. "
                        f"data counts above {torch.finfo(buf.dtype).max:g}); keep the quantizer in float32 "
                        f"(vq.float()) to build it"
                    )
                pairs.append((buf, value))
        targets = []
        for buf, value in pairs:
            buf.copy_(value)
            targets.append(buf)
        if sync:
            svq_dist.broadcast_tensors_(targets)
        self.built_version.fill_(int(version))
        self._built = True
        self.stale_warned = False

    # ------------------------------------------------------------- use (flat)
    def layer_centers(self, num_layers: int) -> Tensor:
        """``[K, D]`` reconstruction of every codeword after ``num_layers`` (1..L) layers."""
        return self.tree_center[self.layers_leaf_node[num_layers - 1]]

    @torch.no_grad()
    def layered_codebook(self, layer_weights: Sequence[float]) -> tuple[Tensor, Tensor]:
        """``(codebook [K, D], bias [K])`` float64: ``||x - codebook_k||^2 + bias_k = sum_l w_l ||x - c_{l,k}||^2``, codeword
        ``k``'s error after each layer (``c_{l,k}``: :meth:`layer_centers` of ``l + 1`` layers; ``l = L - 1``: the codeword)
        weighted by ``layer_weights`` (``L`` numbers >= 0, not all 0, normalised to sum 1;
        :func:`~svq_modules.nearest.layered_codebook`). Needs a build."""
        weights = check_layer_weights(layer_weights, self.num_layers)
        self.require_built()
        centers = torch.stack([self.layer_centers(n) for n in range(1, self.num_layers + 1)]).double()
        return layered_codebook(centers, torch.tensor(weights, dtype=torch.float64, device=centers.device))

    def encode(self, indices: Tensor) -> Tensor:
        """``[L, N]`` int64 per-layer symbols (-1 = nothing sent) of codeword ``indices [N]``."""
        return encode_indices(self.tables, indices)

    def decode(self, codes: Tensor) -> Tensor:
        """``[N, D]`` reconstruction after the ``l`` layers of ``codes [l, N]`` (raises ValueError on invalid codes)."""
        nodes = decode_codes(self.tables, codes)
        return self.tree_center[nodes[-1]]

    def reconstruct(self, indices: Tensor, num_layers: int) -> Tensor:
        """``[N, D]`` reconstruction of codeword ``indices [N]`` after ``num_layers`` layers."""
        return reconstruct(self.hierarchy, self.tables, indices, num_layers)

    def rates(self, indices: Tensor | None = None) -> LayerRates:
        """Cumulative raw and ideal entropy-coded bits per vector after each layer (see :func:`layer_rates`)."""
        return layer_rates(self.hierarchy, self.tables, indices)

    def code_lengths(self) -> Tensor:
        """``[K]`` float64 bits each codeword costs at full depth under the model's probabilities (the entropy
        coder's static model: ``-log2 P(leaf)``, :func:`~svq_modules.layers.node_log2_prob`)."""
        self.require_built()
        return -node_log2_prob(self.hierarchy)[: self.num_codes]

    # ------------------------------------------------------------- checkpoints
    def _check_loaded_layers(self, state_dict: dict[str, Any], prefix: str) -> None:
        """One-line RuntimeError when stored tables do not fit this module's layer count or bit list."""
        widths = state_dict.get(prefix + _LAYER_PREFIX + "widths")
        if widths is None:
            return
        if tuple(widths.shape) != (self.num_layers,):
            raise RuntimeError(
                f"cannot load ScalableVQ checkpoint: it has {widths.shape[0] if widths.dim() else '?'} layers "
                f"(layers_widths shape {list(widths.shape)}) but this module has {self.num_layers} "
                f"(shape {[self.num_layers]}); construct it with the same bits/num_layers"
            )
        version = state_dict.get(prefix + "built_version")
        built = bool(int(widths.min()) >= 0) if version is None else int(version) >= 0
        if built and isinstance(self.bits, list):
            theirs = [int(w) for w in widths[:-1].tolist()]
            if theirs != self.bits:
                raise RuntimeError(
                    f"cannot load ScalableVQ checkpoint: its layer tables were built for bits={theirs} "
                    f"but this module has bits={self.bits}; construct it with bits={theirs}"
                )

    def _check_loaded_tables(self) -> None:
        """One-line RuntimeError when loaded tables do not take every codeword to itself: each codeword's
        per-layer codes (:func:`~svq_modules.layers.encode_indices`) must decode back to its nodes."""
        tables = self.tables
        leaves = torch.arange(tables.num_leaves, device=tables.leaf_node.device)
        try:
            nodes = decode_codes(tables, encode_indices(tables, leaves))
            ok = bool(torch.equal(nodes, tables.leaf_node)) and bool(torch.equal(nodes[-1], leaves))
        except (IndexError, ValueError, RuntimeError):
            ok = False
        if not ok:
            raise RuntimeError("cannot load ScalableVQ checkpoint: its layer tables are corrupt (the codes of the "
                               "codewords do not decode back to them)")

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        self._check_loaded_layers(state_dict, prefix)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self._built = self.is_built
        if self._built:
            self._check_loaded_tables()
        self.stale_warned = False
