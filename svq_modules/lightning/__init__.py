"""Lightning integration of :class:`~svq_modules.nn.ScalableVQ`.

* data modules (:mod:`.data`): :class:`SampleImagesDataModule` (scikit-learn's embedded
  sample images, the default of ``python train.py``), :class:`ImageFolderDataModule`
  (your images), :class:`VectorDataModule` (``[N, D]`` vectors from ``.npy`` / ``.npz`` /
  ``.pt``);
* LightningModules (:mod:`.modules`): :class:`ScalableVQAutoencoder` (conv autoencoder
  with a ScalableVQ bottleneck) and :class:`ScalableVQVectors` (the quantizer alone);
* the callbacks' protocol (:mod:`.protocol`): :class:`RDOutputs`, a ScalableVQ found by type;
* callbacks: :class:`HierarchyUpdateCallback` (fresh hierarchy before validation and in
  every checkpoint) and :class:`RateDistortionCallback` (per-layer rate / MSE / PSNR,
  RD plot, per-layer image strip); :func:`format_rd_table` (:mod:`.table`, the one RD table);
* checkpoint helpers (:mod:`.checkpoints`): :func:`load_lit_module`, :func:`extract_quantizer`;
* ``train.py`` / ``eval.py`` machinery (:mod:`.entry`, :mod:`.checks`).

Names are imported on first use, so ``import svq_modules.lightning.table`` does not
import Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CodeHistogram": "rate_distortion",
    "RateDistortionCallback": "rate_distortion",
    "HierarchyUpdateCallback": "callbacks",
    "quantizer_fingerprint": "callbacks",
    "format_rd_table": "table",
    "ImageCropDataModule": "data",
    "ImageFolderDataModule": "data",
    "SampleImagesDataModule": "data",
    "VectorDataModule": "data",
    "load_vectors": "data",
    "Proposal": "modules",
    "ScalableVQAutoencoder": "modules",
    "ScalableVQVectors": "modules",
    "RDOutputs": "protocol",
    "as_rd_outputs": "protocol",
    "find_quantizer": "protocol",
    "quantizer_modules": "protocol",
    "extract_quantizer": "checkpoints",
    "load_lit_module": "checkpoints",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
