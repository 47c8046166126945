"""Test data shared by the bitstream tests: a Gaussian mixture, a codebook of its points, hierarchy and layers."""

from __future__ import annotations

import torch

from svq_modules.hierarchy import build_hierarchy, code_statistics
from svq_modules.layers import build_layers


def gaussian_codes(seed: int, n: int, k: int, d: int = 3, dtype: torch.dtype = torch.float32):
    """``(x [n, d], codebook [k, d], indices [n])``: 6 Gaussian blobs, ``k`` of the points as codewords, nearest codes."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(6, d, generator=g, dtype=dtype) * 4
    x = centers[torch.randint(0, 6, (n,), generator=g)] + torch.randn(n, d, generator=g, dtype=dtype)
    codebook = x[torch.randperm(n, generator=g)[:k]].clone()
    return x, codebook, torch.cdist(x, codebook).argmin(1)


def make_model(seed: int, n: int = 400, k: int = 32, d: int = 3, bits=(2, 1, 1), cut: str = "greedy"):
    """``(x, hierarchy, tables, indices)`` of :func:`gaussian_codes` with layers of ``bits``."""
    x, codebook, idx = gaussian_codes(seed, n, k, d)
    counts, sums = code_statistics(x, idx, k)
    h = build_hierarchy(codebook, counts, sums)
    return x, h, build_layers(h, list(bits), cut=cut), idx
