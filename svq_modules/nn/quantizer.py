"""``ScalableVQ``: a trainable vector-quantization layer with a progressive (layered) index.

The module is a drop-in VQ layer (EMA k-means codebook, straight-through
gradients, commitment loss, dead-code restart) that also keeps per-code
statistics (count and sum of the vectors assigned to each code) while it
trains.  :meth:`ScalableVQ.update` turns codebook + statistics into a merge
tree (:func:`~svq_modules.hierarchy.build_hierarchy`) and scalable layer tables
(:func:`~svq_modules.layers.build_layers`), computed with torch ops on the
module's device and stored in **registered buffers of fixed shape**
(``M = 2K-1`` tree nodes, ``L`` layers).  Hence ``state_dict`` /
``load_state_dict`` (into a fresh module, built or not), ``torch.save``,
Lightning checkpoints, ``.to(device)``, ``.double()`` and DDP need nothing
special.

Add it to a model::

    vq = ScalableVQ(dim=64, codebook_size=1024, bits=[4, 2, 2, 2, 2])
    out = vq(z)                      # z: [..., 64]; training: EMA codebook update
    loss = recon_loss(decoder(out.quantized), target) + out.loss
    ...
    vq.update()                      # after training (or every few epochs)
    out3 = vq(z, num_layers=3)       # reconstruction after layers 0..2 (4+2+2 bits)
    codes = vq.encode(z)             # [L, ...] per-layer symbols, -1 = nothing sent
    z_hat = vq.decode(codes[:3])     # == out3.quantized (values)

Design notes
------------
* Distances are ``0.5 ||c||^2 - x.c`` from one ``addmm`` per chunk of rows (no
  ``cdist``, no ``||x||^2`` term, no one-hot matrices); per-code counts and sums
  come from ``index_add_`` (O(N D), not O(N K D)).  Peak extra memory is one
  ``[chunk, K]`` block (``chunk_elements``, 8M floats by default).
* The straight-through output is ``q + (x - x.detach())``: its value is exactly
  the codeword (``x - x`` is exactly 0 for finite ``x``), its gradient w.r.t.
  ``x`` is the identity.  So ``forward(x, num_layers=L)`` equals plain
  quantization bit for bit.
* Statistics for the hierarchy are the EMA statistics of the codebook update
  (``cluster_size``, ``embed_sum``); they are also kept up to date when the
  codebook is learned by gradients.  They are all-reduced across ranks every
  training step, so every rank builds the same tree.
* Dead codes (EMA count below ``threshold_ema_dead_code``) are re-seeded with
  vectors of the current batch drawn with probability proportional to their
  squared quantization error (``dead_code_sampling="distortion"``, default) or
  uniformly (``"uniform"``).
* Codes whose removal would cost least are moved to where a new code would
  remove the most error (a k-means swap step with batch estimates,
  ``relocate_codes=True``): EMA k-means alone cannot leave a local minimum with
  two codes in one cluster and one code straddling two clusters.
* ``kmeans_init=True`` seeds with batched k-means++ (``D^2`` sampling in
  ``log2 K`` doubling rounds, no python loop per code) followed by
  ``kmeans_iters`` Lloyd iterations on the first training batch; with
  ``kmeans_init=False`` the codebook is a random sample of the first batch.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed as svq_dist
from ..coding import compress_layers, decompress_layers
from ..hierarchy import LINKAGES, Hierarchy, build_hierarchy, code_statistics
from ..layers import CUTS, PROPOSALS, LayerRates, LayerTables, build_layers, decode_codes, encode_indices, layer_rates
from ..layers import reconstruct as _reconstruct_layers
from ..refine import build_refined
from ..validation import check_bits_list

__all__ = ["ScalableVQ", "VQOutput"]

BitsArg = Sequence[int] | int | str | Callable[[Hierarchy, int], Sequence[int]]

# buffers mirroring Hierarchy / LayerTables fields: name -> (shape symbols, integer?)
_TREE_FIELDS: dict[str, tuple[tuple[str, ...], bool]] = {
    "parent": (("M",), True),
    "children": (("K-1", "2"), True),
    "size": (("M",), True),
    "count": (("M",), False),
    "center": (("M", "D"), False),
    "merge_cost": (("K-1",), False),
}
_LAYER_FIELDS: dict[str, tuple[tuple[str, ...], bool]] = {
    "widths": (("L",), True),
    "leaf_node": (("L", "K"), True),
    "leaf_symbol": (("L", "K"), True),
    "group_start": (("L", "M"), True),
    "group_size": (("L", "M"), True),
    "members": (("L", "K"), True),
}
_TREE_PREFIX = "tree_"
_LAYER_PREFIX = "layers_"


class VQOutput(NamedTuple):
    """Result of :meth:`ScalableVQ.forward`.

    Attributes:
        quantized: same shape and dtype as the input; value = codeword (or the
            layer reconstruction when ``num_layers`` is given), gradient w.r.t.
            the input = identity (straight-through).
        indices: ``[*batch]`` int64 codeword index of every vector (``batch`` =
            input shape without the channel dimension).
        loss: scalar float32, ``commitment_weight * commit_loss + codebook_loss``;
            add it to the model's loss.
        commit_loss: scalar float32, ``mean((x - sg(q))^2)`` (per element).
        codebook_loss: scalar float32, ``mean((sg(x) - q)^2)`` for a
            gradient-learned codebook, 0 otherwise.
        perplexity: scalar float32, ``exp(entropy)`` of the code usage of this batch.
    """

    quantized: Tensor
    indices: Tensor
    loss: Tensor
    commit_loss: Tensor
    codebook_loss: Tensor
    perplexity: Tensor


def _compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - very old torch
        return False


class ScalableVQ(nn.Module):
    """Vector quantizer with an EMA k-means codebook and a scalable (layered) index.

    Args:
        dim: D, dimension of the vectors.
        codebook_size: K, number of codewords.
        bits: bit proposal for the layers. A list/tuple of positive ints (base
            layer first), e.g. ``[4, 2, 2, 2, 2]``, gives ``len(bits) + 1``
            layers (a final layer reaches every codeword). Anything else that
            :func:`~svq_modules.layers.build_layers` accepts (an int, the names
            ``"balanced_clusters"`` / ``"balanced_values"``, a callable
            ``f(hierarchy, num_listed)``) needs ``num_layers``.
        num_layers: L, total number of layers including the final one (required
            unless ``bits`` is a list; must match it when both are given).
        decay: EMA decay of the per-code statistics (and of the codebook).
        eps: Laplace smoothing constant of the EMA cluster sizes.
        commitment_weight: weight of the commitment loss in ``loss``.
        kmeans_init: initialize from the first training batch with k-means
            (batched k-means++ seeding + ``kmeans_iters`` Lloyd steps); if False,
            with a random sample of that batch.
        kmeans_iters: Lloyd iterations of the k-means initialization.
        threshold_ema_dead_code: codes whose EMA count falls below this are
            re-seeded from the current batch (0 disables).
        learnable_codebook: learn the codebook by gradients (an ``nn.Parameter``
            trained by ``codebook_loss``) instead of EMA updates.
        ema_update: update the codebook by EMA (ignored when
            ``learnable_codebook``). False freezes the codebook; statistics are
            still accumulated.
        channel_first: inputs are ``[B, D, *spatial]`` (e.g. image features
            ``[B, D, H, W]``) instead of ``[..., D]``; outputs follow the input layout.
        linkage: linkage of the hierarchy (``"ward"`` or ``"centroid"``).
        cut: layer cut (``"greedy"`` or ``"depth"``).
        refine: Lloyd-refine each layer's partition inside its parent cell
            (see :mod:`svq_modules.refine`): lower distortion per layer, one
            tree build per listed layer in :meth:`update`.
        sync_distributed: all-reduce statistics / broadcast initializations when
            ``torch.distributed`` is initialized.
        dead_code_sampling: ``"distortion"`` (vectors drawn with probability
            proportional to their squared error) or ``"uniform"``.
        relocate_codes: move the codes whose removal costs least to where a new
            code would remove the most error (k-means swap step, see
            :meth:`_relocate`); gets EMA k-means out of local minima.
        relocate_every: training steps between two swap steps (the utility
            statistics are measured on those steps only).
        block_size: distance block elements for :func:`build_hierarchy`.
        chunk_elements: largest ``[rows, K]`` distance block of the nearest-code
            search (memory knob; results do not depend on it).

    Buffers (all in ``state_dict``; float ones follow the module dtype):
    ``codebook [K, D]`` (an ``nn.Parameter`` when ``learnable_codebook``), EMA
    statistics ``cluster_size [K]`` / ``embed_sum [K, D]`` / ``utility [K]``,
    ``ema_steps``, ``initted``, ``codebook_version``, ``built_version`` (int64
    scalars, -1 = never built) and the hierarchy / layer tables, one buffer per
    field of :class:`Hierarchy` (``tree_parent [M]``, ``tree_children [K-1, 2]``,
    ``tree_size [M]``, ``tree_count [M]``, ``tree_center [M, D]``,
    ``tree_merge_cost [K-1]``) and of :class:`LayerTables` (``layers_widths [L]``,
    ``layers_leaf_node / layers_leaf_symbol / layers_members [L, K]``,
    ``layers_group_start / layers_group_size [L, M]``).
    """

    codebook: Tensor
    cluster_size: Tensor
    embed_sum: Tensor
    initted: Tensor
    codebook_version: Tensor
    built_version: Tensor

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        bits: BitsArg = (4, 2, 2, 2, 2),
        *,
        num_layers: int | None = None,
        decay: float = 0.99,
        eps: float = 1e-5,
        commitment_weight: float = 0.25,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        threshold_ema_dead_code: float = 2.0,
        learnable_codebook: bool = False,
        ema_update: bool = True,
        channel_first: bool = False,
        linkage: str = "ward",
        cut: str = "greedy",
        refine: bool = False,
        sync_distributed: bool = True,
        dead_code_sampling: str = "distortion",
        relocate_codes: bool = True,
        relocate_every: int = 4,
        block_size: int | None = None,
        chunk_elements: int = 1 << 23,
    ) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("codebook_size", codebook_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if dead_code_sampling not in ("distortion", "uniform"):
            raise ValueError(f"dead_code_sampling must be 'distortion' or 'uniform', got {dead_code_sampling!r}")
        if kmeans_iters < 0:
            raise ValueError(f"kmeans_iters must be >= 0, got {kmeans_iters}")
        if linkage not in LINKAGES:
            raise ValueError(f"unknown linkage {linkage!r}; expected one of {LINKAGES}")
        if cut not in CUTS:
            raise ValueError(f"unknown cut {cut!r}; expected one of {CUTS}")
        if isinstance(bits, str) and bits not in PROPOSALS:
            raise ValueError(f"unknown bit proposal {bits!r}; expected a list of ints, an int, a callable or one of {PROPOSALS}")
        self.dim = dim
        self.codebook_size = codebook_size
        self.bits, self._num_layers = self._check_bits(bits, num_layers)
        self.decay = float(decay)
        self.eps = float(eps)
        self.commitment_weight = float(commitment_weight)
        self.kmeans_init = bool(kmeans_init)
        self.kmeans_iters = int(kmeans_iters)
        self.threshold_ema_dead_code = float(threshold_ema_dead_code)
        self.learnable_codebook = bool(learnable_codebook)
        self.ema_update = bool(ema_update)
        self.channel_first = bool(channel_first)
        self.linkage = linkage
        self.cut = cut
        self.refine = bool(refine)
        self.sync_distributed = bool(sync_distributed)
        self.dead_code_sampling = dead_code_sampling
        self.relocate_codes = bool(relocate_codes)
        if isinstance(relocate_every, bool) or not isinstance(relocate_every, int) or relocate_every < 1:
            raise ValueError(f"relocate_every must be a positive int, got {relocate_every!r}")
        self.relocate_every = relocate_every
        self.block_size = block_size
        self.chunk_elements = int(chunk_elements)

        K, D, L = codebook_size, dim, self._num_layers
        M = 2 * K - 1
        init = torch.randn(K, D)
        if self.learnable_codebook:
            self.codebook = nn.Parameter(init)
        else:
            self.register_buffer("codebook", init)
        self.register_buffer("cluster_size", torch.zeros(K))
        self.register_buffer("embed_sum", torch.zeros(K, D))
        self.register_buffer("utility", torch.zeros(K))
        self.register_buffer("ema_steps", torch.tensor(0, dtype=torch.long))
        self.register_buffer("initted", torch.tensor(False))
        self.register_buffer("codebook_version", torch.tensor(0, dtype=torch.long))
        self.register_buffer("built_version", torch.tensor(-1, dtype=torch.long))
        sizes = {"M": M, "K": K, "K-1": K - 1, "D": D, "L": L, "2": 2}
        for prefix, spec in ((_TREE_PREFIX, _TREE_FIELDS), (_LAYER_PREFIX, _LAYER_FIELDS)):
            for name, (shape, integer) in spec.items():
                size = tuple(sizes[s] for s in shape)
                buf = torch.full(size, -1, dtype=torch.long) if integer else torch.zeros(size)
                self.register_buffer(prefix + name, buf)
        self.num_reseeded = 0  # dead codes re-seeded since construction (python counters, for logging)
        self.num_relocated = 0  # codes moved by the swap step since construction
        self._train_steps = 0  # python step counter (same on every rank), paces the swap step
        self._initted = False  # python mirror of `initted` (no device sync / graph break per step)
        self._built = False  # python mirror of `built_version >= 0`, used under torch.compile
        self._stale_warned = False

    # ------------------------------------------------------------------ config
    @staticmethod
    def _check_bits(bits: BitsArg, num_layers: int | None) -> tuple[Any, int]:
        if num_layers is not None and (isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1):
            raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
        if isinstance(bits, (list, tuple)):
            widths = check_bits_list(bits)
            if num_layers is not None and num_layers != len(widths) + 1:
                raise ValueError(f"bits {widths} make {len(widths) + 1} layers but num_layers={num_layers}")
            return widths, len(widths) + 1
        if isinstance(bits, bool) or not (isinstance(bits, (int, str)) or callable(bits)):
            raise ValueError(f"bits must be a list of ints, an int, a proposal name or a callable, got {bits!r}")
        if isinstance(bits, int) and bits <= 0:
            raise ValueError(f"bits must be a positive int, got {bits}")
        if num_layers is None:
            raise ValueError(
                f"bits={bits!r} does not fix the number of layers: pass num_layers (total layers, final one included)"
            )
        return bits, int(num_layers)

    @property
    def num_layers(self) -> int:
        """L, total number of layers (the last one reaches every codeword)."""
        return self._num_layers

    @property
    def num_nodes(self) -> int:
        """M = 2K - 1, number of tree nodes."""
        return 2 * self.codebook_size - 1

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, codebook_size={self.codebook_size}, bits={self.bits!r}, num_layers={self.num_layers}, "
            f"decay={self.decay}, commitment_weight={self.commitment_weight}, "
            f"learnable_codebook={self.learnable_codebook}, channel_first={self.channel_first}"
        )

    # ------------------------------------------------------------- input shape
    def _check_input(self, x: Tensor, name: str = "x") -> None:
        if not torch.is_tensor(x):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(
                f"{name} must be a real floating-point tensor (float16/bfloat16/float32/float64), got dtype {x.dtype}"
            )
        if self.channel_first:
            if x.dim() < 2 or x.shape[1] != self.dim:
                raise ValueError(
                    f"{name} must be channel-first [B, D={self.dim}, ...], got shape {list(x.shape)} "
                    f"(dimension 1 is {x.shape[1] if x.dim() > 1 else 'missing'})"
                )
        elif x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(
                f"{name} must be [..., D={self.dim}], got shape {list(x.shape)} "
                f"(last dimension {x.shape[-1] if x.dim() else 'missing'}, expected {self.dim})"
            )
        if not _compiling() and x.numel() and not bool(torch.isfinite(x).all()):
            what = "NaN" if bool(torch.isnan(x).any()) else "Inf"
            raise ValueError(f"{name} contains {what} values (the quantizer needs finite inputs)")

    def _flatten(self, x: Tensor) -> tuple[Tensor, torch.Size]:
        """``x`` -> ``([N, D], batch shape)``; channel-first inputs are moved to channel-last."""
        if self.channel_first:
            x = x.movedim(1, -1)
        return x.reshape(-1, self.dim), x.shape[:-1]

    def _unflatten(self, flat: Tensor, batch: torch.Size) -> Tensor:
        out = flat.reshape(*batch, self.dim)
        return out.movedim(-1, 1) if self.channel_first else out

    def _compute_dtype(self, x: Tensor) -> torch.dtype:
        """float32 for half inputs (autocast), else the promotion of input and codebook dtypes."""
        xd = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        cd = self.codebook.dtype if self.codebook.dtype in (torch.float32, torch.float64) else torch.float32
        return torch.promote_types(xd, cd)

    # --------------------------------------------------------- nearest search
    def _nearest(self, x: Tensor, codebook: Tensor, with_gap: bool = False) -> tuple[Tensor, Tensor | None]:
        """Nearest codeword of every vector.

        Args:
            x: ``[N, D]``; codebook: ``[K, D]`` (same dtype).
            with_gap: also return ``gap [N]``, the squared distance to the second
                nearest codeword minus that to the nearest (the error increase if
                the nearest codeword were removed; needs K >= 2).

        Returns:
            ``(indices [N] int64, gap [N] | None)``. Ties go to the lowest index.
        """
        half_sq = 0.5 * codebook.pow(2).sum(1)
        ct = codebook.t()
        rows = max(1, self.chunk_elements // max(1, codebook.shape[0]))

        def block(xb: Tensor) -> tuple[Tensor, Tensor | None]:
            d = torch.addmm(half_sq, xb, ct, alpha=-1.0)  # 0.5 ||x - c||^2 - 0.5 ||x||^2
            i = d.argmin(1)
            if not with_gap:
                return i, None
            first = d.gather(1, i[:, None])
            second = d.scatter_(1, i[:, None], math.inf).amin(1, keepdim=True)
            return i, (2.0 * (second - first)).squeeze(1)

        if x.shape[0] <= rows:
            return block(x)
        parts = [block(x[s : s + rows]) for s in range(0, x.shape[0], rows)]
        idx = torch.cat([p[0] for p in parts])
        return idx, (torch.cat([p[1] for p in parts]) if with_gap else None)

    @torch.no_grad()
    def quantize(self, x: Tensor) -> Tensor:
        """Nearest codeword index of every vector.

        Args:
            x: ``[..., D]`` (or ``[B, D, ...]`` when ``channel_first``) float tensor.

        Returns:
            ``[*batch]`` int64 indices.
        """
        self._check_input(x)
        flat, batch = self._flatten(x)
        dtype = self._compute_dtype(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            idx, _ = self._nearest(flat.to(dtype), self.codebook.detach().to(dtype))
        return idx.reshape(batch)

    # ------------------------------------------------------------------ train
    def _seed(self, x: Tensor) -> Tensor:
        """Initial codewords drawn from ``x [N, D]``: ``[K, D]`` (k-means++ in doubling rounds or uniform)."""
        n, K = x.shape[0], self.codebook_size
        if n < K or not self.kmeans_init:
            pick = torch.randperm(n, device=x.device)[:K] if n >= K else torch.randint(n, (K,), device=x.device)
            return x[pick].clone()
        centers = torch.empty(K, x.shape[1], dtype=x.dtype, device=x.device)
        centers[0] = x[torch.randint(n, (1,), device=x.device)]
        x_sq = x.pow(2).sum(1)
        d2 = (x - centers[0]).pow(2).sum(1)
        have, rounds = 1, 0
        tiny = torch.finfo(x.dtype).tiny
        max_rounds = 4 * math.ceil(math.log2(K)) + 8
        while have < K:
            # doubling rounds of D^2 sampling; a candidate is dropped when an earlier candidate of the
            # same round already covers it (is closer than half its distance to the current centers),
            # which is what sequential k-means++ would have made unlikely.
            m = min(have, K - have)
            cand = torch.multinomial(d2 + tiny, min(n, 2 * m), replacement=False)
            rounds += 1
            if rounds < max_rounds and cand.numel() > 1:
                xc = x[cand]
                pair = (x_sq[cand][:, None] + x_sq[cand][None, :] - 2.0 * (xc @ xc.t())).clamp_min_(0.0)
                earlier = torch.ones_like(pair, dtype=torch.bool).triu_(1)  # [i, j]: i before j
                covered = (earlier & (pair < 0.25 * d2[cand][None, :])).any(0)
                cand = cand[~covered]
            new = cand[:m]
            m = new.numel()
            centers[have : have + m] = x[new]
            c = centers[have : have + m]
            d_new = (x_sq[:, None] + c.pow(2).sum(1)[None, :] - 2.0 * (x @ c.t())).amin(1).clamp_min_(0.0)
            d2 = torch.minimum(d2, d_new)
            d2[new] = 0.0
            have += m
        return centers

    def _global_stats(self, x: Tensor, idx: Tensor, gap: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """Per-code statistics of one batch, summed over ranks (a single all-reduce).

        Returns ``counts [K]``, ``sums [K, D]`` and, when ``gap`` is given, the
        batch utility ``[K]`` of each code (summed error increase if it were removed).
        """
        K, D = self.codebook_size, x.shape[1]
        counts = torch.zeros(K, dtype=x.dtype, device=x.device).index_add_(0, idx, torch.ones_like(idx, dtype=x.dtype))
        sums = torch.zeros(K, D, dtype=x.dtype, device=x.device).index_add_(0, idx, x)
        util = None if gap is None else torch.zeros(K, dtype=x.dtype, device=x.device).index_add_(0, idx, gap.to(x.dtype))
        if self._sync():
            cols = [counts[:, None], sums] + ([] if util is None else [util[:, None]])
            packed = svq_dist.all_reduce_sum_(torch.cat(cols, dim=1))
            counts, sums = packed[:, 0], packed[:, 1 : D + 1]
            util = None if util is None else packed[:, D + 1]
        return counts, sums, util

    def _sync(self) -> bool:
        return self.sync_distributed and svq_dist.is_distributed()

    @property
    def _relocating(self) -> bool:
        return self.relocate_codes and self.codebook_size >= 2

    @property
    def _warmup_steps(self) -> int:
        return math.ceil(1.0 / (1.0 - self.decay))

    @torch.no_grad()
    def _init_codebook(self, x: Tensor) -> None:
        """First-batch initialization; ``x [N, D]`` in the compute dtype. Identical on every rank.

        Distributed: the seeds are drawn (on rank 0, then broadcast) from the first
        batches of *all* ranks; the Lloyd steps use all-reduced statistics.
        """
        if self._sync():
            centers = self._seed(svq_dist.all_gather_rows(x))
            svq_dist.broadcast_(centers)
        else:
            centers = self._seed(x)
        for _ in range(self.kmeans_iters if self.kmeans_init else 0):
            counts, sums, _ = self._global_stats(x, self._nearest(x, centers)[0])
            centers = torch.where((counts > 0)[:, None], sums / counts.clamp_min(1.0)[:, None], centers)
        idx, gap = self._nearest(x, centers, with_gap=self._relocating)
        counts, _, util = self._global_stats(x, idx, gap)
        dtype = self.codebook.dtype
        self.codebook.data.copy_(centers.to(dtype))
        self.cluster_size.copy_(counts.to(dtype))
        self.embed_sum.copy_((centers * counts[:, None]).to(dtype))
        if util is not None:
            self.utility.copy_(util.to(dtype))
        self.ema_steps.fill_(self._warmup_steps)  # statistics are on the per-batch scale already
        self.initted.fill_(True)
        self._initted = True
        self.codebook_version.add_(1)

    @torch.no_grad()
    def _ema_step(self, x: Tensor, idx: Tensor, err: Tensor, gap: Tensor | None) -> None:
        """EMA update of statistics (and codebook), dead-code re-seeding, code relocation.

        ``x [N, D]`` compute dtype, ``idx [N]``, ``err [N]`` squared error of each
        vector, ``gap [N]`` its error increase if its code were removed (or None).
        """
        dtype = self.cluster_size.dtype
        counts, sums, util = self._global_stats(x, idx, gap)
        w = 1.0 - self.decay
        self.cluster_size.lerp_(counts.to(dtype), w)
        self.embed_sum.lerp_(sums.to(dtype), w)
        if util is not None:  # measured every `relocate_every` steps: same memory as the other statistics
            self.utility.lerp_(util.to(dtype), 1.0 - self.decay**self.relocate_every)
        self.ema_steps.add_(1)
        changed = False
        if self.ema_update and not self.learnable_codebook:
            size = self.cluster_size
            total = size.sum()
            smoothed = (size + self.eps) / (total + self.codebook_size * self.eps) * total
            new = self.embed_sum / smoothed.clamp_min(torch.finfo(dtype).tiny)[:, None]
            self.codebook.data.copy_(torch.where((smoothed > 0)[:, None], new, self.codebook.data))
            changed = True
        # statistics set by from_codebook() are not on the per-batch scale: wait until the EMA has
        # mostly replaced them before judging codes by them
        warm = _compiling() or int(self.ema_steps) >= self._warmup_steps
        if self.threshold_ema_dead_code > 0 and warm:
            changed = self._replace_dead_codes(x, err) or changed
        if util is not None and warm and not _compiling():
            changed = self._relocate(x, err) or changed
        if changed:
            self.codebook_version.add_(1)

    @torch.no_grad()
    def _replace_dead_codes(self, x: Tensor, err: Tensor) -> bool:
        dead = self.cluster_size < self.threshold_ema_dead_code  # identical on every rank (all-reduced stats)
        if not _compiling() and not bool(dead.any()):
            return False
        n, K = x.shape[0], self.codebook_size
        if self.dead_code_sampling == "distortion":
            weight = err.float() + torch.finfo(torch.float32).tiny
            pick = torch.multinomial(weight, K, replacement=n < K)
        else:
            weight = torch.ones(n, device=x.device)
            pick = torch.randperm(n, device=x.device)[:K] if n >= K else torch.randint(n, (K,), device=x.device)
        samples = x[pick].to(self.codebook.dtype)
        if self._sync():
            # every rank proposes K vectors of its batch; rank 0 draws the K seeds from the pool
            pool = svq_dist.all_gather_rows(samples)
            pool_weight = svq_dist.all_gather_rows(weight[pick])
            choice = torch.multinomial(pool_weight, K, replacement=pool.shape[0] < K)
            svq_dist.broadcast_(choice)
            samples = pool[choice]
        thr = self.threshold_ema_dead_code
        if not _compiling():
            self.num_reseeded += int(dead.sum())
        self.codebook.data.copy_(torch.where(dead[:, None], samples, self.codebook.data))
        self.cluster_size.copy_(torch.where(dead, torch.full_like(self.cluster_size, thr), self.cluster_size))
        self.embed_sum.copy_(torch.where(dead[:, None], samples * thr, self.embed_sum))
        if self._relocating:  # neutral prior: neither first to go nor protected
            self.utility.copy_(torch.where(dead, self.utility.mean(), self.utility))
        return True

    @torch.no_grad()
    def _relocate(self, x: Tensor, err: Tensor) -> bool:
        """Move codes whose removal costs least to where a new code would gain most.

        A k-means "swap" step that gets EMA k-means out of local minima (two codes
        sharing one cluster while another code straddles two clusters), which
        dead-code restarts alone cannot fix because no code is dead. Costs come
        from the batch: ``utility[a]`` (EMA) is the squared error added if code
        ``a`` were removed; the gain of a candidate vector ``x_p`` (drawn with
        probability ~ squared error) is ``sum_i max(0, err_i - ||x_i - x_p||^2)``.
        Up to ``max(2, K // 32)`` pairs swap per step, only where
        ``gain > 2 * utility``. Distributed: candidates are gathered from every
        rank and gains all-reduced, so every rank moves the same codes to the
        same places.
        """
        n, K = x.shape[0], self.codebook_size
        num = min(n, 32)
        cand = torch.multinomial(err.float() + torch.finfo(torch.float32).tiny, num, replacement=False)
        xc, own = x[cand], err[cand].to(x.dtype)
        if self._sync():  # candidates from every rank
            xc, own = svq_dist.all_gather_rows(xc), svq_dist.all_gather_rows(own)
        x_sq = x.pow(2).sum(1)
        c_sq = xc.pow(2).sum(1)
        dist = (x_sq[:, None] + c_sq[None, :] - 2.0 * (x @ xc.t())).clamp_min_(0.0)  # [N, P]
        better = (err[:, None] - dist).clamp_min_(0.0)
        stats = torch.stack([better.sum(0), (better > 0).to(x.dtype).sum(0)], dim=1)  # gain, captured count
        if self._sync():
            svq_dist.all_reduce_sum_(stats)
        # a candidate's own error is no gain (it is one vector, not a region): leave it out
        gain, captured = (stats[:, 0] - own).clamp_min_(0.0), (stats[:, 1] - 1.0).clamp_min_(0.0)
        codebook = self.codebook.detach().to(x.dtype)
        cand_err = (c_sq[:, None] + codebook.pow(2).sum(1)[None, :] - 2.0 * (xc @ codebook.t())).amin(1).clamp_min_(0.0)
        # strongest candidates first; drop one covered by a stronger one (closer than half its distance)
        order = gain.argsort(descending=True)
        xc, gain, captured, cand_err = xc[order], gain[order], captured[order], cand_err[order]
        pair = (c_sq[order][:, None] + c_sq[order][None, :] - 2.0 * (xc @ xc.t())).clamp_min_(0.0)
        earlier = torch.ones_like(pair, dtype=torch.bool).triu_(1)
        keep = ~(earlier & (pair < 0.25 * cand_err[None, :])).any(0)
        xc, gain, captured = xc[keep], gain[keep], captured[keep]
        # cheapest codes first; skip a code whose nearest other code is being removed before it
        utility = self.utility.to(x.dtype)
        num = min(xc.shape[0], max(2, K // 32))
        util_sorted, losers = utility.sort()
        util_sorted, losers = util_sorted[:num], losers[:num]
        lc = codebook[losers]
        d_lk = (lc.pow(2).sum(1)[:, None] + codebook.pow(2).sum(1)[None, :] - 2.0 * (lc @ codebook.t()))
        d_lk[torch.arange(num, device=x.device), losers] = math.inf
        partner = d_lk.argmin(1)
        rank_of = torch.full((K,), num, dtype=torch.long, device=x.device)
        rank_of[losers] = torch.arange(num, device=x.device)
        ok = rank_of[partner] >= torch.arange(num, device=x.device)
        util_sorted, losers = util_sorted[ok], losers[ok]
        num = min(num, losers.numel())
        swap = (gain[:num] > 2.0 * util_sorted[:num]).to(torch.long).cumprod(0).bool()
        if not bool(swap.any()):
            return False
        codes, new = losers[:num][swap], xc[:num][swap].to(self.codebook.dtype)
        self.num_relocated += codes.numel()
        size = torch.maximum(captured[:num][swap], torch.full_like(captured[:num][swap], self.threshold_ema_dead_code))
        size = size.to(self.cluster_size.dtype)
        self.codebook.data[codes] = new
        self.cluster_size[codes] = size
        self.embed_sum[codes] = new * size[:, None]
        self.utility[codes] = gain[:num][swap].to(self.utility.dtype)
        return True

    # ---------------------------------------------------------------- forward
    def forward(self, x: Tensor, num_layers: int | None = None) -> VQOutput:
        """Quantize ``x``; in training mode also initialize / EMA-update the codebook.

        Args:
            x: ``[..., D]`` float tensor (``[B, D, ...]`` with ``channel_first``),
                float32/float64, or float16/bfloat16 (e.g. under autocast; the
                distance math runs in float32).
            num_layers: ``None`` for plain quantization, or ``l`` in ``1..L``:
                the output is the reconstruction after layers ``0..l-1`` (needs
                :meth:`update`); ``l = L`` equals plain quantization exactly.

        Returns:
            :class:`VQOutput` (``quantized`` has the shape and dtype of ``x``).
        """
        self._check_input(x)
        if num_layers is not None:
            self._check_num_layers(num_layers)
            self._require_built()
        flat, batch = self._flatten(x)
        if flat.shape[0] == 0:
            raise ValueError(f"x holds no vectors (shape {list(x.shape)})")
        dtype = self._compute_dtype(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            xf = flat.to(dtype)
            if self.training and not self._initted:
                self._initted = bool(self.initted)  # the buffer may have been loaded or broadcast (DDP)
                if not self._initted:
                    self._init_codebook(xf.detach())
            codebook = self.codebook.to(dtype)
            with_gap = self.training and self._relocating and self._train_steps % self.relocate_every == 0
            idx, gap = self._nearest(xf.detach(), codebook.detach(), with_gap=with_gap)
            q = F.embedding(idx, codebook if self.learnable_codebook else codebook.detach())
            sq_err = (xf - q.detach()).pow(2)
            commit_loss = sq_err.mean().float()
            if self.learnable_codebook:
                codebook_loss = (q - xf.detach()).pow(2).mean().float()
            else:
                codebook_loss = commit_loss.new_zeros(())
            loss = self.commitment_weight * commit_loss + codebook_loss

            if num_layers is None:
                out = q.detach()
            else:
                self._warn_if_stale()
                out = self._layer_centers(num_layers).to(dtype)[idx]

            counts = torch.zeros(self.codebook_size, dtype=torch.float32, device=idx.device)
            counts.index_add_(0, idx, torch.ones_like(idx, dtype=torch.float32))
            p = counts / counts.sum()
            perplexity = torch.exp(-(p * torch.log(p.clamp_min(1e-30))).sum())

            if self.training:
                self._ema_step(xf.detach(), idx, sq_err.detach().sum(1), gap)
                self._train_steps += 1

        out = out.to(flat.dtype)
        quantized = out + (flat - flat.detach())  # value: exactly `out`; gradient: identity to x
        return VQOutput(
            quantized=self._unflatten(quantized, batch),
            indices=idx.reshape(batch),
            loss=loss,
            commit_loss=commit_loss,
            codebook_loss=codebook_loss,
            perplexity=perplexity,
        )

    # -------------------------------------------------------------- hierarchy
    @property
    def is_built(self) -> bool:
        """True once :meth:`update` has filled the hierarchy / layer buffers (also after loading them)."""
        return int(self.built_version) >= 0

    @property
    def is_stale(self) -> bool:
        """True when built and the codebook changed since the last :meth:`update`.

        Detected both by the version counter (EMA steps, initialization, dead-code
        re-seeding) and by comparing the tree's leaves with the codebook (any
        other change, e.g. an optimizer step on a learnable codebook).
        """
        if not self.is_built:
            return False
        if int(self.codebook_version) != int(self.built_version):
            return True
        leaves = self.tree_center[: self.codebook_size]
        return not torch.equal(leaves, self.codebook.detach().to(leaves.dtype))

    def _require_built(self) -> None:
        built = self._built if _compiling() else self.is_built  # no device sync inside torch.compile
        if not built:
            raise RuntimeError(
                "ScalableVQ has no hierarchy yet: call update() (after training the codebook, "
                "or load a checkpoint saved after update()) before using layers "
                "(forward(num_layers=...), encode, decode, reconstruct, rates)"
            )

    def _warn_if_stale(self) -> None:
        if _compiling() or self._stale_warned:
            return
        if self.is_stale:
            self._stale_warned = True
            warnings.warn(
                "ScalableVQ: the codebook changed since the last update(); the layers use the hierarchy built "
                "for the old codebook (call update() to rebuild). This warning is shown once per build.",
                RuntimeWarning,
                stacklevel=3,
            )

    def _check_num_layers(self, num_layers: int) -> None:
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers <= self.num_layers:
            raise ValueError(f"num_layers must be an int in [1, {self.num_layers}], got {num_layers!r}")

    @property
    def hierarchy(self) -> Hierarchy:
        """The merge tree as a :class:`Hierarchy` view of the buffers (no copy). Needs :meth:`update`."""
        self._require_built()
        return Hierarchy.from_dict({k: getattr(self, _TREE_PREFIX + k) for k in _TREE_FIELDS})

    @property
    def tables(self) -> LayerTables:
        """The layer tables as a :class:`LayerTables` view of the buffers (no copy). Needs :meth:`update`."""
        self._require_built()
        return LayerTables.from_dict({k: getattr(self, _LAYER_PREFIX + k) for k in _LAYER_FIELDS})

    def _layer_centers(self, num_layers: int) -> Tensor:
        """``[K, D]`` reconstruction of each codeword after ``num_layers`` layers."""
        return self.tree_center[self.layers_leaf_node[num_layers - 1]]

    def _tree_statistics(self) -> tuple[Tensor, Tensor]:
        """Counts ``[K]`` and sums ``[K, D]`` handed to :func:`build_hierarchy`."""
        return self.cluster_size.clamp_min(0.0), self.embed_sum

    @torch.no_grad()
    def update(self, progress: bool = False) -> ScalableVQ:
        """Build the hierarchy and layer tables for the current codebook and store them in the buffers.

        Runs :func:`build_hierarchy` on ``(codebook, cluster_size, embed_sum)``
        and :func:`build_layers` with ``bits`` / ``cut`` / ``num_layers`` on the
        module's device. Under ``torch.distributed`` every rank must call it;
        codebook and statistics are first broadcast from rank 0 and the built
        tables too, so all ranks hold identical buffers.

        Args:
            progress: show a progress bar while merging.

        Returns:
            ``self`` (for chaining).
        """
        if self._sync():
            svq_dist.broadcast_tensors_([self.codebook.data, self.cluster_size, self.embed_sum])
        codebook = self.codebook.detach()
        counts, sums = self._tree_statistics()
        num_layers = None if isinstance(self.bits, list) else self.num_layers
        if self.refine:
            hierarchy, tables = build_refined(
                codebook, counts, sums, self.bits, num_layers=num_layers, linkage=self.linkage, cut=self.cut,
                progress=progress,
            )
        else:
            hierarchy = build_hierarchy(
                codebook, counts, sums, linkage=self.linkage, block_size=self.block_size, progress=progress
            )
            tables = build_layers(hierarchy, self.bits, cut=self.cut, num_layers=num_layers)
        if tables.num_layers != self.num_layers:
            raise RuntimeError(f"build_layers returned {tables.num_layers} layers, expected {self.num_layers}")
        targets = []
        for prefix, spec, src in ((_TREE_PREFIX, _TREE_FIELDS, hierarchy), (_LAYER_PREFIX, _LAYER_FIELDS, tables)):
            values = src.as_dict()
            if set(values) != set(spec):
                raise RuntimeError(f"core returned fields {sorted(values)}, the module stores {sorted(spec)}")
            for name, value in values.items():
                buf = getattr(self, prefix + name)
                if buf.shape != value.shape:
                    raise RuntimeError(f"{prefix + name}: built shape {list(value.shape)} != buffer shape {list(buf.shape)}")
                buf.copy_(value)
                targets.append(buf)
        if self._sync():
            svq_dist.broadcast_tensors_(targets)
        self.built_version.copy_(self.codebook_version)
        self._built = True
        self._stale_warned = False
        return self

    # ------------------------------------------------------ layered coding API
    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Per-layer symbols of ``x``.

        Args:
            x: ``[..., D]`` (or ``[B, D, ...]`` with ``channel_first``) float tensor.

        Returns:
            ``[L, *batch]`` int64 codes; ``codes[l]`` is the symbol sent in layer
            ``l`` (an index inside the vector's group), -1 where nothing is sent.
        """
        self._require_built()
        self._warn_if_stale()
        idx = self.quantize(x)
        return encode_indices(self.tables, idx.reshape(-1)).reshape(self.num_layers, *idx.shape)

    @torch.no_grad()
    def decode(self, codes: Tensor, num_layers: int | None = None) -> Tensor:
        """Reconstruction from the first layers of ``codes``.

        Args:
            codes: ``[l, *batch]`` int codes of layers ``0..l-1`` (as from :meth:`encode`).
            num_layers: layers to use (default ``l``); must be ``<= l``.

        Returns:
            ``[*batch, D]`` (``[B, D, ...]`` with ``channel_first``) in the module's float dtype.

        Raises:
            ValueError: invalid codes (see :func:`~svq_modules.layers.decode_codes`).
        """
        self._require_built()
        self._warn_if_stale()
        if not torch.is_tensor(codes) or codes.dim() < 1:
            raise ValueError(f"codes must be a [layers, ...] integer tensor, got {type(codes).__name__}")
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise ValueError(f"codes must be an integer tensor, got dtype {codes.dtype}")
        available = codes.shape[0]
        num_layers = available if num_layers is None else num_layers
        self._check_num_layers(num_layers)
        if num_layers > available:
            raise ValueError(f"num_layers={num_layers} but codes hold only {available} layers")
        batch = codes.shape[1:]
        nodes = decode_codes(self.tables, codes[:num_layers].reshape(num_layers, -1))
        return self._unflatten(self.tree_center[nodes[-1]], batch)

    @torch.no_grad()
    def reconstruct(self, indices: Tensor, num_layers: int) -> Tensor:
        """Reconstruction of codeword indices after ``num_layers`` layers.

        Args:
            indices: ``[*batch]`` int codeword indices.
            num_layers: ``1..L``; ``L`` gives the codewords themselves.

        Returns:
            ``[*batch, D]`` (``[B, D, ...]`` with ``channel_first``) in the module's float dtype.
        """
        self._require_built()
        self._check_num_layers(num_layers)
        self._warn_if_stale()
        if not torch.is_tensor(indices):
            raise ValueError(f"indices must be an integer tensor, got {type(indices).__name__}")
        flat = _reconstruct_layers(self.hierarchy, self.tables, indices.reshape(-1), num_layers)
        return self._unflatten(flat, indices.shape)

    @torch.no_grad()
    def rates(self, indices: Tensor | None = None) -> LayerRates:
        """Cumulative mean bits per vector after each layer.

        Args:
            indices: ``[*batch]`` codeword indices of the data to rate (e.g.
                ``forward(x).indices``); default: the code usage in the statistics.

        Returns:
            :class:`~svq_modules.layers.LayerRates`: ``raw_bits [L]`` (fixed-length
            symbols) and ``entropy_bits [L]`` (ideal cost under the tree's branch
            probabilities), float64, cumulative over layers.
        """
        self._require_built()
        self._warn_if_stale()
        flat = None if indices is None else indices.reshape(-1)
        return layer_rates(self.hierarchy, self.tables, flat)

    # ----------------------------------------------------------- bitstream
    @torch.no_grad()
    def compress(
        self,
        x: Tensor,
        *,
        coding: str = "entropy",
        num_layers: int | None = None,
        embed_centers: str | None = None,
    ) -> list[bytes]:
        """Per-layer byte chunks of ``x`` (see ``docs/bitstream.md``).

        Args:
            x: ``[..., D]`` float (``[B, D, ...]`` with ``channel_first``).
            coding: ``"entropy"`` (default; constriction, symbols conditioned on
                the parent node from the stored counts) or ``"raw"`` (bit packing).
            num_layers: write only the first layers (default all L).
            embed_centers: ``None``, ``"float16"`` or ``"float32"``: also put the
                layer's node centers and groups into each chunk so a receiver
                without the model can decode.

        Returns:
            ``list[bytes]``, chunk l holds layer l; the batch shape travels in chunk 0.
        """
        self._require_built()
        self._warn_if_stale()
        indices = self.quantize(x)
        return compress_layers(
            self.hierarchy, self.tables, indices, coding=coding, num_layers=num_layers, embed_centers=embed_centers
        )

    @torch.no_grad()
    def decompress(self, chunks: Sequence[bytes], num_layers: int | None = None) -> Tensor:
        """Reconstruction from a prefix of the chunks of :meth:`compress`.

        Args:
            chunks: layers ``0..l-1`` in order (any prefix of the stream).
            num_layers: use only the first ``num_layers`` of them (default all given).

        Returns:
            ``[*batch, D]`` (``[B, D, ...]`` with ``channel_first``).

        Raises:
            BitstreamError: (a ``ValueError``) corrupt, reordered, incomplete or
            foreign chunks.
        """
        self._require_built()
        self._warn_if_stale()
        out = decompress_layers(self.hierarchy, self.tables, chunks, num_layers=num_layers)
        flat = self.tree_center[out.nodes[-1].to(self.tree_center.device)]
        return self._unflatten(flat, torch.Size(out.batch_shape))

    # ----------------------------------------------------------- checkpoints
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
        key = prefix + "codebook"
        if key in state_dict:
            theirs = tuple(state_dict[key].shape)
            ours = tuple(self.codebook.shape)
            if theirs != ours:
                raise RuntimeError(
                    f"cannot load ScalableVQ checkpoint: its codebook has shape {list(theirs)} "
                    f"(codebook_size={theirs[0] if theirs else '?'}, dim={theirs[1] if len(theirs) > 1 else '?'}) "
                    f"but this module's codebook has shape {list(ours)} "
                    f"(codebook_size={self.codebook_size}, dim={self.dim})"
                )
        key = prefix + _LAYER_PREFIX + "widths"
        if key in state_dict and tuple(state_dict[key].shape) != (self.num_layers,):
            raise RuntimeError(
                f"cannot load ScalableVQ checkpoint: it has {state_dict[key].shape[0]} layers "
                f"(layers_widths shape {list(state_dict[key].shape)}) but this module has {self.num_layers} "
                f"(shape {[self.num_layers]}); construct it with the same bits/num_layers"
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self._initted = bool(self.initted)
        self._built = int(self.built_version) >= 0
        self._stale_warned = False

    # ----------------------------------------------------------- constructors
    @classmethod
    def from_codebook(
        cls,
        codebook: Tensor,
        x: Tensor | None = None,
        indices: Tensor | None = None,
        counts: Tensor | None = None,
        sums: Tensor | None = None,
        bits: BitsArg = (4, 2, 2, 2, 2),
        *,
        build: bool = True,
        **kwargs: Any,
    ) -> ScalableVQ:
        """Wrap a codebook learned elsewhere (e.g. by k-means or another VQ layer).

        Statistics for the hierarchy come from, in this order: ``counts`` (and
        ``sums``, default ``codebook * counts``); the data ``x [N, D]`` with its
        ``indices [N]`` (default: nearest codewords), via
        :func:`~svq_modules.hierarchy.code_statistics`; or uniform counts.

        Args:
            codebook: ``[K, D]`` float.
            x: optional ``[N, D]`` float data the codebook was learned on.
            indices: optional ``[N]`` int codes of ``x``.
            counts: optional ``[K]`` float code counts.
            sums: optional ``[K, D]`` float per-code sums of the data.
            bits: bit proposal, as in the constructor.
            build: call :meth:`update` (default True).
            **kwargs: other constructor arguments.

        Returns:
            A module on the codebook's device and dtype, marked initialized (the
            first training batch will not re-initialize it), built if ``build``.
        """
        if not torch.is_tensor(codebook) or codebook.dim() != 2 or not codebook.is_floating_point():
            raise ValueError(f"codebook must be a [K, D] float tensor, got {getattr(codebook, 'shape', codebook)!r}")
        K, D = codebook.shape
        module = cls(D, K, bits, **kwargs).to(device=codebook.device, dtype=codebook.dtype)
        with torch.no_grad():
            module.codebook.data.copy_(codebook)
            if counts is not None:
                counts = counts.to(codebook)
                if counts.shape != (K,):
                    raise ValueError(f"counts must have shape [{K}], got {list(counts.shape)}")
                sums = codebook * counts[:, None] if sums is None else sums.to(codebook)
            elif x is not None:
                if not torch.is_tensor(x) or x.dim() != 2 or x.shape[1] != D:
                    raise ValueError(f"x must be [N, D={D}], got shape {list(getattr(x, 'shape', []))}")
                if not x.is_floating_point():
                    raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
                x = x.to(codebook)
                if indices is None:
                    indices = module._nearest(x, module.codebook.detach())[0]
                counts, sums = code_statistics(x, indices, K)
            else:
                if sums is not None:
                    raise ValueError("sums given without counts")
                counts = torch.ones(K, dtype=codebook.dtype, device=codebook.device)
                sums = codebook.clone()
            if sums.shape != (K, D):
                raise ValueError(f"sums must have shape [{K}, {D}], got {list(sums.shape)}")
            module.cluster_size.copy_(counts)
            module.embed_sum.copy_(sums)
            module.initted.fill_(True)
            module._initted = True
            module.ema_steps.zero_()  # dead-code / relocation decisions wait for batch statistics
            module.codebook_version.add_(1)
        if build:
            module.update()
        return module
