"""``EMACodebook``: the learning half of :class:`~svq_modules.nn.ScalableVQ`.

It owns the codebook and everything that moves it: EMA statistics, the
first-batch initialization (batched k-means++ and Lloyd steps), the EMA step,
dead-code re-seeding, code relocation (a k-means swap step) and their
synchronization across ``torch.distributed`` ranks. It knows nothing of the
hierarchy or the layers (see :mod:`svq_modules.nn.index`).

Memory: every distance computation here is blocked so that one block holds at
most ``chunk_elements`` elements (nearest codewords via
:func:`~svq_modules.nearest.nearest_codewords`, the k-means++ candidate pairs,
the relocation gains and partners); besides those blocks a training step holds
``[N, D]``-sized tensors (the batch in the compute dtype) and ``[K, D]``
statistics.

``torch.compile``: the data-dependent housekeeping (:meth:`EMACodebook.prepare`
and :meth:`EMACodebook.step`) is excluded from compilation with
:func:`torch.compiler.disable`, so a compiled model runs exactly the same
training steps as an eager one (at the price of graph breaks around them).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .. import distributed as svq_dist
from ..nearest import DEFAULT_CHUNK_ELEMENTS, mean_squared_error, nearest_codewords
from ..validation import check_bool, check_choice, check_int, check_weight

__all__ = ["EMACodebook", "DEAD_CODE_SAMPLINGS", "kmeans_plus_plus"]

#: how dead codes pick their new vectors
DEAD_CODE_SAMPLINGS = ("distortion", "uniform")


def _sq_distances(a: Tensor, b: Tensor) -> Tensor:
    """``[n, m]`` squared distances between the rows of ``a [n, D]`` and ``b [m, D]`` (clamped at 0)."""
    return torch.addmm(a.pow(2).sum(1)[:, None] + b.pow(2).sum(1)[None, :], a, b.t(), alpha=-2.0).clamp_min_(0.0)


def _sq_dist_to_nearest(x: Tensor, codebook: Tensor, chunk_elements: int) -> Tensor:
    """``[N]`` squared distance of every row of ``x`` to its nearest row of ``codebook`` (blocked)."""
    idx, _ = nearest_codewords(x, codebook, chunk_elements=chunk_elements)
    return (x - codebook[idx]).pow(2).sum(1)


def _covered(points: Tensor, own: Tensor, chunk_elements: int) -> Tensor:
    """``[P] bool``: point j lies closer than half its own distance ``sqrt(own[j])`` to an earlier point i < j.

    Blocks of columns keep every ``[i, j]`` block within ``chunk_elements``.
    """
    p = points.shape[0]
    out = torch.zeros(p, dtype=torch.bool, device=points.device)
    cols = max(1, chunk_elements // max(1, p))
    rows = torch.arange(p, device=points.device)
    for s in range(1, p, cols):
        e = min(p, s + cols)
        pair = _sq_distances(points[:e], points[s:e])  # [e, e - s]
        earlier = rows[:e, None] < rows[None, s:e]
        out[s:e] = (earlier & (pair < 0.25 * own[None, s:e])).any(0)
    return out


def kmeans_plus_plus(x: Tensor, k: int, *, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> Tensor:
    """``k`` seeds drawn from ``x [N, D]`` (N >= k) by k-means++ ``D^2`` sampling in doubling rounds.

    Round r draws up to ``2m`` candidates (``m`` = seeds so far, at most the
    number missing) with probability proportional to their squared distance
    to the seeds; a candidate closer than half its own distance to an earlier
    candidate of the same round is dropped (sequential k-means++ would have
    made it unlikely), the first ``m`` survivors become seeds. About
    ``log2 k`` rounds, no Python loop per seed; every distance block holds at
    most ``chunk_elements`` elements. Uses the global torch RNG.

    Returns:
        ``[k, D]`` seeds, dtype and device of ``x``.
    """
    n = x.shape[0]
    centers = x.new_empty(k, x.shape[1])
    centers[0] = x[torch.randint(n, (1,), device=x.device)]
    d2 = (x - centers[0]).pow(2).sum(1)
    have, rounds = 1, 0
    tiny = torch.finfo(x.dtype).tiny
    max_rounds = 4 * math.ceil(math.log2(max(2, k))) + 8
    while have < k:
        m = min(have, k - have)
        cand = torch.multinomial(d2 + tiny, min(n, 2 * m), replacement=False)
        rounds += 1
        if rounds < max_rounds and cand.numel() > 1:
            cand = cand[~_covered(x[cand], d2[cand], chunk_elements)]
        new = cand[:m]
        m = new.numel()
        centers[have : have + m] = x[new]
        d2 = torch.minimum(d2, _sq_dist_to_nearest(x, centers[have : have + m], chunk_elements))
        d2[new] = 0.0
        have += m
    return centers


def _nearest_other(codebook: Tensor, codes: Tensor, chunk_elements: int) -> Tensor:
    """``[n]`` index of the nearest *other* codeword of each of ``codes [n]`` (blocked over rows)."""
    k = codebook.shape[0]
    rows = max(1, chunk_elements // max(1, k))
    parts = []
    for s in range(0, codes.shape[0], rows):
        block = codes[s : s + rows]
        d = _sq_distances(codebook[block], codebook)
        d[torch.arange(block.shape[0], device=d.device), block] = math.inf
        parts.append(d.argmin(1))
    return torch.cat(parts) if parts else codes.new_zeros(0)


def _capture(x: Tensor, err: Tensor, cand: Tensor, chunk_elements: int) -> Tensor:
    """``[P, 2]``: per candidate, the summed error decrease and the number of vectors it would capture.

    A vector ``x_i`` would move to candidate ``c_p`` if ``||x_i - c_p||^2 < err_i``;
    blocks of rows keep every ``[rows, P]`` block within ``chunk_elements``.
    """
    rows = max(1, chunk_elements // max(1, cand.shape[0]))
    out = x.new_zeros(cand.shape[0], 2)
    for s in range(0, x.shape[0], rows):
        better = (err[s : s + rows, None] - _sq_distances(x[s : s + rows], cand)).clamp_min_(0.0)
        out[:, 0] += better.sum(0)
        out[:, 1] += (better > 0).to(x.dtype).sum(0)
    return out


class EMACodebook(nn.Module):
    """A codebook learned by EMA k-means (or by gradients), with the statistics a hierarchy needs.

    Args:
        num_codes: K, number of codewords.
        dim: D, dimension of the vectors.
        decay: EMA decay in ``[0, 1)`` of the statistics (and of the codebook).
        eps: Laplace smoothing (>= 0) of the EMA cluster sizes.
        kmeans_init: initialize from the first training batch with
            :func:`kmeans_plus_plus` and ``kmeans_iters`` Lloyd steps; if False,
            with a random sample of that batch.
        kmeans_iters: Lloyd steps (int >= 0) of that initialization.
        threshold_ema_dead_code: codes whose EMA count falls below this (>= 0)
            are re-seeded from the current batch (0 disables).
        learnable: the codebook is an ``nn.Parameter`` learned by gradients
            (the statistics are still accumulated).
        ema_update: move the codebook by EMA (ignored when ``learnable``).
        sync_distributed: all-reduce statistics and broadcast initializations
            when ``torch.distributed`` is initialized with more than one rank.
        dead_code_sampling: one of :data:`DEAD_CODE_SAMPLINGS`: vectors drawn
            with probability proportional to their squared error, or uniformly.
        relocate_codes: k-means swap steps (see :meth:`relocate`).
        relocate_every: training steps (int >= 1) between two swap steps.
        chunk_elements: largest distance block in elements (int >= 1; a memory
            knob, results do not depend on it).
        train_rate_weight: ``w >= 0``; above 0, training picks each vector's code
            by the least ``||x - c_k||^2 + lam * bits_k`` instead of the nearest
            (entropy-constrained VQ, see :meth:`assign`), so the codebook learns
            for the rate-weighted choice that :meth:`ScalableVQ.quantize` makes
            at test time. 0 (default): the nearest code.

    State (``state_dict``; float entries follow the module dtype):
    ``codebook [K, D]``, ``cluster_size [K]`` and ``embed_sum [K, D]`` (EMA
    count and sum of the vectors of each code), ``utility [K]`` (EMA error
    added if the code were removed), int64 scalars ``ema_steps`` and
    ``codebook_version`` (bumped whenever this module moves the codebook) and
    the bool scalar ``initted``.
    """

    codebook: Tensor
    cluster_size: Tensor
    embed_sum: Tensor
    utility: Tensor
    ema_steps: Tensor
    initted: Tensor
    codebook_version: Tensor

    def __init__(
        self,
        num_codes: int,
        dim: int,
        *,
        decay: float = 0.99,
        eps: float = 1e-5,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        threshold_ema_dead_code: float = 2.0,
        learnable: bool = False,
        ema_update: bool = True,
        sync_distributed: bool = True,
        dead_code_sampling: str = "distortion",
        relocate_codes: bool = True,
        relocate_every: int = 4,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
        train_rate_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_codes = check_int(num_codes, "codebook_size", min=1)
        self.dim = check_int(dim, "dim", min=1)
        if check_weight(decay, "decay") >= 1.0:  # NumPy floats too (check_weight), below 1
            raise ValueError(f"decay must be a float in [0, 1), got {decay!r}")
        self.eps = check_weight(eps, "eps")
        self.threshold_ema_dead_code = check_weight(threshold_ema_dead_code, "threshold_ema_dead_code")
        check_choice(dead_code_sampling, "dead_code_sampling", DEAD_CODE_SAMPLINGS)
        self.decay = float(decay)
        self.kmeans_init = check_bool(kmeans_init, "kmeans_init")
        self.kmeans_iters = check_int(kmeans_iters, "kmeans_iters", min=0)
        self.learnable = check_bool(learnable, "learnable")
        self.ema_update = check_bool(ema_update, "ema_update")
        self.sync_distributed = check_bool(sync_distributed, "sync_distributed")
        self.dead_code_sampling = dead_code_sampling
        self.relocate_codes = check_bool(relocate_codes, "relocate_codes")
        self.relocate_every = check_int(relocate_every, "relocate_every", min=1)
        self.chunk_elements = check_int(chunk_elements, "chunk_elements", min=1)
        self.train_rate_weight = check_weight(train_rate_weight, "train_rate_weight")

        init = torch.randn(self.num_codes, self.dim)
        if self.learnable:
            self.codebook = nn.Parameter(init)
        else:
            self.register_buffer("codebook", init)
        self.register_buffer("cluster_size", torch.zeros(self.num_codes))
        self.register_buffer("embed_sum", torch.zeros(self.num_codes, self.dim))
        self.register_buffer("utility", torch.zeros(self.num_codes))
        self.register_buffer("ema_steps", torch.tensor(0, dtype=torch.long))
        self.register_buffer("initted", torch.tensor(False))
        self.register_buffer("codebook_version", torch.tensor(0, dtype=torch.long))
        self.num_reseeded = 0  # dead codes re-seeded since construction (Python counter, for logging)
        self.num_relocated = 0  # codes moved by the swap step since construction
        self._train_steps = 0  # Python step counter (same on every rank), paces the swap step
        self._initted = False  # Python mirror of `initted`: no device sync per step

    def extra_repr(self) -> str:
        return (
            f"num_codes={self.num_codes}, dim={self.dim}, decay={self.decay}, learnable={self.learnable}, "
            f"ema_update={self.ema_update}, kmeans_init={self.kmeans_init}, "
            f"threshold_ema_dead_code={self.threshold_ema_dead_code}, relocate_codes={self.relocate_codes}"
        )

    # ------------------------------------------------------------------ helpers
    def _sync(self) -> bool:
        return self.sync_distributed and svq_dist.is_distributed()

    @property
    def relocating(self) -> bool:
        """Whether swap steps run (``relocate_codes`` and K >= 2)."""
        return self.relocate_codes and self.num_codes >= 2

    @property
    def warmup_steps(self) -> int:
        """EMA steps after which the statistics are judged (``ceil(1 / (1 - decay))``)."""
        return math.ceil(1.0 / (1.0 - self.decay))

    def nearest(self, x: Tensor, codebook: Tensor | None = None, with_gap: bool = False,
                bias: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """:func:`~svq_modules.nearest.nearest_codewords` of ``x [N, D]`` (default: this codebook, cast to ``x``)."""
        cb = self.codebook.detach().to(x.dtype) if codebook is None else codebook
        return nearest_codewords(x, cb, chunk_elements=self.chunk_elements, with_gap=with_gap, bias=bias)

    def assign(self, x: Tensor, codebook: Tensor, with_gap: bool = False) -> tuple[Tensor, Tensor | None]:
        """The code of every row of ``x [N, D]`` (:meth:`nearest` with ``codebook``, both in the compute dtype).

        In training mode with ``train_rate_weight`` ``w > 0``, once initialized: the least
        ``||x - c_k||^2 + lam * bits_k``, with ``bits_k`` = :meth:`usage_bits` and ``lam`` = ``w`` x the batch's
        mean squared distance to its nearest codes, the choice ``ScalableVQ.quantize(x, w, relative=True)``
        makes at test time (there with the index's code lengths). ``gap`` then compares those sums. Under DDP
        ``lam`` comes from each rank's own batch. Dead codes and relocation judge the codes by this assignment:
        codes the weight starves fall below ``threshold_ema_dead_code`` and are re-seeded (the measured gains of
        the image model, ``ScalableVQAutoencoder``, include that churn).
        """
        weighted = self.training and self.train_rate_weight > 0 and self._initted
        idx, gap = self.nearest(x, codebook, with_gap and not weighted)
        if weighted:
            idx, gap = self._rate_weighted(x, codebook, idx, with_gap)
        return idx, gap

    @torch.compiler.disable  # reads the batch's mean error on the host: eager, as the other housekeeping
    def _rate_weighted(self, x: Tensor, codebook: Tensor, nearest: Tensor, with_gap: bool) -> tuple[Tensor, Tensor | None]:
        lam = self.train_rate_weight * mean_squared_error(x, codebook, nearest)
        return self.nearest(x, codebook, with_gap, bias=(lam * self.usage_bits()).to(x.dtype))

    def usage_bits(self) -> Tensor:
        """``[K]`` float64 bits of every code under its share of the EMA counts,
        ``-log2((n_k + eps) / (sum_j n_j + K eps))``: the live counterpart of the code lengths the index
        counts at its last build (:meth:`~svq_modules.nn.index.ScalableIndex.code_lengths`)."""
        tiny = torch.finfo(torch.float64).tiny
        size = self.cluster_size.double().clamp_min(0.0) + self.eps
        return -torch.log2((size / size.sum().clamp_min(tiny)).clamp_min(tiny))  # no counts (eps 0): all equal

    def statistics(self) -> tuple[Tensor, Tensor]:
        """``counts [K]`` (clamped at 0) and ``sums [K, D]`` for :func:`~svq_modules.hierarchy.build_hierarchy`."""
        return self.cluster_size.clamp_min(0.0), self.embed_sum

    def broadcast_(self) -> None:
        """Make every rank hold rank 0's codebook and statistics (no-op unless distributed and syncing)."""
        if self._sync():
            svq_dist.broadcast_tensors_([self.codebook.data, self.cluster_size, self.embed_sum])

    @torch.no_grad()
    def set_codebook(self, codebook: Tensor, counts: Tensor, sums: Tensor) -> None:
        """Take a codebook learned elsewhere with its statistics; marks the module initialized.

        ``codebook [K, D]``, ``counts [K]``, ``sums [K, D]`` (any float dtype; cast
        to this module's). Dead-code and relocation decisions wait until EMA
        steps have replaced these statistics by per-batch ones.
        """
        self.codebook.data.copy_(codebook)
        self.cluster_size.copy_(counts)
        self.embed_sum.copy_(sums)
        self.initted.fill_(True)
        self._initted = True
        self.ema_steps.zero_()
        self.codebook_version.add_(1)

    def _global_stats(self, x: Tensor, idx: Tensor, gap: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """Per-code ``counts [K]``, ``sums [K, D]`` (and batch ``utility [K]`` when ``gap`` is given), summed over ranks."""
        k, d = self.num_codes, x.shape[1]
        counts = torch.zeros(k, dtype=x.dtype, device=x.device).index_add_(0, idx, torch.ones_like(idx, dtype=x.dtype))
        sums = torch.zeros(k, d, dtype=x.dtype, device=x.device).index_add_(0, idx, x)
        util = None if gap is None else torch.zeros(k, dtype=x.dtype, device=x.device).index_add_(0, idx, gap.to(x.dtype))
        if self._sync():  # one all-reduce for all of them
            cols = [counts[:, None], sums] + ([] if util is None else [util[:, None]])
            packed = svq_dist.all_reduce_sum_(torch.cat(cols, dim=1))
            counts, sums = packed[:, 0], packed[:, 1 : d + 1]
            util = None if util is None else packed[:, d + 1]
        return counts, sums, util

    # ------------------------------------------------------------------- training
    @torch.compiler.disable
    @torch.no_grad()
    def prepare(self, x: Tensor) -> bool:
        """Before a training step on ``x [N, D]`` (compute dtype): initialize on the first batch.

        Returns whether this step measures the relocation utility (the nearest
        search must then return the gaps). Runs eagerly under ``torch.compile``.
        """
        if not self._initted:
            self._initted = bool(self.initted)  # the buffer may have been loaded or broadcast (DDP)
            if not self._initted:
                self.initialize(x)
        return self.relocating and self._train_steps % self.relocate_every == 0

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """First-batch initialization from ``x [N, D]``; identical on every rank.

        Distributed: seeds are drawn on rank 0 from the first batches of all
        ranks and broadcast; the Lloyd steps use all-reduced statistics.
        """
        if self._sync():
            centers = self._seed(svq_dist.all_gather_rows(x))
            svq_dist.broadcast_(centers)
        else:
            centers = self._seed(x)
        for _ in range(self.kmeans_iters if self.kmeans_init else 0):
            counts, sums, _ = self._global_stats(x, self.nearest(x, centers)[0])
            centers = torch.where((counts > 0)[:, None], sums / counts.clamp_min(1.0)[:, None], centers)
        idx, gap = self.nearest(x, centers, with_gap=self.relocating)
        counts, _, util = self._global_stats(x, idx, gap)
        dtype = self.codebook.dtype
        self.codebook.data.copy_(centers.to(dtype))
        self.cluster_size.copy_(counts.to(dtype))
        self.embed_sum.copy_((centers * counts[:, None]).to(dtype))
        if util is not None:
            self.utility.copy_(util.to(dtype))
        self.ema_steps.fill_(self.warmup_steps)  # statistics are on the per-batch scale already
        self.initted.fill_(True)
        self._initted = True
        self.codebook_version.add_(1)

    def _seed(self, x: Tensor) -> Tensor:
        """``[K, D]`` initial codewords from ``x [N, D]``: k-means++ or a uniform sample (with repeats if N < K)."""
        n, k = x.shape[0], self.num_codes
        if n < k or not self.kmeans_init:
            pick = torch.randperm(n, device=x.device)[:k] if n >= k else torch.randint(n, (k,), device=x.device)
            return x[pick].clone()
        return kmeans_plus_plus(x, k, chunk_elements=self.chunk_elements)

    @torch.compiler.disable
    @torch.no_grad()
    def step(self, x: Tensor, idx: Tensor, err: Tensor, gap: Tensor | None) -> None:
        """One training step: EMA statistics (and codebook), dead codes, relocation.

        Args:
            x: ``[N, D]`` the batch (compute dtype).
            idx: ``[N]`` int64 nearest codes.
            err: ``[N]`` squared error of each vector.
            gap: ``[N]`` error increase if its code were removed (when
                :meth:`prepare` asked for it), else None.

        Runs eagerly under ``torch.compile``.
        """
        dtype = self.cluster_size.dtype
        counts, sums, util = self._global_stats(x, idx, gap)
        w = 1.0 - self.decay
        self.cluster_size.lerp_(counts.to(dtype), w)
        self.embed_sum.lerp_(sums.to(dtype), w)
        if util is not None:  # measured every `relocate_every` steps
            self.utility.lerp_(util.to(dtype), 1.0 - self.decay**self.relocate_every)
        self.ema_steps.add_(1)
        changed = False
        if self.ema_update and not self.learnable:
            size = self.cluster_size
            total = size.sum()
            smoothed = (size + self.eps) / (total + self.num_codes * self.eps) * total
            new = self.embed_sum / smoothed.clamp_min(torch.finfo(dtype).tiny)[:, None]
            self.codebook.data.copy_(torch.where((smoothed > 0)[:, None], new, self.codebook.data))
            changed = True
        # statistics set by set_codebook() are not on the per-batch scale: wait until the EMA has
        # mostly replaced them before judging codes by them
        warm = int(self.ema_steps) >= self.warmup_steps
        if self.threshold_ema_dead_code > 0 and warm:
            changed = self.replace_dead_codes(x, err) or changed
        if util is not None and warm:
            changed = self.relocate(x, err) or changed
        if changed:
            self.codebook_version.add_(1)
        self._train_steps += 1

    @torch.no_grad()
    def replace_dead_codes(self, x: Tensor, err: Tensor) -> bool:
        """Re-seed codes whose EMA count is below ``threshold_ema_dead_code`` with vectors of ``x [N, D]``.

        Returns whether any code was re-seeded. Distributed: every rank proposes
        K vectors, rank 0 draws the seeds from the pool, so all ranks agree.
        """
        dead = self.cluster_size < self.threshold_ema_dead_code  # identical on every rank (all-reduced stats)
        if not bool(dead.any()):
            return False
        n, k = x.shape[0], self.num_codes
        if self.dead_code_sampling == "distortion":
            weight = err.float() + torch.finfo(torch.float32).tiny
            pick = torch.multinomial(weight, k, replacement=n < k)
        else:
            weight = torch.ones(n, device=x.device)
            pick = torch.randperm(n, device=x.device)[:k] if n >= k else torch.randint(n, (k,), device=x.device)
        samples = x[pick].to(self.codebook.dtype)
        if self._sync():
            pool = svq_dist.all_gather_rows(samples)
            pool_weight = svq_dist.all_gather_rows(weight[pick])
            choice = torch.multinomial(pool_weight, k, replacement=pool.shape[0] < k)
            svq_dist.broadcast_(choice)
            samples = pool[choice]
        thr = self.threshold_ema_dead_code
        self.num_reseeded += int(dead.sum())
        self.codebook.data.copy_(torch.where(dead[:, None], samples, self.codebook.data))
        self.cluster_size.copy_(torch.where(dead, torch.full_like(self.cluster_size, thr), self.cluster_size))
        self.embed_sum.copy_(torch.where(dead[:, None], samples * thr, self.embed_sum))
        if self.relocating:  # neutral prior: neither first to go nor protected
            self.utility.copy_(torch.where(dead, self.utility.mean(), self.utility))
        return True

    @torch.no_grad()
    def relocate(self, x: Tensor, err: Tensor) -> bool:
        """Move codes whose removal costs least to where a new code would gain most.

        A k-means "swap" step that gets EMA k-means out of local minima (two
        codes sharing one cluster while another code straddles two clusters),
        which dead-code restarts cannot fix because no code is dead.
        ``utility[a]`` (EMA) is the squared error added if code ``a`` were
        removed; the gain of a candidate ``x_p`` (one of 32 vectors drawn with
        probability ~ squared error, per rank) is
        ``sum_i max(0, err_i - ||x_i - x_p||^2)``. Up to ``max(2, K // 32)``
        pairs swap per step, only where ``gain > 2 * utility``. Distributed:
        candidates are gathered from every rank and gains all-reduced, so
        every rank moves the same codes to the same places.

        Args:
            x: ``[N, D]`` batch (compute dtype); err: ``[N]`` its squared errors.

        Returns:
            whether any code moved.
        """
        k, chunk = self.num_codes, self.chunk_elements
        cand = torch.multinomial(err.float() + torch.finfo(torch.float32).tiny, min(x.shape[0], 32), replacement=False)
        xc, own = x[cand], err[cand].to(x.dtype)
        if self._sync():  # candidates from every rank
            xc, own = svq_dist.all_gather_rows(xc), svq_dist.all_gather_rows(own)
        stats = _capture(x, err.to(x.dtype), xc, chunk)
        if self._sync():
            svq_dist.all_reduce_sum_(stats)
        # a candidate's own error is no gain (it is one vector, not a region): leave it out
        gain, captured = (stats[:, 0] - own).clamp_min_(0.0), (stats[:, 1] - 1.0).clamp_min_(0.0)
        codebook = self.codebook.detach().to(x.dtype)
        cand_err = _sq_dist_to_nearest(xc, codebook, chunk)
        # strongest candidates first; drop one covered by a stronger one (closer than half its distance)
        order = gain.argsort(descending=True)
        xc, gain, captured, cand_err = xc[order], gain[order], captured[order], cand_err[order]
        keep = ~_covered(xc, cand_err, chunk)
        xc, gain, captured = xc[keep], gain[keep], captured[keep]
        # cheapest codes first; skip a code whose nearest other code is being removed before it
        num = min(xc.shape[0], max(2, k // 32))
        util_sorted, losers = self.utility.to(x.dtype).sort()
        util_sorted, losers = util_sorted[:num], losers[:num]
        partner = _nearest_other(codebook, losers, chunk)
        rank_of = torch.full((k,), num, dtype=torch.long, device=x.device)
        rank_of[losers] = torch.arange(num, device=x.device)
        ok = rank_of[partner] >= torch.arange(num, device=x.device)
        util_sorted, losers = util_sorted[ok], losers[ok]
        num = min(num, losers.numel())
        swap = (gain[:num] > 2.0 * util_sorted[:num]).to(torch.long).cumprod(0).bool()
        if not bool(swap.any()):
            return False
        codes, new = losers[:num][swap], xc[:num][swap].to(self.codebook.dtype)
        self.num_relocated += codes.numel()
        size = captured[:num][swap].clamp_min(self.threshold_ema_dead_code).to(self.cluster_size.dtype)
        self.codebook.data[codes] = new
        self.cluster_size[codes] = size
        self.embed_sum[codes] = new * size[:, None]
        self.utility[codes] = gain[:num][swap].to(self.utility.dtype)
        return True

    # ----------------------------------------------------------------- checkpoints
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
        if key in state_dict and tuple(state_dict[key].shape) != tuple(self.codebook.shape):
            theirs = list(state_dict[key].shape)
            raise RuntimeError(
                f"cannot load ScalableVQ checkpoint: its codebook has shape {theirs} "
                f"(codebook_size={theirs[0] if theirs else '?'}, dim={theirs[1] if len(theirs) > 1 else '?'}) "
                f"but this module's codebook has shape {list(self.codebook.shape)} "
                f"(codebook_size={self.num_codes}, dim={self.dim})"
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self._initted = bool(self.initted)
