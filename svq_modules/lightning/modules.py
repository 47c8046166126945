"""LightningModules with a :class:`~svq_modules.nn.ScalableVQ` inside.

* :class:`ScalableVQAutoencoder` -- a small convolutional autoencoder for RGB images
  whose bottleneck is a ScalableVQ (channel-first ``[B, D, h, w]`` latents).
* :class:`ScalableVQVectors` -- the quantizer alone, for plain ``[N, D]`` vectors
  (no encoder / decoder): the codebook learns by EMA k-means, no optimizer needed.

Both call ``save_hyperparameters()`` with plain Python values only, so
``Cls.load_from_checkpoint(path)`` rebuilds the model in a fresh process (also with
``torch.load(weights_only=True)``), and both follow the callbacks' protocol
(:mod:`svq_modules.lightning.protocol`): a ScalableVQ inside (here ``quantizer``),
``rd_outputs(batch) -> RDOutputs``, ``rd_unit`` (``"bpp"`` or ``"bits"``) and
``data_range`` (for PSNR).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import ScalableVQ
from ..validation import check_bit_proposal, check_int
from .protocol import CLASS_KEY, RDOutputs, refresh_hierarchy_in_checkpoint

__all__ = [
    "Proposal",
    "ScalableVQAutoencoder",
    "ScalableVQVectors",
    "build_quantizer",
    "to_plain",
]


# ----------------------------------------------------------------------------------------
# bit proposals (the Hydra ``proposal/`` group instantiates this)
# ----------------------------------------------------------------------------------------

@dataclass
class Proposal:
    """A bit proposal for :class:`ScalableVQ`: what its ``bits`` / ``num_layers`` get.

    ``bits`` is a list of positive ints (base layer first; one more, final layer is
    added), an int (that many bits in every layer), or ``"balanced_clusters"`` /
    ``"balanced_values"``. Anything but a list needs ``num_layers`` (final layer
    included), because the module's buffer shapes depend on it. Checked by
    :func:`svq_modules.validation.check_bit_proposal` (``ValueError`` otherwise).
    """

    bits: Any = (4, 2, 2, 2, 2)
    num_layers: int | None = None

    def __post_init__(self) -> None:
        self.bits, self.num_layers = check_bit_proposal(to_plain(self.bits), self.num_layers)

    def as_kwargs(self) -> dict[str, Any]:
        return {"bits": self.bits, "num_layers": self.num_layers}


# ----------------------------------------------------------------------------------------
# shared machinery
# ----------------------------------------------------------------------------------------

def to_plain(value: Any) -> Any:
    """OmegaConf containers / tuples -> plain Python lists and dicts (resolved).

    Hyper-parameters pass through it so checkpoints hold plain values only (they
    then load with ``torch.load(weights_only=True)``).
    """
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (DictConfig, ListConfig)):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(value, (tuple, list)):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    return value


def build_quantizer(dim: int, codebook_size: int, bits: Any, num_layers: int | None, channel_first: bool,
                    options: dict[str, Any] | None) -> ScalableVQ:
    """Construct the ScalableVQ with the module's hyper-parameters (``options``: the rest of its arguments)."""
    options = dict(options or {})
    own = ("dim", "codebook_size", "bits", "num_layers", "channel_first")
    for key in own:
        if key in options:
            raise ValueError(f"quantizer.{key} is set on the model itself (model.{key}), not under model.quantizer")
    allowed = sorted(set(inspect.signature(ScalableVQ).parameters) - set(own))
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"quantizer.{unknown[0]} is not a ScalableVQ argument; allowed: {allowed}")
    return ScalableVQ(int(dim), int(codebook_size), bits=bits, num_layers=num_layers, channel_first=channel_first,
                      **options)


def _check_positive(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


class _ScalableVQModule(L.LightningModule):
    """Common parts: checkpoint class tag, fresh hierarchy in every checkpoint, RD interface."""

    quantizer: ScalableVQ
    rd_unit = "bits"
    data_kind = "vectors"  # which data modules' batches it takes ("images" / "vectors")
    data_range: float | None = None

    @property
    def num_layers(self) -> int:
        return int(self.quantizer.num_layers)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CLASS_KEY] = f"{type(self).__module__}.{type(self).__qualname__}"
        # safety net when the HierarchyUpdateCallback is not used (or weights-only saves)
        refresh_hierarchy_in_checkpoint(self, checkpoint)

    def rd_outputs(self, batch: Any) -> RDOutputs:  # pragma: no cover - abstract
        raise NotImplementedError


