"""Input checks shared by the package: clear ``ValueError`` s instead of wrong answers."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_finite", "check_codebook", "check_indices", "check_vectors", "check_bits_list"]


def check_finite(t: Tensor, name: str) -> None:
    """Raise ``ValueError`` if a float tensor holds NaN or Inf."""
    if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
        bad = "NaN" if bool(torch.isnan(t).any()) else "Inf"
        raise ValueError(f"{name} contains {bad} values")


def check_codebook(codebook: Tensor) -> Tensor:
    """``codebook: [K, D] float``, finite, K >= 1, D >= 1."""
    if not torch.is_tensor(codebook):
        raise ValueError(f"codebook must be a torch.Tensor, got {type(codebook).__name__}")
    if codebook.dim() != 2:
        raise ValueError(f"codebook must be [K, D], got shape {list(codebook.shape)}")
    if codebook.shape[0] == 0 or codebook.shape[1] == 0:
        raise ValueError(f"codebook is empty: shape {list(codebook.shape)}")
    if not codebook.is_floating_point():
        raise ValueError(f"codebook must be a floating point tensor, got dtype {codebook.dtype}")
    check_finite(codebook, "codebook")
    return codebook


def check_vectors(x: Tensor, dim: int | None = None, name: str = "x") -> Tensor:
    """``x: [N, D] float`` with N >= 1, finite, D == dim when given."""
    if not torch.is_tensor(x):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be [N, D], got shape {list(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty: need at least one vector")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating point tensor, got dtype {x.dtype}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} has dimension {x.shape[1]}, expected {dim}")
    check_finite(x, name)
    return x


def check_indices(indices: Tensor, num_codes: int, expected_len: int | None = None, name: str = "indices") -> Tensor:
    """``indices: [N] int`` in ``[0, num_codes)``; returned as int64."""
    if not torch.is_tensor(indices):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(indices).__name__}")
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got dtype {indices.dtype}")
    if indices.dim() != 1:
        raise ValueError(f"{name} must be 1-D [N], got shape {list(indices.shape)}")
    if expected_len is not None and indices.shape[0] != expected_len:
        raise ValueError(f"{name} has {indices.shape[0]} entries but there are {expected_len} vectors")
    if indices.numel():
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= num_codes:
            raise ValueError(f"{name} out of range: values in [{lo}, {hi}] but the codebook has {num_codes} codes")
    return indices.long()


def check_bits_list(bits: list[int], name: str = "bits") -> list[int]:
    """A non-empty list of positive ints."""
    try:
        values = list(bits)
    except TypeError:
        raise ValueError(f"{name} must be a list of positive ints, got {bits!r}") from None
    if not values:
        raise ValueError(f"{name} is empty: need at least the base layer's bits")
    out = []
    for b in values:
        if isinstance(b, bool) or not hasattr(b, "__index__"):
            raise ValueError(f"{name} must hold ints, got {b!r} in {values}")
        b = int(b)
        if b <= 0:
            raise ValueError(f"{name} must be positive ints (> 0): every layer needs at least 1 bit, got {b} in {values}")
        out.append(b)
    return out
