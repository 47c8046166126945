"""Checkpoint helpers: the LightningModule of a checkpoint, the bare ScalableVQ of any checkpoint.

* :func:`load_lit_module` -- rebuild the LightningModule that wrote a checkpoint (this
  package's modules record their class; for your own module pass ``cls=``).
* :func:`extract_quantizer` -- the :class:`~svq_modules.nn.ScalableVQ` of *any*
  checkpoint (or state_dict) that holds one: its keys are found by their buffer names
  (today's ``learner.* / index.*`` layout and the older flat one), and the module is
  rebuilt from the stored shapes and layer widths, without importing the class of the
  LightningModule that wrote it.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch import Tensor

from ..nn import ScalableVQ
from .modules import ScalableVQAutoencoder, ScalableVQVectors
from .protocol import CLASS_KEY, find_quantizer

__all__ = [
    "extract_quantizer",
    "load_checkpoint",
    "load_lit_module",
    "module_class",
    "quantizer_from_state",
    "quantizer_prefixes",
]

_KNOWN: dict[str, type[L.LightningModule]] = {cls.__name__: cls for cls in (ScalableVQAutoencoder, ScalableVQVectors)}


def _read(path: str | os.PathLike, map_location: Any) -> Any:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        return torch.load(str(path), map_location=map_location, weights_only=True)
    except Exception as e:  # not a zip / pickle, objects weights_only refuses, truncated file
        raise ValueError(f"{path}: not a checkpoint torch.load(weights_only=True) can read ({type(e).__name__})") from None


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` of a Lightning checkpoint (a dict with a ``state_dict``).

    Raises ``FileNotFoundError`` / ``ValueError`` (one line) for a missing file or another kind of file.
    """
    ckpt = _read(path, map_location)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), Mapping):
        raise ValueError(f"{path} is not a Lightning checkpoint (no 'state_dict' entry)")
    return ckpt


def _init_params(cls: type) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters) - {"self"}


def module_class(ckpt: Mapping[str, Any]) -> type[L.LightningModule] | None:
    """The LightningModule class that wrote ``ckpt``, when this package can tell; else None.

    Read from the class name this package's modules store (:data:`CLASS_KEY`); without
    it, one of this package's modules is recognized by its exact set of hyper-parameters.
    """
    name = ckpt.get(CLASS_KEY)
    if name is None:
        hp = set(ckpt.get("hyper_parameters") or {})
        matches = [cls for cls in _KNOWN.values() if hp and hp == _init_params(cls)]
        return matches[0] if len(matches) == 1 else None
    module_name, _, qualname = str(name).rpartition(".")
    if qualname in _KNOWN and module_name == ScalableVQVectors.__module__:
        return _KNOWN[qualname]
    try:
        cls = getattr(importlib.import_module(module_name), qualname)
    except (ImportError, AttributeError):
        return None
    return cls if isinstance(cls, type) and issubclass(cls, L.LightningModule) else None


def load_lit_module(ckpt_path: str | os.PathLike, map_location: Any = "cpu",
                    cls: type[L.LightningModule] | None = None) -> L.LightningModule:
    """Rebuild the LightningModule of a checkpoint (in eval mode).

    Args:
        ckpt_path: the ``.ckpt`` file.
        map_location: as in ``torch.load``.
        cls: the LightningModule class; default: the class the checkpoint records
            (this package's modules), see :func:`module_class`.

    Raises:
        ValueError: the class cannot be told from the checkpoint and ``cls`` is None.
    """
    ckpt = load_checkpoint(ckpt_path)
    cls = cls or module_class(ckpt)
    if cls is None:
        raise ValueError(f"{ckpt_path}: cannot tell which LightningModule wrote this checkpoint; pass its class "
                         f"(cls=..., or module_class=package.module.Class for eval.py), or take its quantizer "
                         f"alone with extract_quantizer")
    return cls.load_from_checkpoint(str(ckpt_path), map_location=map_location, weights_only=True).eval()


# ----------------------------------------------------------------------------------------
# the ScalableVQ of any checkpoint
# ----------------------------------------------------------------------------------------

def _layouts() -> list[tuple[str, ...]]:
    """Relative key sets of a ScalableVQ state: today's layout, then the flat layout of format 1."""
    today = tuple(ScalableVQ(1, 2, bits=[1]).state_dict())
    flat = tuple(k.rsplit(".", 1)[-1] for k in today)
    return [today] if flat == today else [today, flat]


def _suffix(layout: tuple[str, ...], last: str) -> str:
    return next(k for k in layout if k.rsplit(".", 1)[-1] == last)


