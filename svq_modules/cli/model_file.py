"""ScalableVQ <-> model bytes: ``--model`` / ``--save-model`` files and the model section of ``.svq`` files.

A model file is ``torch.save({"format": MODEL_FORMAT, "version": MODEL_VERSION,
"config": {...}, "state_dict": {...}})``; a plain ``ScalableVQ.state_dict()``
saved with ``torch.save`` loads too (the flat key layout of the first version and
whatever key layout :class:`~svq_modules.nn.ScalableVQ` writes today), and so does a
Lightning checkpoint holding one ScalableVQ (``train.py``'s, through
:func:`svq_modules.lightning.extract_quantizer`).
"""

from __future__ import annotations

import io
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from .errors import CLIError, one_line

__all__ = ["MODEL_FORMAT", "MODEL_VERSION", "load_model", "model_from_bytes", "model_to_bytes", "pack_model", "unpack_model"]

MODEL_FORMAT = "svq_modules.ScalableVQ"
MODEL_VERSION = 1

# key names of the codebook [K, D] and the layer widths [L] in a plain state_dict of the first version
_FLAT_CODEBOOK_KEY = "codebook"
_FLAT_WIDTHS_KEY = "layers_widths"


def model_to_bytes(vq: Any) -> bytes:
    """Serialize a built ScalableVQ: ``torch.save({"format", "version", "config", "state_dict"})``."""
    tables = vq.tables
    config = {
        "dim": int(vq.dim),
        "codebook_size": int(vq.codebook_size),
        "bits": [int(w) for w in tables.widths[:-1].tolist()],
        "num_layers": int(vq.num_layers),
    }
    buf = io.BytesIO()
    state = {k: v.detach().cpu() for k, v in vq.state_dict().items()}
    torch.save({"format": MODEL_FORMAT, "version": MODEL_VERSION, "config": config, "state_dict": state}, buf)
    return buf.getvalue()


def pack_model(vq: Any) -> bytes:
    """Model section of a ``.svq`` file: :func:`model_to_bytes`, zlib-compressed."""
    return zlib.compress(model_to_bytes(vq), 9)


def unpack_model(data: bytes, what: str) -> Any:
    """Inverse of :func:`pack_model`; ``what`` names the source in error messages."""
    try:
        raw = zlib.decompress(data)
    except zlib.error as e:
        raise CLIError(f"{what}: corrupt model section ({e})") from None
    return model_from_bytes(raw, what)


@lru_cache(maxsize=1)
def _state_dict_keys() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Accepted key names of the codebook and of the layer widths: the first version's and today's."""
    from ..nn import ScalableVQ

    keys = list(ScalableVQ(1, 2, [1]).state_dict())
    codebook = [k for k in keys if k.split(".")[-1] == "codebook"]
    widths = [k for k in keys if k.split(".")[-1] in ("layers_widths", "widths")]
    return tuple(dict.fromkeys([_FLAT_CODEBOOK_KEY, *codebook])), tuple(dict.fromkeys([_FLAT_WIDTHS_KEY, *widths]))


def _find_tensor(state: dict, keys: tuple[str, ...]) -> torch.Tensor | None:
    for k in keys:
        if torch.is_tensor(state.get(k)):
            return state[k]
    return None


def _config_of_state_dict(obj: Any) -> dict[str, Any] | None:
    """The constructor arguments of a plain ScalableVQ state_dict, or None if ``obj`` is not one."""
    if not isinstance(obj, dict):
        return None
    codebook_keys, widths_keys = _state_dict_keys()
    codebook, widths = _find_tensor(obj, codebook_keys), _find_tensor(obj, widths_keys)
    if codebook is None or widths is None or codebook.dim() != 2 or widths.dim() != 1 or widths.numel() < 1:
        return None
    return {
        "dim": int(codebook.shape[1]),
        "codebook_size": int(codebook.shape[0]),
        "bits": [max(1, int(w)) for w in widths[:-1].tolist()],
        "num_layers": int(widths.shape[0]),
    }


def model_from_bytes(data: bytes, what: str = "model") -> Any:
    """Inverse of :func:`model_to_bytes`; also accepts a plain ``ScalableVQ.state_dict()`` (old or new key layout)
    and a Lightning checkpoint holding one ScalableVQ.

    Returns:
        A built ScalableVQ in eval mode, on the CPU.

    Raises:
        CLIError: not a model file, an unsupported version, or a model without hierarchy.
    """
    from ..nn import ScalableVQ

    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many kinds (UnpicklingError, RuntimeError, EOFError, ...)
        raise CLIError(f"{what}: not a model file, torch.load cannot read it ({one_line(e)})") from None
    if isinstance(obj, dict) and obj.get("format") == MODEL_FORMAT:
        if obj.get("version") != MODEL_VERSION:
            raise CLIError(f"{what}: unsupported model file version {obj.get('version')!r} (this reader reads {MODEL_VERSION})")
        config, state = obj.get("config"), obj.get("state_dict")
        if not isinstance(config, dict) or not isinstance(state, dict):
            raise CLIError(f"{what}: model file without its config or state_dict")
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict) and "pytorch-lightning_version" in obj:
        return _quantizer_of_checkpoint(obj, what)
    else:
        config, state = _config_of_state_dict(obj), obj
        if config is None:
            raise CLIError(f"{what}: not a ScalableVQ model file (expected {MODEL_FORMAT!r}, a ScalableVQ state_dict "
                           f"or a Lightning checkpoint holding one)")
    try:
        vq = ScalableVQ(config["dim"], config["codebook_size"], list(config["bits"]), num_layers=config["num_layers"])
        vq.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise CLIError(f"{what}: cannot load the model ({one_line(e)})") from None
    vq.eval()
    if not vq.is_built:  # not update()'s case: the layer widths of a never-built state are unknown
        raise CLIError(f"{what}: the model has no hierarchy yet (call update() before saving it)")
    return _fresh(vq, what)


def _fresh(vq: Any, what: str) -> Any:
    """``vq`` after ``update()``: a model saved after its codebook moved gets tables of that codebook.

    Encoder and decoder both load the file through here, so both rebuild the same
    tables; coding with the stale ones would decode to the old leaf centers, not
    to the codewords the data was quantized to.
    """
    try:
        vq.update()
    except (RuntimeError, ValueError) as e:
        raise CLIError(f"{what}: cannot build the model's hierarchy ({one_line(e)})") from None
    return vq


def _quantizer_of_checkpoint(ckpt: dict, what: str) -> Any:
    """The built ScalableVQ inside a Lightning checkpoint (``train.py``'s, or one of any module holding one)."""
    from ..lightning.checkpoints import extract_quantizer

    try:
        vq = extract_quantizer(ckpt)
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise CLIError(f"{what}: cannot take the quantizer of this Lightning checkpoint ({one_line(e)})") from None
    return _fresh(vq.float().cpu().eval(), what)


def load_model(path: str | Path, what: str | None = None) -> Any:
    """Read a model file (see :func:`model_from_bytes`); ``what`` names it in errors (default: the path)."""
    path = Path(path)
    what = str(path) if what is None else what
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CLIError(f"{what}: no such file") from None
    return model_from_bytes(data, what)
