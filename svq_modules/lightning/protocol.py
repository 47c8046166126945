"""What the callbacks need from a LightningModule, and how they find its ScalableVQ.

A LightningModule works with :class:`~svq_modules.lightning.callbacks.HierarchyUpdateCallback`
as soon as it holds a :class:`~svq_modules.nn.ScalableVQ` anywhere (any attribute name,
any depth), and with :class:`~svq_modules.lightning.rate_distortion.RateDistortionCallback`
when it also has ``rd_outputs(batch)`` returning an :class:`RDOutputs` (or a tuple /
dict with the same fields, see :func:`as_rd_outputs`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..nn import ScalableVQ

__all__ = [
    "CLASS_KEY",
    "RDOutputs",
    "as_rd_outputs",
    "find_quantizer",
    "quantizer_modules",
    "refresh_hierarchy_in_checkpoint",
]

#: checkpoint entry naming the LightningModule class that wrote it (this package's modules)
CLASS_KEY = "svq_lightning_module"


class RDOutputs(NamedTuple):
    """What :class:`~svq_modules.lightning.rate_distortion.RateDistortionCallback` needs from one batch.

    Attributes:
        target: the data the reconstructions are compared with (images in ``[0, 1]``
            ``[B, C, H, W]``, or vectors ``[N, D]``), float.
        recon: one reconstruction per layer, ``recon[l]`` decoded from layers ``0..l``
            (``len(recon) == quantizer.num_layers``), each shaped like ``target``.
        indices: the codeword indices of the batch (int tensor, any shape).
        elements_per_vector: data elements one quantized vector stands for (pixels
            per latent vector for images, 1 for vectors): rate per element =
            bits per vector / this.
    """

    target: Tensor
    recon: list[Tensor]
    indices: Tensor
    elements_per_vector: float = 1.0


def as_rd_outputs(value: Any, source: str = "rd_outputs") -> RDOutputs:
    """An :class:`RDOutputs` from what ``rd_outputs(batch)`` returned.

    Accepts an :class:`RDOutputs`, a tuple / list ``(target, recon, indices[,
    elements_per_vector])`` or a mapping with those keys. Raises ``ValueError``
    naming what is missing or of the wrong kind.
    """
    if isinstance(value, RDOutputs):
        out = value
    elif isinstance(value, Mapping):
        missing = [k for k in ("target", "recon", "indices") if k not in value]
        if missing:
            raise ValueError(f"{source} returned a dict without {missing}; expected keys target, recon, indices "
                             f"(and optionally elements_per_vector)")
        out = RDOutputs(value["target"], value["recon"], value["indices"], value.get("elements_per_vector", 1.0))
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)) and len(value) in (3, 4):
        out = RDOutputs(*value)
    else:
        raise ValueError(f"{source} returned {type(value).__name__}; expected RDOutputs, a tuple "
                         f"(target, recon, indices[, elements_per_vector]) or a dict with those keys")
    if not torch.is_tensor(out.target) or not torch.is_tensor(out.indices):
        raise ValueError(f"{source}: target and indices must be tensors, got {type(out.target).__name__} "
                         f"and {type(out.indices).__name__}")
    if isinstance(out.recon, Tensor) or not all(torch.is_tensor(r) for r in out.recon):
        raise ValueError(f"{source}: recon must be a list of tensors (one per layer)")
    bad = [tuple(r.shape) for r in out.recon if r.shape != out.target.shape]
    if bad:
        raise ValueError(f"{source}: every reconstruction must have the target's shape {tuple(out.target.shape)}, "
                         f"got {bad}")
    per = float(out.elements_per_vector)
    if not per > 0:
        raise ValueError(f"{source}: elements_per_vector must be > 0, got {out.elements_per_vector!r}")
    return RDOutputs(out.target, list(out.recon), out.indices, per)


def quantizer_modules(module: nn.Module) -> list[tuple[str, ScalableVQ]]:
    """``(name, module)`` of every :class:`ScalableVQ` inside ``module`` (itself included, name ``""``)."""
    return [(name, m) for name, m in module.named_modules() if isinstance(m, ScalableVQ)]


def find_quantizer(module: nn.Module, name: str | None = None) -> tuple[str, ScalableVQ] | None:
    """The one ScalableVQ of ``module`` (found by type), or the one at module path ``name``.

    Returns None when the module holds none. Raises ``ValueError`` when it holds
    several and ``name`` does not pick one.
    """
    found = quantizer_modules(module)
    if name is not None:
        picked = [(n, q) for n, q in found if n == name]
        if not picked:
            raise ValueError(f"quantizer={name!r}: no ScalableVQ at that module path; "
                             f"the model holds {[n for n, _ in found]}")
        return picked[0]
    if len(found) > 1:
        raise ValueError(f"the model holds several ScalableVQ modules {[n for n, _ in found]}; "
                         f"name the one to use (quantizer=...)")
    return found[0] if found else None


def refresh_hierarchy_in_checkpoint(module: nn.Module, checkpoint: dict[str, Any], progress: bool = False) -> bool:
    """``update()`` every ScalableVQ of ``module``; write rebuilt buffers into ``checkpoint["state_dict"]``.

    ``update()`` rebuilds only a missing or stale hierarchy. Returns True if any
    quantizer was rebuilt. Must run on every rank under DDP (``update()``
    all-reduces), as checkpoint hooks do.
    """
    rebuilt = False
    state = checkpoint.get("state_dict")
    for name, q in quantizer_modules(module):
        if not q.update(progress=progress):
            continue
        rebuilt = True
        if state is not None:
            prefix = f"{name}." if name else ""
            for key, value in q.state_dict().items():
                if prefix + key in state:
                    state[prefix + key] = value.detach().clone()
    return rebuilt
