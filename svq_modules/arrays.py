"""The one array loader / writer of the package (``.npy``, ``.npz``, ``.pt``).

Used by the command line (``compress`` / ``decompress``) and by the Lightning
:class:`~svq_modules.lightning.data.VectorDataModule`.

* :func:`load_array` -- a finite, real, non-empty numeric array of at least 2 dims
  ``[..., D]`` from ``.npy`` (``numpy.load(allow_pickle=False)``), ``.npz`` (one named
  entry) or ``.pt`` / ``.pth`` (a tensor, an array, or a dict of them saved with
  ``torch.save``; loaded with ``weights_only=True``). The dtype is kept (bfloat16 and
  float16 tensors become float32: NumPy has no bfloat16).
* :func:`save_array` -- writes ``.npy``, ``.npz`` (entry ``"array"``) or ``.pt`` (a
  tensor) atomically through :func:`svq_modules.coding.container.atomic_write`.

Errors are one line naming the file and what is wrong: ``FileNotFoundError`` for a
missing file, ``ValueError`` for everything else.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .coding.container import atomic_write

__all__ = ["ARRAY_SUFFIXES", "load_array", "save_array"]

#: file types :func:`load_array` reads and :func:`save_array` writes
ARRAY_SUFFIXES = (".npy", ".npz", ".pt", ".pth")

#: entry name :func:`save_array` gives the array in an ``.npz`` file
NPZ_KEY = "array"


def _entry(names: Iterable[str], key: str | None, path: Path) -> str:
    """The entry of a multi-array file to read: ``key``, else the only / first one."""
    names = [str(n) for n in names]
    if not names:
        raise ValueError(f"{path}: the file holds no arrays")
    name = names[0] if key is None else str(key)
    if name not in names:
        raise ValueError(f"{path}: no array named {name!r} (key={key!r}); the file holds {names}")
    return name


def _as_numpy(obj: Any, path: Path) -> np.ndarray:
    if torch.is_tensor(obj):
        obj = obj.detach().cpu()
        if obj.dtype in (torch.bfloat16, torch.float16):
            obj = obj.float()
        return obj.numpy()
    if isinstance(obj, np.ndarray):
        return obj
    raise ValueError(f"{path}: expected a tensor or an array saved with torch.save, got {type(obj).__name__}")


def _read(path: Path, key: str | None) -> np.ndarray:
    suffix = path.suffix.lower()
    if suffix == ".npy":
        if key is not None:
            raise ValueError(f"{path}: key={key!r} only applies to .npz and dict .pt files")
        try:
            return np.load(path, allow_pickle=False)
        except ValueError as e:
            raise ValueError(f"{path}: not a plain .npy array ({e})") from None
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as archive:
                return archive[_entry(archive.files, key, path)]
        except ValueError as e:
            raise ValueError(str(e) if str(e).startswith(str(path)) else f"{path}: not a plain .npz archive ({e})") from None
    if suffix in (".pt", ".pth"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle errors, unsupported globals, truncated zip...
            raise ValueError(f"{path}: not a torch.save file of tensors / arrays (torch.load with weights_only=True "
                             f"failed: {type(e).__name__})") from None
        if isinstance(obj, dict):
            obj = obj[_entry(obj.keys(), key, path)]
        elif key is not None:
            raise ValueError(f"{path}: key={key!r} given but the file holds a {type(obj).__name__}, not a dict")
        return _as_numpy(obj, path)
    raise ValueError(f"{path}: unsupported file type {path.suffix!r} (use {', '.join(ARRAY_SUFFIXES)})")


def load_array(path: str | os.PathLike, key: str | None = None) -> np.ndarray:
    """Read a numeric array ``[..., D]`` (at least 2-D) from ``.npy`` / ``.npz`` / ``.pt``.

    Args:
        path: the file (``~`` is expanded).
        key: entry of an ``.npz`` archive or of a dict saved with ``torch.save``
            (default: the only / first entry). Not allowed for ``.npy`` files.

    Returns:
        ``np.ndarray`` of shape ``[..., D]``, ``ndim >= 2``, ``D >= 1``, non-empty, a
        real integer or floating dtype (kept as stored), finite.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: unsupported type, unreadable file, unknown key, wrong shape / dtype,
            empty, NaN or Inf.
    """
    p = Path(os.fspath(path)).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file")
    arr = np.asarray(_read(p, key))
    if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{p}: expected a real numeric array, got dtype {arr.dtype}")
    if arr.ndim < 2 or arr.shape[-1] < 1:
        raise ValueError(f"{p}: expected an [N, D] array, got shape {list(arr.shape)}")
    if arr.size == 0:
        raise ValueError(f"{p}: the array is empty (shape {list(arr.shape)})")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        bad = "NaN" if np.isnan(arr).any() else "Inf"
        raise ValueError(f"{p}: the array contains {bad} values")
    return arr


def save_array(path: str | os.PathLike, array: np.ndarray | torch.Tensor) -> None:
    """Write ``array`` atomically as ``.npy``, ``.npz`` (entry ``"array"``) or ``.pt`` (a tensor).

    The file appears complete or not at all (temporary file, then rename); a previous
    file of that name is kept on error.

    Raises:
        ValueError: unsupported file type.
    """
    p = Path(os.fspath(path)).expanduser()
    arr = array.detach().cpu().numpy() if torch.is_tensor(array) else np.asarray(array)
    suffix = p.suffix.lower()
    if suffix == ".npy":
        atomic_write(p, lambda f: np.save(f, arr, allow_pickle=False))
    elif suffix == ".npz":
        atomic_write(p, lambda f: np.savez(f, **{NPZ_KEY: arr}))
    elif suffix in (".pt", ".pth"):
        atomic_write(p, lambda f: torch.save(torch.from_numpy(np.ascontiguousarray(arr)), f))
    else:
        raise ValueError(f"{p}: unsupported output type {p.suffix!r} (use {', '.join(ARRAY_SUFFIXES)})")
