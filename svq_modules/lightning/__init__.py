"""Lightning integration of :class:`~svq_modules.nn.ScalableVQ`.

* data modules: :class:`SampleImagesDataModule` (scikit-learn's embedded sample images,
  the default of ``python train.py``), :class:`ImageFolderDataModule` (your images),
  :class:`VectorDataModule` (``[N, D]`` vectors from ``.npy`` / ``.npz`` / ``.pt``);
* LightningModules: :class:`ScalableVQAutoencoder` (conv autoencoder with a ScalableVQ
  bottleneck) and :class:`ScalableVQVectors` (the quantizer alone);
* callbacks: :class:`HierarchyUpdateCallback` (fresh hierarchy before validation and in
  every checkpoint) and :class:`RateDistortionCallback` (per-layer rate / MSE / PSNR,
  RD plot, per-layer image strip);
* checkpoint helpers: :func:`load_lit_module`, :func:`extract_quantizer`.
"""

from .callbacks import (
    CodeHistogram,
    HierarchyUpdateCallback,
    RateDistortionCallback,
    format_rd_table,
    quantizer_fingerprint,
)
from .data import (
    ImageCropDataModule,
    ImageFolderDataModule,
    SampleImagesDataModule,
    VectorDataModule,
    load_vectors,
)
from .modules import (
    Proposal,
    RDOutputs,
    ScalableVQAutoencoder,
    ScalableVQVectors,
    check_proposal,
    extract_quantizer,
    load_lit_module,
)

__all__ = [
    "CodeHistogram",
    "HierarchyUpdateCallback",
    "ImageCropDataModule",
    "ImageFolderDataModule",
    "Proposal",
    "RDOutputs",
    "RateDistortionCallback",
    "SampleImagesDataModule",
    "ScalableVQAutoencoder",
    "ScalableVQVectors",
    "VectorDataModule",
    "check_proposal",
    "extract_quantizer",
    "format_rd_table",
    "load_lit_module",
    "load_vectors",
    "quantizer_fingerprint",
]
