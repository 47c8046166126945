"""Input handling of the seed-compatible API: array-likes in, checked tensors out.

Users of the seed's API usually hold NumPy arrays (e.g. scikit-learn's
``KMeans.cluster_centers_`` / ``labels_``), so every array argument accepts a
``torch.Tensor``, a NumPy array or a nested list. Conversion keeps the dtype
(float64 stays float64; lists of Python floats become float64 too) and places
the result on the codebook's device. Every failure is one ``ValueError``
naming the argument and saying what to pass.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..validation import check_indices, check_vectors

__all__ = ["as_tensor", "check_centers", "check_data", "check_quantized", "check_inputs"]

_KINDS = {
    "centers": "a [K, D] float array (torch.Tensor, NumPy array such as KMeans.cluster_centers_, or nested list)",
    "data": "a [N, D] float array (torch.Tensor, NumPy array or nested list)",
    "indices": "a [N] integer array of codeword indices (torch.Tensor, NumPy array such as KMeans.labels_, or list)",
}


def as_tensor(value: Any, name: str, kind: str, device: torch.device | None = None) -> Tensor:
    """``value`` as a tensor without changing its dtype.

    Args:
        value: a tensor (returned as is), a NumPy array or anything
            ``numpy.asarray`` takes (nested lists: Python floats become float64).
        name: the argument's name, for the error message.
        kind: ``"centers"``, ``"data"`` or ``"indices"`` (what to ask for).
        device: where to put a converted (non-tensor) value.

    Raises:
        ValueError: ``value`` is no numeric array.
    """
    if torch.is_tensor(value):
        return value
    want = _KINDS[kind]
    if value is None or isinstance(value, (str, bytes, dict)):
        raise ValueError(f"{name} must be {want}, got {type(value).__name__}")
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as e:  # ragged nested lists
        raise ValueError(f"{name} must be {want}; it could not be read as one ({e})") from None
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be {want}, got a {type(value).__name__} of dtype {arr.dtype}")
    if not arr.flags.writeable or any(s < 0 for s in arr.strides) or arr.dtype.byteorder not in "=|":
        arr = np.array(arr, dtype=arr.dtype.newbyteorder("="), order="C", copy=True)
    out = torch.from_numpy(arr)
    return out if device is None else out.to(device)


def check_centers(cluster_centers: Any, name: str = "cluster_centers") -> Tensor:
    """``cluster_centers`` as a ``[K, D]`` float tensor: K, D >= 1, finite."""
    centers = as_tensor(cluster_centers, name, "centers")
    if centers.dim() != 2:
        hint = f" (for scalar codewords pass {name}.reshape(-1, 1))" if centers.dim() == 1 else ""
        raise ValueError(f"{name} must be [K, D], got shape {list(centers.shape)}{hint}")
    if centers.shape[1] == 0:
        raise ValueError(f"{name} has dimension 0: shape {list(centers.shape)}")
    if not centers.is_floating_point():
        raise ValueError(
            f"{name} must hold floats, got dtype {centers.dtype}; pass e.g. {name}.astype(numpy.float64) or .double()"
        )
    return check_vectors(centers, name=name)


def check_data(data: Any, codebook: Tensor, name: str = "data") -> Tensor:
    """``data`` as ``[N, D]`` in the codebook's dtype and device (N >= 1, finite).

    Integer data (e.g. ``uint8`` pixels) is converted to the codebook's dtype;
    float data is computed in the codebook's precision so that the leaves stay
    the exact codewords.
    """
    x = as_tensor(data, name, "data", device=codebook.device)
    if x.dim() != 2:
        hint = f" (for scalar data pass {name}.reshape(-1, 1))" if x.dim() == 1 else ""
        raise ValueError(f"{name} must be [N, D] (one row per vector), got shape {list(x.shape)}{hint}")
    if x.dtype == torch.bool or x.is_complex():
        raise ValueError(f"{name} must hold real numbers, got dtype {x.dtype}")
    if x.device != codebook.device:
        raise ValueError(f"{name} is on {x.device} but cluster_centers on {codebook.device}; move them to one device")
    x = check_vectors(x if x.is_floating_point() else x.to(codebook.dtype), dim=codebook.shape[1], name=name)
    return x.to(codebook.dtype)


def check_quantized(
    quantized_data: Any, num_codes: int, device: torch.device, expected_len: int | None = None, name: str = "quantized_data"
) -> Tensor:
    """``quantized_data`` as ``[N]`` int64 codeword indices in ``[0, num_codes)``, N >= 1, on ``device``."""
    indices = as_tensor(quantized_data, name, "indices", device=device)
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise ValueError(
            f"{name} must hold integer codeword indices, got dtype {indices.dtype}; "
            f"pass e.g. {name}.astype(numpy.int64) or .long()"
        )
    if indices.dim() != 1:
        raise ValueError(f"{name} must be 1-D [N] (one codeword index per vector), got shape {list(indices.shape)}")
    if indices.numel() == 0:
        raise ValueError(f"{name} is empty: need at least one vector")
    if indices.device != device:
        raise ValueError(f"{name} is on {indices.device} but cluster_centers on {device}; move them to one device")
    return check_indices(indices, num_codes, expected_len=expected_len, name=name)


def check_inputs(data: Any, quantized_data: Any, cluster_centers: Any) -> tuple[Tensor | None, Tensor, Tensor]:
    """Checked ``(data [N, D] | None, indices [N] int64, codebook [K, D])`` of an encoding call.

    ``data`` comes back in the codebook's dtype, everything on its device.
    """
    codebook = check_centers(cluster_centers)
    x = None if data is None else check_data(data, codebook)
    expected = None if x is None else x.shape[0]
    indices = check_quantized(quantized_data, codebook.shape[0], codebook.device, expected_len=expected)
    return x, indices, codebook