def quantizer_prefixes(state_dict: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    """``{prefix: relative keys}`` of every ScalableVQ state inside a (model's) ``state_dict``.

    A prefix is ``""`` for a bare ScalableVQ state, else the module path plus ``"."``
    (e.g. ``"quantizer."``, ``"model.vq."``). Found by the quantizer's buffer names,
    in today's layout (``learner.codebook``, ``index.layers_widths``, ...) or the
    older flat one (``codebook``, ``layers_widths``, ``tree_parent``, ...).
    """
    found: dict[str, tuple[str, ...]] = {}
    for layout in _layouts():
        anchor = _suffix(layout, "codebook")
        for key in state_dict:
            if not (key == anchor or key.endswith("." + anchor)):
                continue
            prefix = key[: len(key) - len(anchor)]
            if prefix not in found and all(prefix + k in state_dict for k in layout):
                found[prefix] = layout
    return found


def quantizer_from_state(state: Mapping[str, Tensor], **kwargs: Any) -> ScalableVQ:
    """A ScalableVQ holding ``state`` (one quantizer's state_dict, either layout), in eval mode.

    ``dim`` and ``codebook_size`` come from the codebook's shape, ``num_layers`` from the
    layer widths' shape and ``bits`` from the stored widths (all but the final layer's)
    when the hierarchy was built. ``kwargs`` go to the constructor (e.g. ``linkage``,
    ``cut``, ``channel_first``; ``bits`` / ``num_layers`` for a never-built state).
    """
    layout = next((lay for lay in _layouts() if all(k in state for k in lay)), None)
    if layout is None:
        raise ValueError("the state holds no ScalableVQ (no codebook / layers_widths / tree_parent entries)")
    codebook = state[_suffix(layout, "codebook")]
    widths = state[_suffix(layout, "layers_widths")]
    built = int(state[_suffix(layout, "built_version")]) >= 0 and bool((widths > 0).all())
    if codebook.dim() != 2 or widths.dim() != 1:
        raise ValueError(f"codebook of shape {list(codebook.shape)} / layer widths of shape {list(widths.shape)}: "
                         f"expected [K, D] and [L]")
    options = dict(kwargs)
    if "bits" not in options:
        if not built:
            raise ValueError("the quantizer in this state was never built (no layer widths stored): pass bits= "
                             "(and num_layers=) to rebuild it")
        options["bits"] = [int(w) for w in widths[:-1].tolist()]
    if isinstance(options["bits"], list) or "num_layers" not in options:
        options.setdefault("num_layers", int(widths.shape[0]))
    q = ScalableVQ(int(codebook.shape[1]), int(codebook.shape[0]), **options).to(codebook.dtype)
    q.load_state_dict({k: state[k] for k in layout})
    return q.eval()


def extract_quantizer(ckpt_path: str | os.PathLike | Mapping[str, Any], map_location: Any = "cpu",
                      name: str | None = None, **kwargs: Any) -> ScalableVQ:
    """The bare :class:`ScalableVQ` of a checkpoint (codebook, statistics, built hierarchy), in eval mode.

    Works on any Lightning checkpoint (or ``state_dict``, or a loaded checkpoint dict)
    holding a ScalableVQ's state, whatever the LightningModule around it. For this
    package's own modules the quantizer comes out exactly as the module built it
    (``channel_first`` and the ``model.quantizer`` options included); otherwise it is
    rebuilt from the state (see :func:`quantizer_from_state`; ``kwargs`` go there).

    Args:
        ckpt_path: ``.ckpt`` / ``.pt`` file, or an already loaded dict.
        map_location: as in ``torch.load``.
        name: module path of the quantizer (e.g. ``"quantizer"``, ``"model.vq"``) when
            the checkpoint holds several.

    Raises:
        ValueError: no ScalableVQ state in the checkpoint, or several and no ``name``.
    """
    source = "the checkpoint" if isinstance(ckpt_path, Mapping) else str(ckpt_path)  # never print a whole dict
    ckpt = ckpt_path if isinstance(ckpt_path, Mapping) else _read(ckpt_path, map_location)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, Mapping) else None
    if not isinstance(state, Mapping):
        raise ValueError(f"{source}: neither a checkpoint nor a state_dict")
    found = quantizer_prefixes(state)
    names = {p[:-1] if p else "": p for p in found}
    if not found:
        raise ValueError(f"{source}: holds no ScalableVQ state (no '<module>.codebook' with layer tables)")
    if name is None and len(found) > 1:
        raise ValueError(f"{source}: holds several ScalableVQ states {sorted(names)}; pick one with name=")
    if name is not None and name not in names:
        raise ValueError(f"{source}: no ScalableVQ named {name!r}; it holds {sorted(names)}")
    prefix = names[name] if name is not None else next(iter(found))
    cls = module_class(ckpt) if not kwargs and isinstance(ckpt.get("hyper_parameters"), Mapping) else None
    if cls in _KNOWN.values() and not isinstance(ckpt_path, Mapping):
        model = cls.load_from_checkpoint(str(ckpt_path), map_location=map_location, weights_only=True)
        picked = find_quantizer(model, prefix[:-1] if prefix else "")
        if picked is not None:
            return picked[1].eval()
    layout = found[prefix]
    return quantizer_from_state({k: state[prefix + k] for k in layout}, **kwargs)
