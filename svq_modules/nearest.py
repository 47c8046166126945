"""Codeword choice (pure tensor functions): the one nearest-codeword search of the package, the mean error of a
choice, and the choice on a grid that may repeat a neighbour's codeword."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["DEFAULT_CHUNK_ELEMENTS", "layered_codebook", "mean_squared_error", "nearest_codewords", "prefer_neighbours"]

#: largest ``[rows, K]`` distance block (elements) of one step of the search
DEFAULT_CHUNK_ELEMENTS = 1 << 23


def nearest_codewords(
    x: Tensor,
    codebook: Tensor,
    *,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    with_gap: bool = False,
    bias: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Nearest codeword of every row of ``x``, in blocks of rows.

    Distances are ``0.5 ||c||^2 - x.c`` from one ``addmm`` per block (the
    ``||x||^2`` term does not change the argmin), so the extra memory is one
    ``[rows, K]`` block with ``rows * K <= chunk_elements`` (at least one row).

    Args:
        x: ``[N, D]`` float.
        codebook: ``[K, D]`` float, same dtype and device as ``x``.
        chunk_elements: largest distance block in elements (a memory knob; the
            result does not depend on it).
        with_gap: also return ``gap [N]``: the squared distance to the second
            nearest codeword minus that to the nearest (the error added if the
            nearest codeword were removed; ``inf`` when K == 1).
        bias: ``[K]`` float added to every squared distance to codeword ``k``
            (e.g. a rate penalty; the pick is then the least ``||x - c_k||^2 + bias_k``,
            and ``gap`` compares those sums).

    Returns:
        ``(indices [N] int64, gap [N] | None)``; ties go to the lowest index.
    """
    half_sq = 0.5 * codebook.pow(2).sum(1)
    if bias is not None:
        if tuple(bias.shape) != (codebook.shape[0],):
            raise ValueError(f"bias must be [K] = [{codebook.shape[0]}] (one per codeword), got shape {list(bias.shape)}")
        half_sq = half_sq + 0.5 * bias.to(half_sq)
    ct = codebook.t()
    rows = max(1, int(chunk_elements) // max(1, codebook.shape[0]))

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


def layered_codebook(centers: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """One codebook and a per-code bias that stand for a weighted error over several reconstructions of each code.

    With the weights normalised to sum 1, for every ``x``:
    ``sum_l w_l ||x - centers[l, k]||^2 = ||x - c_k||^2 + bias_k`` where ``c_k = sum_l w_l centers[l, k]`` and
    ``bias_k = sum_l w_l ||centers[l, k] - c_k||^2`` (the spread of code ``k``'s reconstructions, >= 0). So
    :func:`nearest_codewords` with ``codebook=c`` and ``bias`` picks the code of least weighted error, e.g. of
    least error summed over a scalable code's layers (:meth:`~svq_modules.nn.quantizer.ScalableVQ.quantize`).

    Args:
        centers: ``[L, K, D]`` float, ``centers[l, k]``: reconstruction ``l`` of code ``k``.
        weights: ``[L]`` float >= 0, not all 0.

    Returns:
        ``(codebook [K, D], bias [K])`` in the dtype of ``centers``.
    """
    w = weights.double()
    if not bool((w >= 0).all()) or not float(w.sum()) > 0:
        raise ValueError(f"weights must be >= 0 and not all 0, got {w.tolist()}")
    w = w / w.max()  # first: a sum of huge finite weights must not overflow
    w = (w / w.sum()).to(centers)
    codebook = torch.einsum("l,lkd->kd", w, centers)
    bias = torch.einsum("l,lk->k", w, (centers - codebook).pow(2).sum(-1))
    return codebook, bias


def mean_squared_error(x: Tensor, codebook: Tensor, indices: Tensor) -> float:
    """Mean over the rows of ``x [N, D]`` of the squared distance to their codewords ``codebook[indices [N]]``,
    summed in float64 (a far row in float16 must not overflow it)."""
    chosen = codebook.detach()[indices.reshape(-1)]
    dtype = torch.promote_types(x.dtype, torch.float32)
    return float((x.reshape(-1, x.shape[-1]).to(dtype) - chosen.to(dtype)).pow(2).sum(-1).double().mean())


def prefer_neighbours(
    x: Tensor, codebook: Tensor, chosen: Tensor, bits: Tensor, lam: float, repeat: float, bias: Tensor | None = None
) -> Tensor:
    """Codewords on a grid, where repeating the left or upper neighbour's codeword may be cheaper.

    A context coder (:mod:`svq_modules.coding.context`) codes a symbol that repeats its left or upper
    neighbour's for less. In its order (by anti-diagonal, so both neighbours are final first), every vector
    keeps the least of ``||x - c_k||^2 + bias_k + lam * bits_k`` for its ``chosen`` codeword ``k`` and
    ``||x - c_n||^2 + bias_n + lam * repeat * bits_n`` for ``n`` its left or upper neighbour's codeword: ``H + W - 1``
    vectorized rounds, none per vector.

    Args:
        x: ``[..., H, W, D]`` float vectors on a grid.
        codebook: ``[K, D]`` float.
        chosen: ``[..., H, W]`` int64 codewords to start from (e.g. an entropy-constrained choice).
        bits: ``[K]`` float code length of each codeword.
        lam: weight of a bit, in squared distance (>= 0).
        repeat: share of a repeated codeword's bits that counts, in ``[0, 1]`` (1: no preference).
        bias: optional ``[K]`` float added to every codeword's error, repeated or not (e.g. the spread of
            :func:`layered_codebook`).

    Returns:
        ``[..., H, W]`` int64 codewords.
    """
    *batch, h, w, dim = x.shape
    xf = x.reshape(-1, h, w, dim)
    cb = codebook.detach().to(torch.promote_types(x.dtype, torch.float32))
    bits = bits.to(cb)
    spread = torch.zeros_like(bits) if bias is None else bias.to(cb)
    out = chosen.reshape(-1, h, w).clone()
    rows = torch.arange(h, device=x.device)
    for s in range(h + w - 1):
        i = rows[max(0, s - w + 1): min(h, s + 1)]
        j = s - i
        xd = xf[:, i, j].to(cb.dtype)  # [B, n, D]
        best_k = out[:, i, j]
        best = (xd - cb[best_k]).pow(2).sum(-1) + spread[best_k] + lam * bits[best_k]
        for di, dj in ((0, 1), (1, 0)):  # left, upper
            ok = (i >= di) & (j >= dj)
            if not bool(ok.any()):
                continue
            nb = out[:, (i - di).clamp_min(0), (j - dj).clamp_min(0)]
            cost = (xd - cb[nb]).pow(2).sum(-1) + spread[nb] + lam * repeat * bits[nb]
            take = ok & (cost < best)
            best_k, best = torch.where(take, nb, best_k), torch.where(take, cost, best)
        out[:, i, j] = best_k
    return out.reshape(*batch, h, w)
