"""The one nearest-codeword search of the package (pure tensor function)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["DEFAULT_CHUNK_ELEMENTS", "nearest_codewords"]

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
