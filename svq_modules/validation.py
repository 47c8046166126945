"""Input checks shared by the package: clear ``ValueError`` s instead of wrong answers."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "PROPOSALS",
    "MAX_LAYER_BITS",
    "BitProposal",
    "check_int",
    "check_bool",
    "check_choice",
    "check_weight",
    "check_layer_weights",
    "check_finite",
    "check_codebook",
    "check_indices",
    "check_vectors",
    "check_bits_list",
    "working_dtype",
    "dataclass_fields",
    "check_bit_proposal",
]

#: named bit proposals (see :func:`svq_modules.layers.resolve_bits`)
PROPOSALS = ("balanced_clusters", "balanced_values")
#: the most bits one layer may take (2**24 cells: far more than any codebook needs)
MAX_LAYER_BITS = 24

BitProposal = Union[Sequence[int], int, str, Callable[..., Sequence[int]]]


def check_int(value: Any, name: str, *, min: int | None = None, max: int | None = None) -> int:
    """The one int-range check: ``value`` as a Python int in ``[min, max]``.

    Accepts Python and NumPy ints and 0-d integer tensors (anything with
    ``__index__``), never bools or floats. Raises ``ValueError`` naming the
    argument, the value and the allowed range.
    """
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise ValueError(f"{name} must be {_int_range(min, max)}, got {value!r}")
    out = int(value.__index__())
    if (min is not None and out < min) or (max is not None and out > max):
        raise ValueError(f"{name} must be {_int_range(min, max)}, got {out}")
    return out


def check_bool(value: Any, name: str) -> bool:
    """The one switch check: ``value`` as a Python bool.

    Accepts ``True`` / ``False`` (and NumPy bools), never ints, strings or None, whose
    truth value would silently pick a side (``bool("no")`` is True). Raises
    ``ValueError`` naming the argument and the value.
    """
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be a bool (True or False), got {value!r}")
    return bool(value)


def check_weight(value: Any, name: str) -> float:
    """The one check of a non-negative weight: ``value`` as a finite Python float >= 0.

    Accepts Python and NumPy ints and floats, never bools, strings, NaN or Inf. Raises
    ``ValueError`` naming the argument and the value.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)) or not (
            0.0 <= float(value) < math.inf):  # fmt: skip
        raise ValueError(f"{name} must be a finite float >= 0, got {value!r}")
    return float(value)


def check_layer_weights(value: Any, num_layers: int, name: str = "layer_weights") -> list[float]:
    """``value`` as ``num_layers`` Python floats >= 0 (:func:`check_weight` each), not all 0: one weight per layer.

    Raises ``ValueError`` naming the argument, the value and what is allowed.
    """
    allowed = f"{num_layers} finite numbers >= 0 (one per layer), not all 0"
    if isinstance(value, (np.ndarray, Tensor)):
        if value.ndim != 1:
            raise ValueError(f"{name} must be {allowed}, got a {type(value).__name__} of shape {list(value.shape)}")
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != num_layers:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    weights = [check_weight(v, f"{name}[{i}]") for i, v in enumerate(value)]
    if not any(weights):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return weights


def check_choice(value: Any, name: str, allowed: Sequence[Any]) -> Any:
    """The one check of a setting that takes one of a few values: ``value`` if it is in ``allowed``.

    Raises ``ValueError`` naming the argument, the allowed values and the value
    (also for unhashable values, which are never allowed).
    """
    try:
        ok = value in allowed
    except TypeError:  # e.g. a list against the keys of a dict
        ok = False
    if not ok:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def _int_range(lo: int | None, hi: int | None) -> str:
    if lo is not None and hi is not None:
        return f"an int in [{lo}, {hi}]"
    if lo == 1:
        return "a positive int"
    if lo is not None:
        return f"an int >= {lo}"
    if hi is not None:
        return f"an int <= {hi}"
    return "an int"


def check_finite(t: Tensor, name: str) -> None:
    """Raise ``ValueError`` if a float tensor holds NaN or Inf."""
    if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
        bad = "NaN" if bool(torch.isnan(t).any()) else "Inf"
        raise ValueError(f"{name} contains {bad} values")