# ----------------------------------------------------------------------------------------
# image autoencoder
# ----------------------------------------------------------------------------------------

class _ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.GELU(), nn.Conv2d(channels, channels, 3, padding=1),
            nn.GELU(), nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


def _encoder(in_channels: int, channels: int, dim: int, patch_size: int, num_res_blocks: int) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, channels, patch_size, stride=patch_size),  # patch embedding
        nn.GELU(), nn.Conv2d(channels, channels, 3, padding=1),          # context across patches
    ]
    layers += [_ResBlock(channels) for _ in range(num_res_blocks)]
    layers += [nn.GELU(), nn.Conv2d(channels, dim, 1)]
    return nn.Sequential(*layers)


def _decoder(out_channels: int, channels: int, dim: int, patch_size: int, num_res_blocks: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(dim, channels, 3, padding=1)]
    layers += [_ResBlock(channels) for _ in range(num_res_blocks)]
    layers += [
        nn.GELU(), nn.Conv2d(channels, channels, 1),
        nn.GELU(), nn.ConvTranspose2d(channels, out_channels, patch_size, stride=patch_size),  # back to pixels
    ]
    return nn.Sequential(*layers)


class ScalableVQAutoencoder(_ScalableVQModule):
    """Convolutional autoencoder with a ScalableVQ bottleneck, for RGB images in [0, 1].

    The encoder embeds non-overlapping ``patch_size x patch_size`` patches (a strided
    conv), mixes neighbouring patches with 3x3 convs and maps each to a ``dim``-vector;
    every latent vector (one per ``patch_size**2`` pixels) is quantized by the ScalableVQ,
    so a cumulative rate of ``b`` bits per vector is ``b / patch_size**2`` bits per pixel.
    The decoder mirrors it (3x3 convs, then a transposed patch conv).

    Why this shape rather than a stack of stride-2 convs: on the 2-core CPU budget of the
    default run it trains ~1.7x faster for the same full-rate PSNR, and its shallow,
    patch-local decoder degrades gracefully on the coarse layers (measured after 300
    steps on the sample images, K=1024, bits [4,2,2,2,2]: base layer 20.8 dB vs 18.6 dB
    for a 2x stride-2 conv autoencoder of the same width, 22.1 vs 22.2 dB at full depth).

    Training uses the full-depth quantization (the exact codeword); the decoder then
    also serves the coarser layers, whose latents are count-weighted centroids of the
    codewords below each node. Also training the decoder on random coarser layers (as
    residual VQ does with quantize dropout) was tried and dropped: it lowered the
    validation PSNR of every layer, the coarse ones included. One-off runs of the default
    configuration (base layer / full depth, dB; plain training: 21.6 / 23.9 after 800 steps,
    22.4 / 25.1 after 2400), with each image decoded from a random coarser layer (the
    centers of the last ``update()``) with probability p:

    * p=0.5, no gradient to the encoder from those images: 19.4 / 20.9; p=0.25: 21.8 / 23.6;
    * p=0.5, the decoder also told the layer (a learned per-layer scale and shift of its
      first features): 21.3 / 22.9;
    * p=0.5 with gradients to the encoder, 2400 steps: 20.5 / 23.0.

    Entropy-constrained training: ``configs/model/autoencoder.yaml`` sets the quantizer's
    ``train_rate_weight`` to 1, so each training latent takes the codeword of least error + 1 x
    the batch's mean error x the codeword's bits (counted live from its EMA usage), the choice the
    image command makes at its default ``--rate-weight 1`` (there with the index's code lengths and
    before its neighbour preference); the codebook, encoder and decoder then learn for it.
    One-off runs of the default configuration, 800 steps, BD-rate of the image files (command
    defaults) against plain training with seed 0, on the training images (the left 80 % of
    china.jpg and flower.jpg, whole): plain training with seeds 1-3 +2.8 / -4.1 / -0.4 % (the
    spread of the seed alone); weight 1, seeds 0-3, -11.4 / -6.5 / -10.0 / -5.3 %; the same without
    dead-code re-seeding (``threshold_ema_dead_code=0``) -9.1 / -7.9 / -14.2 / +3.5 %. A prototype
    that smoothed the counts by 1e-3 rather than ``eps`` chose the weight: 1, seeds 0-3, -7.6 / -6.0
    / -7.2 / -8.2 %; 0.5, seeds 0-2, -11.2 / -5.3 / -4.7 %; 2 and 4 (seed 0) +2.3 and -1.6 %.

    Also measured and not kept (one-off runs of the default configuration, then with 64-pixel training
    crops; PSNR of the validation crops at full depth, nearest codewords, seed 0: 23.92 dB with 64-pixel
    crops, 23.99 with 96): 128 channels 23.76 dB (2.5x
    the time); ``codebook_size=2048`` 23.97; ``dim`` 8 / 32: 23.96 / 23.94; 3x the steps (2400)
    24.87, yet its grace_hopper file (``bench/bench_codec.py``) is 1.2 to 3.5 dB below JPEG at any
    scale per layer, against 1.1 to 1.5 dB after 800 steps; a low-pass path in the decoder (a 1x1
    conv to RGB on the latent grid, upsampled bicubic / bilinear and added to the output), BD-rate of
    the image files per image against this model's seed 0, seeds 0 and 1, mean of the training
    images (the left 80 % of china.jpg and flower.jpg): bicubic +4.0 / +5.7 %, bilinear +5.4 /
    +11.6 %, where this model's seed 1 gives +5.6 %; random rescaling of the training crops (each crop
    cut at ``crop_size / f`` and resized to ``crop_size``, ``f`` log-uniform), seeds 0 and 1, BD-rate against
    the 64-pixel model's seed 0, mean of the training images / of the held-out ones (grace_hopper and the right 20 %
    strips): ``f`` in [0.5, 1] -1.4 / +1.8 % and +9.2 / +3.7 %, in [1, 2] +10.6 / +5.5 % and +15.4 / +12.5 %,
    where the 64-pixel model's seed 1 gives +5.6 / +9.1 %.

    Training crops of 96 pixels (``configs/data/default_images.yaml``), chosen over 64 (same steps, 1.7x
    the time): seeds 0-3 of each, BD-rate of the image files against the 64-pixel model's seed 0, mean
    over the seeds: training images +0.1 % against +3.6 %, held-out +4.6 % against +4.9 %; grace_hopper
    against JPEG at any scale +40.9 % (34.8 to 47.6) against +57.0 % (37.7 to 69.5): better on average and
    less spread across seeds (seed 0 itself about the same: -1.4 / +0.2 %, +37.4 against +37.7 %).

    Measured on the 96-pixel model and not kept (BD-rate of the image files against the 64-pixel model's seed 0,
    mean of the training images; grace_hopper against JPEG at any scale; the 96-pixel model's seeds 0 / 1 give
    -1.4 / +2.5 % and +37.4 / +43.9 %): random quarter turns of the training crops, seeds 0 / 1: +1.9 / +5.6 %
    and +41.0 / +67.1 %; 3x the steps (2400, 60 epochs), seeds 0 / 1: +11.7 / +13.2 % and +57.7 / +52.1 %; the
    coarse layers' centres fine-tuned through the frozen decoder after training (Adam on the tree's centres
    above the codewords, the summed MSE of every coarser layer on the training crops, 300-800 steps): the
    validation crops' PSNR per layer moved by -0.07 to +0.06 dB. A 3-bit base layer (``bits=[3,3,2,2,2]``), image
    files adaptively coded, BD-rate against this model with the same seed, seeds 0-3, training images (china /
    flower left 80 %): +4.8 / -9.2, -11.2 / +2.0, -0.5 / +20.4, +9.2 / +8.4 % (grace_hopper -10.4 to +0.6 %).

    Args:
        codebook_size: K, number of codewords.
        dim: latent (codeword) dimension D.
        bits / num_layers: the bit proposal (see :class:`Proposal`).
        channels: width of the conv layers.
        patch_size: pixels per side of the patch one latent vector stands for (crop
            sizes must be multiples of it).
        num_res_blocks: residual blocks (two 3x3 convs each) at the latent resolution in
            encoder and decoder.
        in_channels: image channels.
        lr / weight_decay: AdamW settings; the learning rate follows a cosine decay to
            ``lr * min_lr_ratio`` over the run when the trainer knows its length.
        quantizer: extra keyword arguments for ScalableVQ (decay, commitment_weight, ...).
    """

    rd_unit = "bpp"
    data_kind = "images"
    data_range = 1.0

    def __init__(self, codebook_size: int = 1024, dim: int = 16, bits: Any = (4, 2, 2, 2, 2),
                 num_layers: int | None = None, channels: int = 64, patch_size: int = 4,
                 num_res_blocks: int = 1, in_channels: int = 3, lr: float = 2e-3, weight_decay: float = 0.0,
                 min_lr_ratio: float = 0.1, quantizer: dict[str, Any] | None = None):
        super().__init__()
        bits, num_layers = check_bit_proposal(to_plain(bits), num_layers)
        quantizer = to_plain(quantizer) or {}
        if isinstance(min_lr_ratio, bool) or not 0.0 <= float(min_lr_ratio) <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio!r}")
        if isinstance(weight_decay, bool) or not float(weight_decay) >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        self.save_hyperparameters({
            "codebook_size": check_int(codebook_size, "codebook_size", min=2), "dim": check_int(dim, "dim", min=1),
            "bits": bits, "num_layers": num_layers, "channels": check_int(channels, "channels", min=1),
            "patch_size": check_int(patch_size, "patch_size", min=1),
            "num_res_blocks": check_int(num_res_blocks, "num_res_blocks", min=0),
            "in_channels": check_int(in_channels, "in_channels", min=1), "lr": _check_positive(lr, "lr"),
            "weight_decay": float(weight_decay), "min_lr_ratio": float(min_lr_ratio), "quantizer": quantizer,
        })
        hp = self.hparams
        self.encoder = _encoder(hp.in_channels, hp.channels, hp.dim, hp.patch_size, hp.num_res_blocks)
        self.decoder = _decoder(hp.in_channels, hp.channels, hp.dim, hp.patch_size, hp.num_res_blocks)
        self.quantizer = build_quantizer(hp.dim, hp.codebook_size, bits, num_layers, True, quantizer)

    @property
    def pixels_per_latent(self) -> int:
        return self.hparams.patch_size ** 2

    def _check_images(self, x: Tensor) -> Tensor:
        if isinstance(x, (list, tuple)):
            x = x[0]
        if x.ndim != 4 or x.shape[1] != self.hparams.in_channels:
            raise ValueError(f"expected images [B, {self.hparams.in_channels}, H, W], got {tuple(x.shape)}")
        p = self.hparams.patch_size
        if x.shape[-1] % p or x.shape[-2] % p:
            raise ValueError(f"image size {tuple(x.shape[-2:])} must be a multiple of patch_size={p}; "
                             f"pick crop sizes accordingly")
        return x

    def encode(self, x: Tensor) -> Tensor:
        """Images in [0, 1] -> latents ``[B, D, H/p, W/p]`` (before quantization)."""
        return self.encoder(self._check_images(x) - 0.5)

    def decode(self, z: Tensor) -> Tensor:
        """Latents -> images (not clamped)."""
        return self.decoder(z) + 0.5

    def forward(self, x: Tensor, num_layers: int | None = None) -> tuple[Tensor, Any]:
        """Reconstruct images through the quantizer (optionally at ``num_layers`` layers)."""
        z = self.encode(x)
        out = self.quantizer(z, num_layers=num_layers)
        return self.decode(out.quantized), out

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = self._check_images(batch)
        z = self.encode(x)
        out = self.quantizer(z)
        x_hat = self.decode(out.quantized)
        mse = F.mse_loss(x_hat, x)
        loss = mse + out.loss
        self.log("train/loss", loss, prog_bar=False)
        self.log("train/mse", mse)
        self.log("train/psnr", -10.0 * torch.log10(mse.detach().clamp_min(1e-10)), prog_bar=True)
        self.log("train/commit_loss", out.commit_loss.detach() if torch.is_tensor(out.commit_loss)
                 else float(out.commit_loss))
        self.log("train/perplexity", out.perplexity.detach() if torch.is_tensor(out.perplexity)
                 else float(out.perplexity), prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = self._check_images(batch)
        x_hat, out = self(x)
        mse = F.mse_loss(x_hat.clamp(0, 1), x)
        self.log("val/mse", mse, sync_dist=True, batch_size=x.shape[0])
        self.log("val/psnr", -10.0 * torch.log10(mse.clamp_min(1e-10)), sync_dist=True, batch_size=x.shape[0])
        return mse

    @torch.no_grad()
    def rd_outputs(self, batch: Any) -> RDOutputs:
        x = self._check_images(batch)
        z = self.encode(x)
        idx = self.quantizer(z).indices
        recon = [self.decode(self.quantizer.reconstruct(idx, l).to(z.dtype)).clamp(0, 1)
                 for l in range(1, self.num_layers + 1)]
        return RDOutputs(target=x, recon=recon, indices=idx, elements_per_vector=float(self.pixels_per_latent))

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = _estimated_total_steps(self)
        if total is None:
            return opt
        floor = self.hparams.min_lr_ratio

        def factor(step: int) -> float:
            t = min(step, total) / max(total, 1)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _estimated_total_steps(module: L.LightningModule) -> int | None:
    """Total optimizer steps of this fit, when the trainer can tell (max_steps or max_epochs)."""
    trainer = getattr(module, "_trainer", None)
    if trainer is None:
        return None
    try:
        total = int(trainer.estimated_stepping_batches)
    except Exception:  # unknown length (e.g. iterable dataset, max_epochs=-1)
        return None
    if total <= 0 or total >= 10**9:
        return None
    return total


# ----------------------------------------------------------------------------------------
# vectors only
# ----------------------------------------------------------------------------------------

class ScalableVQVectors(_ScalableVQModule):
    """The ScalableVQ alone, trained on plain ``[N, D]`` vectors.

    With the default EMA codebook the codebook learns inside ``forward`` in training mode
    and there is nothing for a gradient to do. The module still runs an ordinary
    optimizer step per batch, on the quantizer's trainable parameters if any
    (``learnable_codebook=True``) plus a zero scalar ``step_anchor`` that enters the loss
    times 0: that keeps Lightning's ``global_step`` (checkpoint names, resuming,
    ``max_steps``) counting batches, and gives DDP a parameter to synchronize.

    Args:
        dim: vector dimension D (``None`` in the config = taken from the data).
        codebook_size: K.
        bits / num_layers: the bit proposal (see :class:`Proposal`).
        lr: Adam learning rate for trainable quantizer parameters, if any.
        data_range: value range (peak) for PSNR; ``None`` = the data module's
            ``data_range`` (``train.py`` fills in max - min of the whole file).
        quantizer: extra keyword arguments for ScalableVQ.
    """

    rd_unit = "bits"
    data_kind = "vectors"

    def __init__(self, dim: int, codebook_size: int = 1024, bits: Any = (4, 2, 2, 2, 2),
                 num_layers: int | None = None, lr: float = 1e-3, data_range: float | None = None,
                 quantizer: dict[str, Any] | None = None):
        super().__init__()
        bits, num_layers = check_bit_proposal(to_plain(bits), num_layers)
        quantizer = to_plain(quantizer) or {}
        self.save_hyperparameters({
            "dim": check_int(dim, "dim", min=1), "codebook_size": check_int(codebook_size, "codebook_size", min=2),
            "bits": bits, "num_layers": num_layers, "lr": _check_positive(lr, "lr"),
            "data_range": None if data_range is None else _check_positive(data_range, "data_range"),
            "quantizer": quantizer,
        })
        self.data_range = self.hparams.data_range
        self.quantizer = build_quantizer(self.hparams.dim, self.hparams.codebook_size, bits, num_layers, False,
                                         quantizer)
        self.step_anchor = nn.Parameter(torch.zeros(()))

    def _check_vectors(self, x: Any) -> Tensor:
        if isinstance(x, (list, tuple)):
            x = x[0]
        if x.ndim != 2 or x.shape[1] != self.hparams.dim:
            raise ValueError(f"expected vectors [N, {self.hparams.dim}], got {tuple(x.shape)}")
        return x

    def forward(self, x: Tensor, num_layers: int | None = None) -> Any:
        return self.quantizer(x, num_layers=num_layers)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = self._check_vectors(batch)
        out = self(x)
        loss = out.loss + 0.0 * self.step_anchor
        mse = F.mse_loss(out.quantized.detach(), x)
        self.log("train/mse", mse, prog_bar=True, batch_size=x.shape[0])
        self.log("train/perplexity", out.perplexity.detach() if torch.is_tensor(out.perplexity)
                 else float(out.perplexity), prog_bar=True, batch_size=x.shape[0])
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = self._check_vectors(batch)
        out = self(x)
        mse = F.mse_loss(out.quantized, x)
        self.log("val/mse", mse, sync_dist=True, batch_size=x.shape[0])
        return mse

    @torch.no_grad()
    def rd_outputs(self, batch: Any) -> RDOutputs:
        x = self._check_vectors(batch)
        out = self.quantizer(x)
        recon = [self.quantizer.reconstruct(out.indices, l).to(x.dtype) for l in range(1, self.num_layers + 1)]
        return RDOutputs(target=x, recon=recon, indices=out.indices, elements_per_vector=1.0)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr)
