"""Test data shared by the tests: Gaussian mixtures, a codebook of their points, hierarchy and layers, a trained module."""

from __future__ import annotations

import torch

from svq_modules.hierarchy import build_hierarchy, code_statistics
from svq_modules.layers import build_layers
from svq_modules.nn import ScalableVQ


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


def mixture(seed: int, n: int = 4096, k: int = 16, d: int = 4, sep: float = 6.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` points of a ``k``-component Gaussian mixture (unit variance) and its centers."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=g) * sep
    labels = torch.randint(k, (n,), generator=g)
    return centers[labels] + torch.randn(n, d, generator=g), centers


def train(vq: ScalableVQ, x: torch.Tensor, epochs: int = 3, batch: int = 512, seed: int = 0) -> ScalableVQ:
    g = torch.Generator().manual_seed(seed)
    vq.train()
    for _ in range(epochs):
        for b in x[torch.randperm(x.shape[0], generator=g)].split(batch):
            vq(b)
    return vq.eval()
