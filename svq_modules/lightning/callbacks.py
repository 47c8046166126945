"""Lightning callbacks for ScalableVQ models.

* :class:`HierarchyUpdateCallback` -- calls ``update()`` on every ScalableVQ of the model
  (found by type, any attribute name) before validation and before a checkpoint is
  written (and at the end of fit), so validation always decodes with the current
  codebook's hierarchy and checkpoints always hold a fresh one. ``update()`` rebuilds
  only a missing or stale hierarchy. Under DDP it also checks that every rank holds
  the same quantizer.
* :class:`~svq_modules.lightning.rate_distortion.RateDistortionCallback` (re-exported
  here) -- per-layer rate / MSE / PSNR of the validation set, RD plot, layer strip.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from ..coding.tables import fingerprint_tensors
from ..validation import check_bool, check_int
from .protocol import quantizer_modules, refresh_hierarchy_in_checkpoint
from .rate_distortion import CodeHistogram, RateDistortionCallback
from .table import format_rd_table

__all__ = [
    "CodeHistogram",
    "HierarchyUpdateCallback",
    "RateDistortionCallback",
    "format_rd_table",
    "quantizer_fingerprint",
]

#: domain of :func:`quantizer_fingerprint` (names what is hashed, and the version of that choice)
FINGERPRINT_DOMAIN = b"svq-modules/lightning/quantizer-state/v1"


def quantizer_fingerprint(module: torch.nn.Module) -> str:
    """40 hex digits: :func:`~svq_modules.coding.tables.fingerprint_tensors` of ``module.state_dict()``.

    Names, shapes and values of every entry (sorted by name) count; the same on every
    device and rank for the same state.
    """
    state = dict(sorted(module.state_dict().items()))
    return fingerprint_tensors(state, FINGERPRINT_DOMAIN, digest_size=20).hex()


def _fingerprint_tensor(module: torch.nn.Module, device: torch.device) -> Tensor:
    """The fingerprint as 5 ints (20 bytes) for an all_gather."""
    digest = bytes.fromhex(quantizer_fingerprint(module))
    return torch.tensor([int.from_bytes(digest[i:i + 4], "little", signed=True) for i in range(0, 20, 4)],
                        dtype=torch.int64, device=device)


class HierarchyUpdateCallback(Callback):
    """Keep the ScalableVQ hierarchies of a model fresh.

    ``update()`` runs (on every rank; it rebuilds only when the hierarchy is missing or stale):

    * before every validation epoch (not during the sanity check: the codebook is not
      trained yet), so the rate-distortion figures decode with the current codebook;
    * before a checkpoint is written: rebuilt buffers are also written into the
      checkpoint's ``state_dict``, so a checkpoint never holds a stale tree;
    * at the end of fit, so the model in memory is ready to encode/decode.

    Works with any LightningModule holding ScalableVQ modules (any attribute name, any depth).

    Args:
        on_validation / on_checkpoint / on_fit_end: switch the moments above.
        progress: tqdm bar over the merges of a build: True, False or ``"auto"`` (default:
            only for long builds, codebooks of ``progress_min_codes`` codes or more, rank 0).
        progress_min_codes: codebook size from which ``"auto"`` shows the bar.
        check_ranks: under DDP, compare a fingerprint of every quantizer across ranks
            after each rebuild; ``"raise"`` (default), ``"warn"`` or ``"off"``.
    """

    def __init__(self, on_validation: bool = True, on_checkpoint: bool = True, on_fit_end: bool = True,
                 progress: bool | str = "auto", progress_min_codes: int = 4096, check_ranks: str = "raise"):
        if check_ranks not in ("raise", "warn", "off"):
            raise ValueError(f"check_ranks must be 'raise', 'warn' or 'off', got {check_ranks!r}")
        if progress not in (True, False, "auto"):
            raise ValueError(f"progress must be True, False or 'auto', got {progress!r}")
        self.on_validation = check_bool(on_validation, "on_validation")
        self.on_checkpoint = check_bool(on_checkpoint, "on_checkpoint")
        self.on_fit_end_ = check_bool(on_fit_end, "on_fit_end")
        self.progress = progress
        self.progress_min_codes = check_int(progress_min_codes, "progress_min_codes", min=1)
        self.check_ranks = check_ranks
        self.num_updates = 0
        self.last_fingerprints: dict[str, str] = {}

    def _progress(self, trainer: L.Trainer, q: Any) -> bool:
        if not trainer.is_global_zero or self.progress is False:
            return False
        return self.progress is True or q.codebook_size >= self.progress_min_codes

    def _update(self, trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
        changed = False
        for _, q in quantizer_modules(pl_module):
            changed |= bool(q.update(progress=self._progress(trainer, q)))
        if changed:
            self._rebuilt(trainer, pl_module)
        return changed

    def _rebuilt(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.num_updates += 1
        self.last_fingerprints = {name: quantizer_fingerprint(q) for name, q in quantizer_modules(pl_module)}
        if self.check_ranks == "off" or trainer.world_size <= 1:
            return
        for name, q in quantizer_modules(pl_module):
            mine = _fingerprint_tensor(q, pl_module.device)
            every = trainer.strategy.all_gather(mine)  # [world, 5]
            if not bool((every == mine).all()):
                msg = (f"ScalableVQ {name or '<root>'} differs between ranks after update() "
                       f"(rank {trainer.global_rank} fingerprint {self.last_fingerprints[name][:12]})")
                if self.check_ranks == "raise":
                    raise RuntimeError(msg)
                from lightning.pytorch.utilities import rank_zero_warn

                rank_zero_warn(msg)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.on_validation and not trainer.sanity_checking:
            self._update(trainer, pl_module)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.on_validation:
            self._update(trainer, pl_module)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        progress = any(self._progress(trainer, q) for _, q in quantizer_modules(pl_module))
        if self.on_checkpoint and refresh_hierarchy_in_checkpoint(pl_module, checkpoint, progress=progress):
            self._rebuilt(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.on_fit_end_:
            self._update(trainer, pl_module)
