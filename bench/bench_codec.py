#!/usr/bin/env python
"""The default image model as a codec, on whole held-out images, against JPEG, WebP and learned peers.

    python bench/bench_codec.py                          # trains what is missing (cached in bench/.cache/codec)
    python bench/bench_codec.py --ckpt outputs/train/<run>/checkpoints/last.ckpt
    python bench/bench_codec.py --steps 800 --lambdas 0.0035,0.013,0.0483

Images (never trained on): matplotlib's bundled photo ``grace_hopper.jpg`` and the
held-out right 20% of scikit-learn's ``china.jpg`` and ``flower.jpg`` (the columns the
default run validates on; it trains on the left 80%). matplotlib's other bundled
images are a logo and a transparent clip-art icon, not photos: left out.

Rows, all with bpp from real bytes (a file of the whole image, headers included)
unless said otherwise:

* ours: the default run's checkpoint (``python train.py``) at every layer, through the
  image-file path of ``svq_modules.cli.images`` (file cut after each layer; each layer
  adaptively context coded, ``svq_modules.coding.context``; codewords chosen at the image command's
  defaults, ``RATE_WEIGHT`` and ``REPEAT_BITS``); the same files context coded without adaptation
  (``compress --coding context``) and entropy coded without the neighbours (``compress --coding
  entropy``); with every vector's nearest
  codeword (``compress --rate-weight 0 --layer-weights 0,...,0,1``); and with the codewords chosen by
  their error at full depth alone (``--layer-weights 0,...,0,1``, the choice before 2026-12-08);
* flat VQ at 4 / 6 / 8 bits: the same run with ``codebook_size=2**b`` (full depth only), and the
  same trained on the nearest codewords (``model/quantizer=default``); each with the nearest
  codewords and with the image command's rate-weighted choice, both by the error at full depth (the only
  layer measured);
* ResidualVQ (vector-quantize-pytorch, 16 codes x 3 stages, ``quantize_dropout=True``)
  in the same autoencoder, same data, batch and steps; its rate is the ideal code
  length of each stage's indices under probabilities counted on training crops, given the
  previous stage's index and sharpened by the left and upper neighbours' indices as our
  context coding does (per image and stage the best of a grid of two factors, +2 bytes),
  and adapted to the image's own counts in that context as our adaptive coding does (the
  better of the two per stage, +1 byte; no header);
* CompressAI ``bmshj2018-factorized`` trained on the same crops, batch and steps at
  several lambdas (``lambda * 255**2 * MSE + bpp``), real bytes of ``compress()``;
* JPEG and WebP (Pillow) quality sweeps;
* JPEG at any scale: the same JPEG sweep also on the image downscaled by 2, 3 and 4 (Lanczos), decoded
  and upscaled back (bicubic), +4 bytes for the original size; its curve is the best of all of them.
  This is how a user gets a JPEG below the smallest full-size one (quality 1), so it is the JPEG
  to compare with at our rates.

Averages are over the images (mean bpp, mean PSNR per setting). BD-rate: log-rate against
PSNR for both curves through their efficient points by piecewise cubic Hermite interpolation,
the mean log-rate difference over the PSNR range both cover (negative = ours needs fewer bits).
MS-SSIM uses 4 scales (the 128-pixel wide held-out strips are too narrow for 5). Trained peers are cached under
``bench/.cache/codec`` keyed by steps and a hash of the model/data configuration.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from common import CACHE_DIR, REPO_ROOT, markdown_table, write_report

CODEC_CACHE = CACHE_DIR / "codec"
RD_PNG = REPO_ROOT / "docs" / "images" / "codec_rd.png"
JPEG_QUALITIES = (1, 2, 3, 5, 8, 10, 15, 20, 30, 40, 50, 60, 75, 90)
WEBP_QUALITIES = (0, 2, 5, 10, 20, 30, 40, 50, 60, 75, 90)
JPEG_SCALES = (1, 2, 3, 4)  # JPEG at any scale: downscaled by each factor, upscaled back after decoding
FLAT_BITS = (4, 6, 8)
MSSSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363)  # the first 4 scales of Wang et al.'s weights
#: settings every trained model of the benchmark shares (part of the cache key)
DATA_CONFIGS = ("configs/data/default_images.yaml", "configs/trainer/default.yaml", "configs/model/quantizer/default.yaml",
                "configs/model/quantizer/entropy_constrained.yaml")
MODEL_CONFIG = "configs/model/autoencoder.yaml"

#: the same files with each layer coded without its neighbours (the context coding's gain)
NO_CONTEXT = "ours, entropy coding (no neighbours)"
#: the same files context coded without adaptation to the image (``compress --coding context``)
STATIC_CONTEXT = "ours, context coding without adaptation (--coding context)"
#: the same files with every vector's nearest codeword (``compress --rate-weight 0``)
NEAREST = "ours, nearest codewords (rate weight 0, full-depth error only)"
#: the same image with the codewords chosen by their error at full depth alone (``--layer-weights 0,...,0,1``)
FULL_DEPTH = "ours, full-depth error only (--layer-weights 0,...,0,1)"
#: flat VQs trained on the nearest codewords (``model/quantizer=default``) rather than as ours
PLAIN = "plain training"
#: JPEG of the image downscaled by each of ``JPEG_SCALES``, decoded and upscaled back: every (scale, quality)
JPEG_ANY_SCALE = "JPEG at any scale (1, 1/2, 1/3, 1/4)"
Points = list[tuple[int, np.ndarray]]  # (bytes, decoded [H, W, 3] uint8) per rate point


# ------------------------------------------------------------------------------------------------ images


def heldout_images() -> dict[str, np.ndarray]:
    """Whole evaluation images, ``[H, W, 3]`` uint8: grace_hopper and the held-out 20% of the training photos."""
    import matplotlib.cbook
    from PIL import Image
    from sklearn.datasets import load_sample_image

    with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")) as im:
        images = {"grace_hopper": np.asarray(im.convert("RGB"), dtype=np.uint8).copy()}
    for name in ("china", "flower"):
        img = load_sample_image(f"{name}.jpg")
        width = img.shape[1]
        images[f"{name} (right 20%)"] = np.ascontiguousarray(img[:, width - int(round(width * 0.2)):])
    return images


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def ms_ssim(a: np.ndarray, b: np.ndarray) -> float:
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as msssim

    def t(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x).permute(2, 0, 1)[None].float() / 255.0

    return float(msssim(t(a), t(b), data_range=1.0, betas=MSSSIM_BETAS))


# ------------------------------------------------------------------------------------------------ codecs


def pillow_codec(fmt: str, qualities: tuple[int, ...]) -> Callable[[np.ndarray], Points]:
    from PIL import Image

    def run(pixels: np.ndarray) -> Points:
        out = []
        for q in qualities:
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format=fmt, quality=q)
            data = buf.getvalue()
            with Image.open(io.BytesIO(data)) as im:
                out.append((len(data), np.asarray(im.convert("RGB"), dtype=np.uint8).copy()))
        return out

    return run


def downscaled_codec(codec: Callable[[np.ndarray], Points], scales: tuple[int, ...]) -> Callable[[np.ndarray], Points]:
    """``codec`` on the image downscaled by each factor of ``scales`` (Lanczos), decoded and upscaled back to
    the original size (bicubic); +4 bytes per file for the original size. Points in (scale, codec setting) order."""
    from PIL import Image

    def run(pixels: np.ndarray) -> Points:
        height, width = pixels.shape[:2]
        out = []
        for s in scales:
            if s == 1:
                out += codec(pixels)
                continue
            small = Image.fromarray(pixels).resize((max(1, round(width / s)), max(1, round(height / s))),
                                                   Image.LANCZOS)
            for size, decoded in codec(np.asarray(small)):
                up = Image.fromarray(decoded).resize((width, height), Image.BICUBIC)
                out.append((size + 4, np.asarray(up, dtype=np.uint8).copy()))
        return out

    return run


def ours_codec(ckpt: Path, last_only: bool = False, coding: str = "adaptive", rate_weight: float | None = None,
               full_depth: bool = False) -> Callable[[np.ndarray], Points]:
    """Every layer of the checkpoint's image file (``svq_modules.cli.images``), the file cut after each layer;
    codewords chosen at ``rate_weight`` (default: the image command's) and the image command's layer weights,
    or with ``full_depth`` by their error at full depth alone (``compress --layer-weights 0,...,0,1``)."""
    from svq_modules.cli.images import RATE_WEIGHT, compress_pixels, decode_image, load_autoencoder
    from svq_modules.coding import decompress_layers
    from svq_modules.coding.image_file import pack_image_file, unpack_image_file

    model = load_autoencoder(ckpt, str(ckpt))
    q = model.quantizer
    layer_weights = [0.0] * (q.num_layers - 1) + [1.0] if full_depth else None

    def run(pixels: np.ndarray) -> Points:
        weight = RATE_WEIGHT if rate_weight is None else rate_weight
        f = unpack_image_file(pack_image_file(*compress_pixels(model, pixels, coding, weight,
                                                               layer_weights=layer_weights)))
        layers = [f.num_layers] if last_only else range(1, f.num_layers + 1)
        return [(int(f.layer_end[n - 1]), decode_image(model, f.header, decompress_layers(q.hierarchy, q.tables,
                                                                                           f.chunks[:n])))
                for n in layers]

    return run


@torch.no_grad()
def unquantized_psnr(ckpt: Path, images: dict[str, np.ndarray]) -> dict[str, float]:
    """PSNR per image of the checkpoint's autoencoder with its latents *not* quantized (no rate): what the
    transforms alone allow, an upper bound the quantizer's layers can only approach."""
    from svq_modules.cli.images import load_autoencoder

    model = load_autoencoder(ckpt, str(ckpt)).eval()
    out = {}
    for name, pixels in images.items():
        x, size = _to_tensor(pixels, model.hparams.patch_size)
        out[name] = psnr(pixels, _to_pixels(model.decode(model.encode(x)), size))
    return out


def _to_tensor(pixels: np.ndarray, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    h, w = pixels.shape[:2]
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255.0
    pad = (0, -w % multiple, 0, -h % multiple)
    return (F.pad(x, pad, mode="replicate") if any(pad) else x), (h, w)


def _to_pixels(y: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    y = y[0, :, : size[0], : size[1]].clamp(0, 1)
    return (y.permute(1, 2, 0) * 255.0).round().to(torch.uint8).numpy()


# ------------------------------------------------------------------------------------------------ training


def config_key(steps: int, *extra: Any, autoencoder: bool = True) -> str:
    """Cache key: data and trainer configs, steps, ``extra``; with ``autoencoder`` also the quantizer
    config and the reference model's architecture and optimizer settings (the peers built on that
    autoencoder; CompressAI's model is its own).

    Settings named ``coarse_*`` (a coarse-layer training option the reference model once had) are
    left out, so that the keys of models trained before it was dropped stay valid.
    """
    from omegaconf import OmegaConf

    h = hashlib.sha256()
    for name in DATA_CONFIGS if autoencoder else DATA_CONFIGS[:2]:
        h.update((REPO_ROOT / name).read_bytes())
    settings: list[Any] = [steps, *extra]
    if autoencoder:
        model = OmegaConf.to_container(OmegaConf.load(REPO_ROOT / MODEL_CONFIG))
        settings.insert(0, {k: v for k, v in model.items() if not str(k).startswith("coarse_")})
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()[:12]


def default_steps() -> int:
    """Optimizer steps of ``python train.py`` (max_epochs x crops per epoch / batch)."""
    from omegaconf import OmegaConf

    data = OmegaConf.load(REPO_ROOT / "configs/data/default_images.yaml")
    trainer = OmegaConf.load(REPO_ROOT / "configs/trainer/default.yaml")
    if int(trainer.max_steps) > 0:
        return int(trainer.max_steps)
    return int(trainer.max_epochs) * (int(data.train_crops_per_epoch) // int(data.batch_size))


def train_run(name: str, steps: int, overrides: list[str]) -> Path:
    """``python train.py <overrides>`` for ``steps`` optimizer steps, cached; returns the last checkpoint."""
    extra = [overrides] if overrides else [(REPO_ROOT / MODEL_CONFIG).read_text()]  # the default run: every setting
    run_dir = CODEC_CACHE / f"{name}_{config_key(steps, *extra)}"
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    if ckpt.exists():
        return ckpt
    steps_args = [] if steps == default_steps() else [f"trainer.max_steps={steps}", "trainer.max_epochs=-1"]
    cmd = [sys.executable, "train.py", *overrides, *steps_args, "final_rd=false", "trainer.enable_progress_bar=false",
           f"hydra.run.dir={run_dir}"]
    print(f"[train] {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    subprocess.run(cmd, cwd=REPO_ROOT, check=True, stdout=subprocess.DEVNULL)
    return ckpt


def train_loader() -> Any:
    """The default run's training loader (same crops, batch size and seed)."""
    from omegaconf import OmegaConf

    from svq_modules.lightning.data import SampleImagesDataModule

    cfg = OmegaConf.to_container(OmegaConf.load(REPO_ROOT / "configs/data/default_images.yaml"))
    cfg.pop("_target_")
    cfg["seed"] = 0
    dm = SampleImagesDataModule(**cfg)
    dm.setup("fit")
    return dm.train_dataloader()


def batches(steps: int):
    step = 0
    while True:
        for x in train_loader():
            if step == steps:
                return
            yield step, x
            step += 1


def cosine(opt: torch.optim.Optimizer, steps: int, floor: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))


class RVQAutoencoder(torch.nn.Module):
    """The reference model's encoder and decoder around a ResidualVQ (16 codes x 3 stages, quantize dropout)."""

    def __init__(self):
        super().__init__()
        from omegaconf import OmegaConf
        from vector_quantize_pytorch import ResidualVQ

        from svq_modules.lightning import ScalableVQAutoencoder

        cfg = OmegaConf.load(REPO_ROOT / "configs/model/autoencoder.yaml")
        qcfg = OmegaConf.load(REPO_ROOT / "configs/model/quantizer/default.yaml")
        ref = ScalableVQAutoencoder(codebook_size=16, dim=int(cfg.dim), bits=[2], channels=int(cfg.channels),
                                    patch_size=int(cfg.patch_size), num_res_blocks=int(cfg.num_res_blocks))
        self.lr = float(cfg.lr)
        self.patch_size = int(cfg.patch_size)
        self.encoder, self.decoder = ref.encoder, ref.decoder
        self.rvq = ResidualVQ(dim=int(cfg.dim), num_quantizers=3, codebook_size=16, quantize_dropout=True,
                              kmeans_init=True, decay=float(qcfg.decay), commitment_weight=float(qcfg.commitment_weight),
                              threshold_ema_dead_code=int(qcfg.threshold_ema_dead_code))

    def latents(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encoder(x - 0.5)
        return z.flatten(2).transpose(1, 2)  # [B, N, D]

    def decode(self, zq: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return self.decoder(zq.transpose(1, 2).reshape(zq.shape[0], -1, *grid)) + 0.5

    def stages(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Cumulative reconstructions and indices after 1, 2, 3 stages (eval)."""
        residual = self.latents(x)
        total, recons, codes = torch.zeros_like(residual), [], []
        for layer in self.rvq.layers:
            qz, idx, *_ = layer(residual)
            residual = residual - qz
            total = total + qz
            recons.append(total.clone())
            codes.append(idx)
        return recons, codes


def train_rvq(steps: int) -> RVQAutoencoder:
    path = CODEC_CACHE / f"rvq_{config_key(steps, 'rvq')}.pt"
    torch.manual_seed(0)
    model = RVQAutoencoder()
    if path.exists():
        saved = torch.load(path, weights_only=False)
        model.load_state_dict(saved["model"])
        model.eval()
        model.counts = saved["counts"] if saved["counts"].dim() == 3 else rvq_counts(model)
        return model
    print(f"[train] ResidualVQ autoencoder, {steps} steps", file=sys.stderr, flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=model.lr)
    sched = cosine(opt, steps)
    model.train()
    for _, x in batches(steps):
        z = model.latents(x)
        zq, _, commit = model.rvq(z)
        loss = F.mse_loss(model.decode(zq, (x.shape[2] // model.patch_size, x.shape[3] // model.patch_size)), x)
        loss = loss + commit.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    model.counts = rvq_counts(model)
    CODEC_CACHE.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "counts": model.counts}, path)
    return model


@torch.no_grad()
def rvq_counts(model: RVQAutoencoder) -> torch.Tensor:
    """``[3, 16, 16]`` Laplace-smoothed counts of each stage's symbol given the previous stage's (stage 0: row 0),
    on one epoch of training crops: the RVQ rows' static model, conditioned like ours on what is decoded."""
    counts = torch.ones(3, 16, 16)
    for x in train_loader():
        codes = model.stages(x)[1]
        for s, idx in enumerate(codes):
            prev = codes[s - 1].flatten() if s else torch.zeros_like(idx.flatten())
            counts[s].index_put_((prev, idx.flatten()), torch.ones(idx.numel()), accumulate=True)
    return counts


def neighbour_bits(symbols: torch.Tensor, probs: torch.Tensor, context: torch.Tensor) -> float:
    """Ideal bits of a grid of symbols ``[H, W]`` under ``probs [H, W, C]`` sharpened like our context coding:
    ``p(c) * a^[c == left] * b^[c == top]``, the best ``(a, b)`` of a grid of factors for this grid (+ 2 bytes);
    or, if fewer, those rows adapted like our adaptive coding (:func:`adapted_bits`, + 1 byte)."""
    h, w = symbols.shape
    left = torch.full_like(symbols, -1)
    left[:, 1:] = symbols[:, :-1]
    top = torch.full_like(symbols, -1)
    top[1:] = symbols[:-1]
    cols = torch.arange(probs.shape[-1])
    best = math.inf
    for a in (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0):
        for b in (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0):
            q = probs * torch.where(cols == left[..., None], a, 1.0) * torch.where(cols == top[..., None], b, 1.0)
            q = q / q.sum(-1, keepdim=True)
            bits = float(-torch.log2(q.gather(-1, symbols[..., None])).sum())
            if bits < best:
                best, rows = bits, q
    return best + 16 + min(0.0, adapted_bits(symbols, rows, context, left, top) + 8 - best)


def adapted_bits(symbols: torch.Tensor, rows: torch.Tensor, context: torch.Tensor, left: torch.Tensor,
                 top: torch.Tensor) -> float:
    """Ideal bits of ``symbols [H, W]`` under ``(n(c) + beta * rows(c)) / (n + beta)``, as our adaptive context
    coding mixes its rows: ``n(c)`` how often ``c`` followed the same (``context``, left, top) on earlier
    anti-diagonals, ``beta`` the best of the coder's grid (``svq_modules.coding.context._BETAS``)."""
    h, w = symbols.shape
    c = rows.shape[-1]
    diagonal = (torch.arange(h)[:, None] + torch.arange(w)[None]).flatten()
    order = torch.argsort(diagonal, stable=True)
    ctx = ((context.flatten() * (c + 1) + left.flatten() + 1) * (c + 1) + top.flatten() + 1)[order]
    sym, d = symbols.flatten()[order], diagonal[order]
    p = rows.reshape(-1, c)[order].gather(-1, sym[:, None])[:, 0].double()

    def earlier(key: torch.Tensor) -> torch.Tensor:  # occurrences of the same key on earlier anti-diagonals
        seen = torch.sort(key * (h + w) + d).values
        return torch.searchsorted(seen, key * (h + w) + d) - torch.searchsorted(seen, key * (h + w))

    n_sym, n_ctx = earlier(ctx * c + sym).double(), earlier(ctx).double()
    return min(float(-torch.log2((n_sym + beta * p) / (n_ctx + beta)).sum()) for beta in (1, 2, 4, 8, 16, 32, 64))


def rvq_codec(model: RVQAutoencoder) -> Callable[[np.ndarray], Points]:
    """Every stage; bytes: the ideal code length of each stage's indices given the previous stage's and the
    left and upper neighbours' (:func:`neighbour_bits`, adapted to the image where that is shorter), no header."""
    probs = model.counts / model.counts.sum(-1, keepdim=True)  # [3, 16 previous, 16]

    @torch.no_grad()
    def run(pixels: np.ndarray) -> Points:
        x, size = _to_tensor(pixels, model.patch_size)
        grid = (x.shape[2] // model.patch_size, x.shape[3] // model.patch_size)
        recons, codes = model.stages(x)
        stage_bits = []
        for s, c in enumerate(codes):
            c = c.reshape(grid)
            prev = codes[s - 1].reshape(grid) if s else torch.zeros_like(c)
            stage_bits.append(neighbour_bits(c, probs[s][prev], prev))
        bits = np.cumsum(stage_bits)
        return [(int(math.ceil(float(b) / 8)), _to_pixels(model.decode(r, grid), size)) for b, r in zip(bits, recons)]

    return run


def train_compressai(steps: int, lmbda: float) -> Any:
    from compressai.zoo import bmshj2018_factorized

    path = CODEC_CACHE / f"bmshj2018_factorized_{config_key(steps, 'compressai', lmbda, autoencoder=False)}.pt"
    torch.manual_seed(0)
    net = bmshj2018_factorized(quality=3, pretrained=False)  # N=128, M=192
    if path.exists():
        net.load_state_dict(torch.load(path, weights_only=True))
        net.update(force=True)
        return net.eval()
    print(f"[train] CompressAI bmshj2018-factorized, lambda={lmbda}, {steps} steps", file=sys.stderr, flush=True)
    main = [p for n, p in net.named_parameters() if not n.endswith(".quantiles")]
    aux = [p for n, p in net.named_parameters() if n.endswith(".quantiles")]
    opt, aux_opt = torch.optim.Adam(main, lr=1e-3), torch.optim.Adam(aux, lr=1e-3)
    sched = cosine(opt, steps)
    net.train()
    for _, x in batches(steps):
        out = net(x)
        num_pixels = x.shape[0] * x.shape[2] * x.shape[3]
        bpp = sum(torch.log(lk).sum() for lk in out["likelihoods"].values()) / (-math.log(2) * num_pixels)
        loss = lmbda * 255**2 * F.mse_loss(out["x_hat"], x) + bpp
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(main, 1.0)
        opt.step()
        sched.step()
        aux_loss = net.aux_loss()
        aux_opt.zero_grad()
        aux_loss.backward()
        aux_opt.step()
    CODEC_CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    net.update(force=True)
    return net.eval()


def compressai_codec(net: Any) -> Callable[[np.ndarray], Points]:
    @torch.no_grad()
    def run(pixels: np.ndarray) -> Points:
        x, size = _to_tensor(pixels, 16)
        enc = net.compress(x)
        nbytes = sum(len(s) for strings in enc["strings"] for s in strings) + 4  # + the latent shape (2 x uint16)
        return [(nbytes, _to_pixels(net.decompress(enc["strings"], enc["shape"])["x_hat"], size))]

    return run


# ------------------------------------------------------------------------------------------------ figures


def bd_rate(ours: np.ndarray, peer: np.ndarray) -> float:
    """Bjontegaard delta rate of ``ours`` against ``peer`` in percent (``[P, 2]`` (bpp, PSNR) points each).

    ``log(bpp)`` as a function of PSNR for each curve, through its efficient points (PSNR and bpp both
    rising), by piecewise cubic Hermite interpolation (PCHIP: no overshoot, so near-flat stretches of a
    curve do not swing a polynomial fit), averaged over the PSNR interval both cover;
    ``exp(mean difference) - 1``. Negative: ours needs fewer bits for the same PSNR. NaN when the
    curves do not overlap.
    """
    from scipy.interpolate import PchipInterpolator

    curves = [_efficient(pts) for pts in (ours, peer)]
    if min(len(c) for c in curves) < 2:
        return math.nan
    lo = max(c[:, 1].min() for c in curves)
    hi = min(c[:, 1].max() for c in curves)
    if not hi > lo:
        return math.nan
    means = [PchipInterpolator(c[:, 1], np.log(c[:, 0])).integrate(lo, hi) / (hi - lo) for c in curves]
    return float((math.exp(means[0] - means[1]) - 1) * 100)


def _bd_against(ours: np.ndarray, peer: np.ndarray) -> float:
    """:func:`bd_rate` of ``ours`` against ``peer``'s efficient points near ours' PSNR range (``[P, >= 2]`` each;
    efficient first, so that a dominated point never stands in for an efficient one just outside the range)."""
    return bd_rate(ours[:, :2], near(_efficient(peer[:, :2]), ours[:, 1].min(), ours[:, 1].max()))


def _efficient(points: np.ndarray) -> np.ndarray:
    """The efficient points of a curve: in bpp order, each one with a higher PSNR than every cheaper point."""
    pts = points[np.lexsort((-points[:, 1], points[:, 0]))]  # bpp ascending, PSNR descending on ties
    keep = [0]
    for i in range(1, len(pts)):  # a handful of rate points
        if pts[i, 1] > pts[keep[-1], 1]:
            keep.append(i)
    return pts[keep]


def near(points: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """The points of a sweep inside the PSNR range [lo, hi], plus one neighbour on each side."""
    order = np.argsort(points[:, 1])
    pts = points[order]
    inside = np.flatnonzero((pts[:, 1] >= lo) & (pts[:, 1] <= hi))
    if inside.size == 0:
        return pts
    return pts[max(inside[0] - 1, 0): inside[-1] + 2]


def interp_psnr(points: np.ndarray, bpp: float) -> float:
    """PSNR of a sweep at ``bpp`` (linear in log bpp between its points; NaN outside)."""
    order = np.argsort(points[:, 0])
    x, y = np.log(points[order, 0]), points[order, 1]
    b = math.log(bpp)
    return float(np.interp(b, x, y)) if x[0] <= b <= x[-1] else math.nan


def _against_jpeg(point: np.ndarray, jpeg: np.ndarray, smallest: str = "q=1",
                  largest: str = f"q={JPEG_QUALITIES[-1]}") -> str:
    """One cell of a per-image JPEG table: ``point`` (bpp, PSNR, ...) of ours against a JPEG sweep's efficient
    points (ours dB - JPEG dB at ours' bpp); outside the sweep, both points with the sweep's end named."""
    sweep = _efficient(jpeg[:, :2])
    lowest, highest = sweep[0], sweep[-1]
    if point[0] < lowest[0]:
        return f"below {smallest} ({point[1]:.1f} dB vs {lowest[1]:.1f} dB at {lowest[0]:.3f} bpp)"
    if point[0] > highest[0]:
        return f"above {largest} ({point[1]:.1f} dB vs {highest[1]:.1f} dB at {highest[0]:.3f} bpp)"
    return f"{point[1] - interp_psnr(sweep, point[0]):+.2f}"


def measure(codec: Callable[[np.ndarray], Points], images: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per image ``[P, 3]`` (bpp, PSNR, MS-SSIM)."""
    out = {}
    for name, pixels in images.items():
        n = pixels.shape[0] * pixels.shape[1]
        out[name] = np.array([(8 * b / n, psnr(y, pixels), ms_ssim(y, pixels)) for b, y in codec(pixels)])
    return out


def plot_styles(series: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """One colour per row of the RD plot (tab20), ours drawn thicker, the image codecs dashed / dotted."""
    from matplotlib import colormaps

    colors = colormaps["tab20"].colors
    styles: dict[str, dict[str, Any]] = {k: {"color": colors[i % len(colors)]} for i, k in enumerate(series)}
    styles.get("ours", {}).update(linewidth=2.5, color="black")
    for name, dash in (("JPEG", "--"), ("WebP", "--"), (JPEG_ANY_SCALE, ":")):
        styles.get(name, {}).update(linestyle=dash)
    return styles


def mean_curve(per_image: dict[str, np.ndarray]) -> np.ndarray:
    return np.mean(np.stack(list(per_image.values())), axis=0)


# ------------------------------------------------------------------------------------------------ main


def train_peer(name: str, steps: int) -> Any:
    """Train (or load from the cache) one peer by name: ``flat<b>`` (trained as ours), ``plainflat<b>`` (trained
    on the nearest codewords, ``model/quantizer=default``), ``rvq`` or ``compressai:<lambda>``."""
    plain = name.startswith("plain")
    flat = name[5:] if plain else name
    if flat.startswith("flat") and flat[4:].isdigit():
        b = int(flat[4:])
        return train_run(name, steps, [f"model.codebook_size={2**b}", f"bits=[{b // 2}]"]
                         + (["model/quantizer=default"] if plain else []))
    if name == "rvq":
        return train_rvq(steps)
    if name.startswith("compressai:"):
        return train_compressai(steps, float(name.split(":", 1)[1]))
    raise SystemExit(f"--train-only {name}: allowed: flat<bits>, plainflat<bits>, rvq, compressai:<lambda>")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", type=Path, help="the default run's checkpoint (default: train it, cached)")
    ap.add_argument("--steps", type=int, default=None, help="training steps of every peer (default: the default run's)")
    ap.add_argument("--lambdas", default="0.0035,0.013,0.0483", help="CompressAI rate-distortion trade-offs")
    ap.add_argument("--no-report", action="store_true", help="print only; do not write docs/benchmarks/codec.md")
    ap.add_argument("--ours-only", action="store_true",
                    help="only ours, JPEG and WebP (quick check of a model change; implies --no-report)")
    ap.add_argument("--no-compressai", action="store_true", help="leave the CompressAI rows out (their training is "
                    "the slowest part: ~13 CPU-minutes per lambda at 800 steps)")
    ap.add_argument("--train-only", metavar="PEER",
                    help="only train (and cache) one peer: flat4, flat6, flat8, plainflat4 (..8), rvq or "
                         "compressai:<lambda> "
                         "(to train peers in parallel processes)")
    args = ap.parse_args()
    torch.manual_seed(0)
    steps = args.steps or default_steps()
    if args.train_only:
        train_peer(args.train_only, steps)
        return
    images = heldout_images()
    ckpt = args.ckpt or train_run("default", steps, [])

    rows: dict[str, dict[str, np.ndarray]] = {}
    rows["ours"] = measure(ours_codec(ckpt), images)
    rows[STATIC_CONTEXT] = measure(ours_codec(ckpt, coding="context"), images)
    rows[NO_CONTEXT] = measure(ours_codec(ckpt, coding="entropy"), images)
    rows[NEAREST] = measure(ours_codec(ckpt, rate_weight=0.0, full_depth=True), images)
    rows[FULL_DEPTH] = measure(ours_codec(ckpt, full_depth=True), images)
    notes: list[str] = []
    if not args.ours_only:
        peers(rows, images, steps, "" if args.no_compressai else args.lambdas, notes)
    rows["JPEG"] = measure(pillow_codec("JPEG", JPEG_QUALITIES), images)
    rows[JPEG_ANY_SCALE] = measure(downscaled_codec(pillow_codec("JPEG", JPEG_QUALITIES), JPEG_SCALES), images)
    rows["WebP"] = measure(pillow_codec("WEBP", WEBP_QUALITIES), images)
    write(rows, images, steps, ckpt, notes, report=not (args.no_report or args.ours_only),
          unquantized=unquantized_psnr(ckpt, images))


def peers(rows: dict[str, dict[str, np.ndarray]], images: dict[str, np.ndarray], steps: int, lambdas: str,
          notes: list[str]) -> None:
    """The trained peers' rows: flat VQs, ResidualVQ, CompressAI (when it imports)."""
    for b in FLAT_BITS:
        # trained two ways, two points each: the nearest codewords, and the image command's rate-weighted
        # choice (which moves a flat VQ's single point down its own curve, to a rate ours may not reach)
        for peer, label in ((f"flat{b}", f"flat VQ {b} bits"), (f"plainflat{b}", f"flat VQ {b} bits, {PLAIN}")):
            ckpt = train_peer(peer, steps)
            points = [measure(ours_codec(ckpt, last_only=True, rate_weight=w, full_depth=True), images)
                      for w in (0.0, None)]
            rows[label] = {n: np.concatenate([p[n] for p in points]) for n in images}
    rows["ResidualVQ 16x3, dropout"] = measure(rvq_codec(train_rvq(steps)), images)
    if not lambdas:
        notes.append("CompressAI rows left out (--no-compressai)")
        return
    try:
        import compressai  # noqa: F401
    except ImportError as e:
        notes.append(f"CompressAI rows missing: {e}")
        return
    ca = [measure(compressai_codec(train_compressai(steps, float(lm))), images) for lm in lambdas.split(",")]
    rows["CompressAI factorized"] = {name: np.concatenate([c[name] for c in ca]) for name in images}


def _shown(row: str, points: np.ndarray) -> np.ndarray:
    """The points of a row that the tables and the plot show: all of them, or for JPEG at any scale (its
    scales x qualities overlap) its efficient points."""
    return _efficient(points) if row == JPEG_ANY_SCALE else points


def _versions(packages: tuple[str, ...]) -> str:
    """``"name version, ..."`` of the installed ``packages`` (``not installed`` where one is missing)."""
    from importlib.metadata import PackageNotFoundError, version

    def one(name: str) -> str:
        try:
            return f"{name} {version(name)}"
        except PackageNotFoundError:
            return f"{name} not installed"

    return ", ".join(one(p) for p in packages)


def write(rows: dict[str, dict[str, np.ndarray]], images: dict[str, np.ndarray], steps: int, ckpt: Path,
          notes: list[str], report: bool, unquantized: dict[str, float]) -> None:
    mean = {k: mean_curve(v) for k, v in rows.items()}
    ours = mean["ours"]
    where = ckpt.relative_to(REPO_ROOT) if ckpt.is_relative_to(REPO_ROOT) else ckpt
    lines = [f"Images: {', '.join(f'{k} ({v.shape[1]}x{v.shape[0]})' for k, v in images.items())}; "
             f"peers trained {steps} steps on the default run's crops. Ours: `{where}`. "
             f"Peer packages: {_versions(('vector-quantize-pytorch', 'compressai', 'Pillow'))}.", ""]
    # per layer: ours against JPEG / WebP at the same bpp (per image, then averaged) and the flat VQ
    header = ["layer", "bpp", "PSNR dB", "MS-SSIM", "ours - JPEG", "images", "ours - JPEG at any scale", "images",
              "ours - WebP", "images"]
    table = []
    for l in range(ours.shape[0]):
        row: list[Any] = [l, ours[l, 0], ours[l, 1], ours[l, 2]]
        for peer in ("JPEG", JPEG_ANY_SCALE, "WebP"):  # ours dB - peer dB at ours' bpp, where the sweep reaches it
            gaps = [rows["ours"][n][l, 1] - interp_psnr(_efficient(rows[peer][n][:, :2]), rows["ours"][n][l, 0])
                    for n in images]
            gaps = [g for g in gaps if math.isfinite(g)]
            row += [float(np.mean(gaps)) if gaps else math.nan, f"{len(gaps)} of {len(images)}"]
        table.append(row)
    lines += ["**Ours per layer** (mean over the images; ours - JPEG / WebP: the mean over the images whose sweep "
              "reaches ours' bpp there, interpolated in log bpp; see the per-image table below):", "",
              markdown_table(header, table), ""]
    peers = []
    for k, v in mean.items():
        if k == "ours":
            continue
        shown, each = _shown(k, v), [_bd_against(rows["ours"][n], rows[k][n]) for n in images]
        known = [b for b in each if math.isfinite(b)]
        peers.append([k, ", ".join(f"{b:.3f}" for b in shown[:, 0]), ", ".join(f"{p:.2f}" for p in shown[:, 1]),
                      ", ".join(f"{s:.3f}" for s in shown[:, 2]), _bd_against(ours, v), *each,
                      float(np.mean(known)) if known else math.nan, f"{len(known)} of {len(each)}"])
    lines += ["**Peers** (mean over the images; for JPEG at any scale, the efficient points of its "
              f"{len(JPEG_SCALES)} x {len(JPEG_QUALITIES)} settings) and BD-rate of ours against each "
              "(negative = ours smaller), on the mean curves and per image (`-`: none on that image, where the curves "
              "do not overlap in PSNR or the peer has fewer than two efficient points there). The mean curves can "
              "mislead: an average of curves of different shapes; the per-image figures are the ones to trust:", "",
              markdown_table(["codec", "bpp", "PSNR dB", "MS-SSIM", "BD-rate of ours %, mean curves",
                              *(f"{n} %" for n in images), "mean of the per-image %", "images"], peers), ""]
    flat = [[k, choice, v[i, 0], v[i, 1], interp_psnr(ours[:, :2], v[i, 0]), interp_psnr(ours[:, :2], v[i, 0]) - v[i, 1]]
            for k, v in mean.items() if k.startswith("flat")
            for i, choice in enumerate(("nearest codewords", "image defaults"))]
    lines += ["**Ours against flat VQs** at the flat VQ's rate (ours interpolated; each flat VQ trained as ours, "
              f"and with `{PLAIN}` on the nearest codewords; its codewords chosen two ways):", "",
              markdown_table(["flat VQ", "codewords", "bpp", "PSNR dB", "ours dB at that bpp", "ours - flat"], flat), ""]
    lines += ["**Ours against JPEG per image** (ours dB - JPEG dB at ours' bpp; `below q=1`: ours' file is smaller "
              "than JPEG's smallest, quality 1, whose PSNR follows in brackets):", "",
              markdown_table(["image", *(f"layer {l}" for l in range(ours.shape[0]))],
                             [[n, *(_against_jpeg(rows["ours"][n][l], rows["JPEG"][n]) for l in range(ours.shape[0]))]
                              for n in images]), ""]
    lines += ["**Ours against JPEG at any scale per image** (ours dB - the best JPEG dB at ours' bpp over the "
              f"scales 1/{', 1/'.join(str(s) for s in JPEG_SCALES[1:])}; `below`: ours' file is smaller than the "
              "smallest of them, quality 1 at 1/" + str(JPEG_SCALES[-1]) + "):", "",
              markdown_table(["image", *(f"layer {l}" for l in range(ours.shape[0]))],
                             [[n, *(_against_jpeg(rows["ours"][n][l], rows[JPEG_ANY_SCALE][n],
                                                  f"1/{JPEG_SCALES[-1]} q=1", f"q={JPEG_QUALITIES[-1]} full size")
                                    for l in range(ours.shape[0]))] for n in images]), ""]
    ceiling = [[n, rows["ours"][n][-1, 0], rows["ours"][n][-1, 1], unquantized[n],
                interp_psnr(rows["JPEG"][n][:, :2], rows["ours"][n][-1, 0])] for n in images]
    lines += ["**The autoencoder's ceiling**: PSNR with the latents not quantized (no rate; the transforms alone), "
              "against full depth and JPEG at full depth's bpp:", "",
              markdown_table(["image", "full depth bpp", "full depth dB", "latents not quantized dB",
                              "JPEG dB at full depth's bpp"], ceiling), ""]
    per = [[n, k, ", ".join(f"{b:.3f}/{p:.2f}" for b, p in _shown(k, rows[k][n])[:, :2])] for n in images
           for k in ("ours", "JPEG", JPEG_ANY_SCALE, "CompressAI factorized") if k in rows]
    lines += ["**Per image** (bpp/PSNR; JPEG at any scale: its efficient points):", "",
              markdown_table(["image", "codec", "bpp/PSNR"], per), ""]
    lines += [f"Note: {n}" for n in notes]
    body = "\n".join(lines)
    print(body)
    raw = {k: {n: v.tolist() for n, v in per_img.items()} for k, per_img in rows.items()}
    CODEC_CACHE.mkdir(parents=True, exist_ok=True)
    (CODEC_CACHE / "last_results.json").write_text(json.dumps(raw))
    if report:
        from svq_modules.plotting import plot_rate_distortion

        series = {k: _shown(k, v)[:, :2] for k, v in mean.items()}
        fig = plot_rate_distortion(series, None, metric="psnr", rate="bpp", annotations={"ours": True},
                                   styles=plot_styles(series), title="whole held-out images (mean)", logx=True,
                                   figsize=(9.0, 5.0))
        fig.axes[0].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.savefig(RD_PNG, dpi=120, bbox_inches="tight")
        write_report("codec", "Image codec: the default model against JPEG, WebP and learned peers",
                     body + f"\n\n![rate-distortion](../images/{RD_PNG.name})\n",  # from docs/benchmarks/
                     readme=body + f"\n\n![rate-distortion](docs/images/{RD_PNG.name})\n")  # from the root


if __name__ == "__main__":
    main()