# unsigned integer dtypes wider than uint8 (torch >= 2.3 has them)
_WIDE_UNSIGNED = tuple(d for d in (getattr(torch, n, None) for n in ("uint16", "uint32", "uint64")) if d is not None)


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to accumulate statistics and build trees in: float32 for float16 / bfloat16 (whose sums of
    data counts and squared distances overflow or stop growing: float16 holds at most 65504 and adds 1 to
    2048 no more), else ``dtype`` itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def dataclass_fields(cls: type, tensors: Any) -> dict[str, Any]:
    """The entries of ``tensors`` (a mapping) that the dataclass ``cls`` takes, by field name; ``ValueError``
    naming the missing ones (the one check of ``from_dict`` of the package's tensor records)."""
    if not hasattr(tensors, "keys"):
        raise ValueError(f"{cls.__name__}.from_dict needs a dict of tensors, got {type(tensors).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ValueError(f"{cls.__name__}.from_dict: missing {missing} (expected the keys {names})")
    return {n: tensors[n] for n in names}


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
    if indices.dtype in _WIDE_UNSIGNED:  # torch has no min / max for these
        indices = indices.long()  # exact below 2**63 (larger uint64 values turn negative: out of range below)
    if indices.numel():
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= num_codes:
            raise ValueError(f"{name} out of range: values in [{lo}, {hi}] but the codebook has {num_codes} codes")
    return indices.long()


def check_bits_list(bits: Any, name: str = "bits") -> list[int]:
    """A non-empty list of ints in ``[1, MAX_LAYER_BITS]`` (a tensor or NumPy array works too)."""
    if isinstance(bits, (str, bytes)):
        raise ValueError(f"{name} must be a list of positive ints such as [4, 2, 2], got {bits!r}")
    try:
        values = bits.tolist() if hasattr(bits, "tolist") else list(bits)
    except TypeError:
        raise ValueError(f"{name} must be a list of positive ints such as [4, 2, 2], got {bits!r}") from None
    if not isinstance(values, list):
        values = [values]
    if not values:
        raise ValueError(f"{name} is empty: need at least the base layer's bits")
    out = []
    for b in values:
        if isinstance(b, bool) or not hasattr(b, "__index__"):
            raise ValueError(f"{name} must hold ints, got {b!r} in {values}")
        b = int(b)
        if b <= 0:
            raise ValueError(f"{name} must be positive ints (> 0): every layer needs at least 1 bit, got {b} in {values}")
        if b > MAX_LAYER_BITS:
            raise ValueError(
                f"{name}: {b} bits in one layer is more than any codebook needs (at most {MAX_LAYER_BITS}), got {values}"
            )
        out.append(b)
    return out


def check_bit_proposal(
    bits: Any, num_layers: Any = None, *, need_num_layers: bool = True, name: str = "bits"
) -> tuple[list[int] | int | str | Callable[..., Sequence[int]], int | None]:
    """The one bit-proposal check (module, functional API, Lightning, command line).

    Args:
        bits: a list/tuple of ints in ``[1, 24]`` (base layer first; a final
            layer reaching every codeword is added), an int (that many bits per
            layer), one of :data:`PROPOSALS`, or a callable
            ``f(hierarchy, num_listed) -> list[int]``.
        num_layers: L, total layers including the final one: an int >= 2, or
            None. With a list it must equal ``len(bits) + 1``.
        name: the argument's name in messages (e.g. ``"--bits"``, ``"n_bits_proposal"``).
        need_num_layers: whether anything but a list must come with
            ``num_layers`` (True where buffer shapes depend on it, as in the
            module; the functional API passes False: an int then repeats
            until every leaf is reached, a name defaults to 5 layers).

    Returns:
        ``(bits, num_layers)``: a list of ints or the int / name / callable as
        given, and L (``len(bits) + 1`` for a list, else ``num_layers``).

    Raises:
        ValueError: one line naming the argument, the value and what is allowed.
    """
    if num_layers is not None:
        num_layers = check_int(num_layers, "num_layers (base layer + final layer at least)", min=2)
    hint = f"expected a list of ints in [1, {MAX_LAYER_BITS}] such as [4, 2, 2, 2, 2], an int, one of {PROPOSALS} or a callable"
    if bits is None or isinstance(bits, (bool, bytes)):
        raise ValueError(f"{name}={bits!r} is not a bit proposal; {hint}")
    if isinstance(bits, str):
        if bits not in PROPOSALS:
            raise ValueError(f"{name}={bits!r} is not a bit proposal; {hint}")
    elif hasattr(bits, "__index__") and getattr(bits, "ndim", 0) == 0:  # int, NumPy / 0-d tensor scalar
        bits = check_bits_list([bits], name)[0]
    elif callable(bits):
        pass
    else:
        try:
            bits = check_bits_list(bits, name)
        except ValueError as e:
            raise ValueError(f"{e}; {hint}") from None
        if num_layers is not None and num_layers != len(bits) + 1:
            raise ValueError(
                f"{name}={bits} make {len(bits) + 1} layers (the final layer is added) but num_layers={num_layers}"
            )
        return bits, len(bits) + 1
    if num_layers is None and (need_num_layers or callable(bits)):
        raise ValueError(
            f"{name}={bits!r} does not fix the number of layers: pass num_layers (an int >= 2, final layer included)"
        )
    return bits, num_layers
