"""Images through a trained :class:`~svq_modules.lightning.ScalableVQAutoencoder`: progressive image files.

``compress photo.png --model CKPT -o photo.svq`` encodes the image with the
checkpoint's encoder, quantizes the latents with its ScalableVQ and writes an
image file (:mod:`svq_modules.coding.image_file`): a header (image size,
channels, patch grid, a fingerprint of the whole autoencoder) and one chunk
per layer. ``decompress photo.svq --model CKPT [--layers L] -o out.png``
decodes the first layers (all by default) with the same checkpoint; ``info
photo.svq [--json]`` needs no model. A file cut right after a layer decodes
to that layer.

Choices:

* sizes: the image is padded up to the patch grid by replicating its edge
  pixels, and the decoded image is cropped back to the original size;
* channels: RGB and grayscale images (alpha only when fully opaque; palette
  images become RGB; 16-bit and float images are refused). A grayscale image
  through an RGB model is replicated to 3 channels and the decoded image is
  written back as grayscale (the mean of the 3 decoded channels); an RGB image
  through a grayscale model is refused;
* pixels are 8-bit, ``/ 255`` into the model and ``round(255 * clamp(y, 0, 1))`` out;
* coding: each layer is adaptively context coded by default
  (:mod:`svq_modules.coding.context`: a latent's symbol given its left and upper
  neighbours' symbols, under the probabilities the model learned mixed with the
  counts of the image's own earlier symbols in the same context), raw where that
  is smaller; ``--coding`` picks ``context`` (the model's probabilities alone),
  ``entropy`` (no neighbours) or ``raw`` instead;
* output: PNG, JPEG (quality 95, no chroma subsampling: a second, lossy
  coding), BMP or TIFF, by the output suffix.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..coding import BitstreamError, compress_layers, decompress_layers, fingerprint_tensors, read_header
from ..coding.container import CONTAINER_MAGIC
from ..coding.image_file import ImageFile, ImageHeader, pack_image_file, read_image_file, unpack_image_file
from ..lightning.table import format_rd_table
from ..nearest import mean_squared_error, prefer_neighbours
from ..validation import check_int, check_layer_weights, check_weight
from .errors import CLIError, one_line
from .outputs import bytes_writer, write_outputs
from .paths import check_distinct, check_input_file, check_output_file

__all__ = [
    "AUTOENCODER_DOMAIN",
    "IMAGE_SUFFIXES",
    "autoencoder_fingerprint",
    "compress_image",
    "compress_pixels",
    "decode_image",
    "decompress_image",
    "default_layer_weights",
    "encode_image",
    "image_file_info",
    "info_image",
    "is_image_path",
    "latents_to_pixels",
    "load_autoencoder",
    "load_image",
    "save_image",
]

#: image files read by ``compress`` and written by ``decompress`` (suffix -> Pillow format)
_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF"}
IMAGE_SUFFIXES = tuple(_FORMATS)
#: suffix of the image files ``compress`` writes
_SVQ_SUFFIXES = (".svq",)
#: domain of :func:`autoencoder_fingerprint` (it carries the fingerprint's version)
AUTOENCODER_DOMAIN = b"svq-modules/image-file/autoencoder/v1"
#: ``compress`` options of the array path that mean nothing for an image: option -> attribute
_ARRAY_ONLY = {
    "--key": "key", "--save-model": "save_model", "--no-store-model": "no_store_model",
    "--embed-centers": "embed_centers", "--codebook-size": "codebook_size", "--bits": "bits", "--epochs": "epochs",
    "--iters": "iters", "--batch-size": "batch_size", "--kmeans-iters": "kmeans_iters", "--seed": "seed",
}  # fmt: skip
_COLOR = {1: "grayscale", 3: "RGB"}
#: ``compress`` of an image: the codeword choice's rate weight, relative to the image's mean latent error
#: (:meth:`~svq_modules.nn.quantizer.ScalableVQ.quantize`; 0 = nearest codeword), and the share of its bits a
#: codeword counts when it repeats its left or upper neighbour's (:func:`~svq_modules.nearest.prefer_neighbours`;
#: 1 = no preference). The pair is the one of lowest mean BD-rate against the nearest codewords on the default
#: run's training images (the left 80 % of china.jpg and flower.jpg): with plain training, among 11 pairs (W in
#: 0.25-2, the share in 0.25-1), -4.7 % there (W=2 without the preference: +2.7 %); selected again for the
#: entropy-constrained training of today's default run, among 10 pairs (W in 0.5-2, the share in 0.25-1), -8.4 %
#: there (the next: W=0.5 with 0.25, -7.8 %; W=1 without the preference: -2.3 %); both with the full-depth error alone.
RATE_WEIGHT = 1.0
REPEAT_BITS = 0.4
#: ``compress`` of an image, by default: in that choice the errors after the first two layers each weigh this
#: much against the error at full depth (:func:`default_layer_weights`), unless a layer of the image then decodes
#: worse than the layer before it (its MSE more than ``1 + LAYER_SLACK`` times that layer's), when full depth alone
#: counts (the choice before 2026-12-08) if its worst step is smaller. The check decodes every layer (and again on a
#: fallback): ``compress`` of grace_hopper takes 0.6 s instead of 0.2 s. Measured with
#: the default run's checkpoints, seeds 0-3, weights 2,2,0,0,0,1 against full depth alone, BD-rate of the image
#: files: training images (the left 80 % of china.jpg and flower.jpg) -4.4 to -13.3 % (mean -7.8 to -9.4 % per
#: seed), held out (grace_hopper, the right 20 % strips) -3.9 to -15.2 %; on grace_hopper against JPEG at any
#: scale every layer closer (seed 0: -1.49 / -0.89 / -0.52 / -0.66 / -1.06 / -1.07 dB against -1.50 / -1.33 /
#: -0.77 / -1.07 / -1.19 / -1.21), full depth at fewer bytes and a lower PSNR (0.113 against 0.136 bpp, 22.69
#: against 23.26 dB): the later layers add less. The weight: on seed 0's training images, among 2 (-6.3 / -9.2 %),
#: 1 (-3.6 / -4.7 %), 3 (+2.2 / -10.2 %), 4 (+2.0 / +1.5 %), 0.5 for every coarser layer (-2.8 / -3.2 %) and a
#: higher rate weight alone (W=3: -3.2 / +2.4 %). Why the check: on the test suite's small model (a 29x22 image,
#: 3 layers) the last layer decoded below the second with any of 2, 1 and 0.5, its latent errors still decreasing.
#: With the check, seeds 0-3, the weights are kept on 13 of the 20 (seed, image) pairs above; BD-rate against full
#: depth alone per seed, china / flower (left 80 %), grace_hopper, china / flower (right 20 %): seed 0 -6.3 / -9.2,
#: -4.6, -12.2 / -15.2 %; seed 1 -4.4 / 0, 0, 0 / 0; seed 2 -5.6 / -13.3, -8.2, -7.5 / 0; seed 3 -6.5 / -10.6,
#: -3.9, 0 / 0 (0: full depth alone, as before). These runs coded the files with ``context`` coding; under the
#: ``adaptive`` default (2026-12-08), seed 0, training images, BD-rate against these defaults: coarse weight 1
#: +2.9 / +3.7 %, 3 and 4 +10.1 / +12.3 % (full depth alone); rate weight 0.7 +2.6 / +2.1 %, 1.4 +10.0 / +16.2 %;
#: repeat bits 0.25 -0.8 / +1.7 %, 0.6 +2.2 / +0.3 %, 1 (no preference) +8.7 / +5.7 %: kept.
COARSE_WEIGHT = 2.0
#: the slack of that check: a layer's squared error may exceed the one before it by this share (about 0.004 dB; the
#: output pixels' rounding: with full depth alone, the held-out strips of bench/bench_codec.py step down by 0.0003 dB)
LAYER_SLACK = 1e-3


def has_container_magic(path: Path) -> bool:
    """Whether the file at ``path`` starts like a ``.svq`` array container (False when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(CONTAINER_MAGIC)) == CONTAINER_MAGIC
    except OSError:
        return False


def is_image_path(path: str) -> bool:
    """Whether ``path`` names an image ``compress`` reads (by suffix, any case)."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


# ----------------------------------------------------------------------------------------------- pixels


def _opaque(alpha: Any, what: str) -> None:
    if np.asarray(alpha).min() < 255:
        raise CLIError(f"{what}: the image has transparent pixels; this codec stores RGB or grayscale, "
                       f"flatten it onto a background first")


def load_image(path: Path, what: str) -> np.ndarray:
    """``[H, W, C]`` uint8 pixels of an 8-bit image file, ``C`` = 1 (grayscale) or 3 (RGB).

    Raises:
        CLIError: not an image Pillow reads, several frames, 16-bit / float pixels, transparency.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            if getattr(im, "n_frames", 1) > 1:
                raise CLIError(f"{what}: holds {im.n_frames} frames; give a single image")
            im.load()
            mode = im.mode
            if mode in ("P", "PA"):
                im, mode = im.convert("RGBA"), "RGBA"
            if mode in ("1", "L", "LA", "La"):
                if mode.startswith("L") and len(mode) == 2:
                    _opaque(im.getchannel("A"), what)
                return np.asarray(im.convert("L"), dtype=np.uint8)[:, :, None].copy()
            if mode in ("RGBA", "RGBa"):
                _opaque(im.getchannel("A"), what)
            elif mode not in ("RGB", "CMYK", "YCbCr", "LAB", "HSV"):
                raise CLIError(f"{what}: {mode} pixels (16-bit or floating point); convert the image to 8 bits first")
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except CLIError:
        raise
    except Exception as e:  # Pillow raises many kinds (UnidentifiedImageError, OSError, DecompressionBombError...)
        raise CLIError(f"{what}: cannot read the image ({one_line(e)})") from None


def save_image(path: Path, pixels: np.ndarray, suffix: str) -> None:
    """Write ``[H, W, C]`` uint8 pixels (``C`` = 1 or 3) in the format of ``suffix``."""
    from PIL import Image

    fmt = _FORMATS[suffix.lower()]
    im = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
    im.save(path, format=fmt, **({"quality": 95, "subsampling": 0} if fmt == "JPEG" else {}))


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


# ------------------------------------------------------------------------------------------------ model


def load_autoencoder(path: Path, what: str) -> Any:
    """The ScalableVQAutoencoder of a Lightning checkpoint (eval mode, CPU, hierarchy built).

    Raises:
        CLIError: not a checkpoint, another kind of model, or an image size it cannot take.
    """
    from ..lightning import ScalableVQAutoencoder, load_lit_module

    try:
        model = load_lit_module(path, map_location="cpu")
    except Exception as e:  # a file of another kind fails in many ways inside torch.load / Lightning
        raise CLIError(f"{what}: cannot load the checkpoint ({one_line(e)})") from None
    if not isinstance(model, ScalableVQAutoencoder):
        raise CLIError(f"{what}: a {type(model).__name__} checkpoint; images need a ScalableVQAutoencoder "
                       f"checkpoint (written by train.py, e.g. outputs/train/<run>/checkpoints/last.ckpt)")
    if int(model.hparams.in_channels) not in _COLOR:
        raise CLIError(f"{what}: the model takes {model.hparams.in_channels}-channel images; "
                       f"this command handles grayscale (1) and RGB (3) models")
    model = model.float().eval()
    try:
        model.quantizer.update()  # no-op for checkpoints, which hold a fresh hierarchy
    except Exception as e:  # e.g. a quantizer that never saw data
        raise CLIError(f"{what}: cannot build the quantizer's hierarchy ({one_line(e)})") from None
    return model


def autoencoder_fingerprint(model: torch.nn.Module) -> bytes:
    """8 bytes identifying every weight and buffer of ``model`` (:func:`~svq_modules.coding.fingerprint_tensors`)."""
    return fingerprint_tensors({k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}, AUTOENCODER_DOMAIN)


def _check_channels(channels: int, model: Any, what: str) -> None:
    model_channels = int(model.hparams.in_channels)
    if channels > model_channels:
        raise CLIError(f"{what}: an {_COLOR[channels]} image, but the model takes {_COLOR[model_channels]} images; "
                       f"convert the image to grayscale first or use an RGB model")


def default_layer_weights(num_layers: int) -> list[float]:
    """The image command's layer weights for a model of ``num_layers`` layers: :data:`COARSE_WEIGHT` for each of the
    first two layers before full depth, 1 for full depth, 0 between."""
    return [COARSE_WEIGHT if layer < min(2, num_layers - 1) else float(layer == num_layers - 1)
            for layer in range(num_layers)]


@torch.inference_mode()
def encode_image(model: Any, pixels: np.ndarray, rate_weight: float = RATE_WEIGHT, repeat_bits: float = REPEAT_BITS,
                 layer_weights: Sequence[float] | None = None) -> tuple[ImageHeader, torch.Tensor]:
    """The header of ``pixels`` (``[H, W, C]`` uint8) and its ``[1, grid_h, grid_w]`` int64 codeword indices,
    chosen with ``rate_weight`` relative to the image's mean latent error and the error weighted over the layers by
    ``layer_weights`` (:meth:`ScalableVQ.quantize`), a codeword that repeats the left or upper neighbour's counting
    ``repeat_bits`` of its bits (:func:`~svq_modules.nearest.prefer_neighbours`; 1: no preference).

    ``layer_weights=None``: :func:`default_layer_weights`, kept if every layer of the image then decodes within
    ``LAYER_SLACK`` of the layer before it or better (mean squared error of the output pixels at most ``1 +
    LAYER_SLACK`` times the previous layer's); else full depth alone, unless its worst step between two layers
    is no smaller. Given explicitly, the weights are used unchecked."""
    height, width, channels = pixels.shape
    p, model_channels = int(model.hparams.patch_size), int(model.hparams.in_channels)
    grid = (-(-height // p), -(-width // p))
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255.0
    x = x.expand(1, model_channels, height, width)  # a grayscale image through an RGB model: replicated
    pad = (0, grid[1] * p - width, 0, grid[0] * p - height)
    if any(pad):
        x = F.pad(x, pad, mode="replicate")
    z, q = model.encode(x), model.quantizer
    grid_z = z.permute(0, 2, 3, 1)  # [1, grid_h, grid_w, D]
    # the relative weight in squared distance, once for every choice below (quantize(relative=True) computes the same)
    lam = rate_weight * mean_squared_error(grid_z, q.codebook, q.quantize(z)) if rate_weight > 0 else 0.0
    header = ImageHeader(height, width, channels, model_channels, "edge" if any(pad) else "none", p, grid,
                         autoencoder_fingerprint(model))

    def choose(weights: Sequence[float] | None) -> torch.Tensor:
        indices = q.quantize(z, lam, layer_weights=weights)
        if lam > 0 and repeat_bits < 1:
            codebook, spread = (q.codebook, None) if weights is None else q.index.layered_codebook(weights)
            indices = prefer_neighbours(grid_z, codebook, indices, q.index.code_lengths(), lam, repeat_bits, spread)
        return indices

    if layer_weights is not None:
        return header, choose(layer_weights)
    indices = choose(default_layer_weights(q.num_layers))
    worst = _worst_step(model, header, pixels, indices)
    if worst > 1.0 + LAYER_SLACK:
        full_depth = choose(None)
        if _worst_step(model, header, pixels, full_depth) < worst:
            indices = full_depth
    return header, indices


def _worst_step(model: Any, header: ImageHeader, pixels: np.ndarray, indices: torch.Tensor) -> float:
    """The largest ratio of a layer's squared error (output pixels against ``pixels``) to the layer's before it,
    for codeword ``indices [1, grid_h, grid_w]``: at most 1 when every layer decodes at least as well as the one
    before. One decode per layer."""
    q, original = model.quantizer, torch.from_numpy(pixels).float()
    errors = [float((latents_to_pixels(model, header, q.index.layer_centers(n)[indices]).float() - original)
                    .pow(2).mean()) for n in range(1, q.num_layers + 1)]
    return max((later / max(earlier, 1e-12) for earlier, later in zip(errors, errors[1:])), default=1.0)


def compress_pixels(model: Any, pixels: np.ndarray, coding: str = "adaptive", rate_weight: float = RATE_WEIGHT,
                    repeat_bits: float = REPEAT_BITS,
                    layer_weights: Sequence[float] | None = None) -> tuple[ImageHeader, list[bytes]]:
    """The header and per-layer chunks of an image file of ``pixels`` (``[H, W, C]`` uint8); ``coding`` as for
    :func:`~svq_modules.coding.compress_layers` (``"adaptive"``, ``"context"``, ``"entropy"`` or ``"raw"``), ``rate_weight``,
    ``repeat_bits`` and ``layer_weights`` as for :func:`encode_image`."""
    header, indices = encode_image(model, pixels, rate_weight, repeat_bits, layer_weights)
    q = model.quantizer
    return header, compress_layers(q.hierarchy, q.tables, indices, coding=coding)


@torch.inference_mode()
def decode_image(model: Any, header: ImageHeader, decoded: Any) -> np.ndarray:
    """``[H, W, C]`` uint8 pixels from a :class:`~svq_modules.coding.Decoded` of the image's chunks (all its layers)."""
    return latents_to_pixels(model, header, decoded.reconstruction()).numpy()


@torch.inference_mode()
def latents_to_pixels(model: Any, header: ImageHeader, z: torch.Tensor) -> torch.Tensor:
    """``[H, W, C]`` uint8 pixels of the image of ``header`` from its latents ``z [1, grid_h, grid_w, D]``: decoded,
    cropped to the image, clamped, as grayscale for a grayscale image through an RGB model, rounded."""
    y = model.decode(z.permute(0, 3, 1, 2).float())[:, :, : header.height, : header.width].clamp(0, 1)
    if header.channels == 1 and header.model_channels == 3:
        y = y.mean(1, keepdim=True)
    return (y[0].permute(1, 2, 0) * 255.0).round().to(torch.uint8)


# --------------------------------------------------------------------------------------------- commands


def rate_weight_option(args: argparse.Namespace, default: float) -> float:
    """``compress --rate-weight``: the checked value, or ``default`` when not given."""
    if args.rate_weight is None:
        return default
    try:
        return check_weight(args.rate_weight, "--rate-weight")
    except ValueError as e:
        raise CLIError(str(e)) from None


def _repeat_bits_option(args: argparse.Namespace) -> float:
    """``compress --repeat-bits`` of an image: a share in [0, 1], or :data:`REPEAT_BITS` when not given."""
    if args.repeat_bits is None:
        return REPEAT_BITS
    value = args.repeat_bits
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise CLIError(f"--repeat-bits must be a float in [0, 1], got {value!r}")
    return float(value)


def _layer_weights_option(args: argparse.Namespace, num_layers: int) -> list[float] | None:
    """``compress --layer-weights`` of an image, checked against the model's ``num_layers`` (None: the default)."""
    if args.layer_weights is None:
        return None
    try:
        return check_layer_weights(args.layer_weights, num_layers, "--layer-weights")
    except ValueError as e:
        raise CLIError(str(e)) from None


def _check_model_option(args: argparse.Namespace, command: str) -> None:
    if not args.model:
        raise CLIError(f"{command} of an image needs --model, the trained autoencoder checkpoint "
                       f"(e.g. outputs/train/<run>/checkpoints/last.ckpt)")


def _layer_rows(f: ImageFile) -> list[dict[str, Any]]:
    """Per layer: coding, symbols, bytes, where it ends, and the file's bits per pixel when cut there."""
    pixels = f.header.height * f.header.width
    starts = [f.header_size, *f.layer_end[:-1]]
    rows = []
    for layer, (chunk, start, end) in enumerate(zip(f.chunks, starts, f.layer_end)):
        h = read_header(chunk)
        rows.append({"layer": layer, "coding": h.coding, "symbols": h.num_symbols, "bytes": end - start,
                     "ends at": end, "file bpp": f"{8 * end / pixels:.4f}"})  # fmt: skip
    return rows


def compress_image(args: argparse.Namespace) -> int:
    """``compress`` of an image: encode with ``--model``'s autoencoder, write the layered image file."""
    # 1. options and files, before any work
    _check_model_option(args, "compress")
    rate_weight, repeat_bits = rate_weight_option(args, RATE_WEIGHT), _repeat_bits_option(args)
    given = [opt for opt, attr in _ARRAY_ONLY.items() if getattr(args, attr, None) not in (None, False)]
    if given:
        raise CLIError(f"{', '.join(given)}: options for [N, D] arrays; an image is coded with the "
                       f"--model checkpoint alone, drop them")
    src = check_input_file(args.data, "", IMAGE_SUFFIXES)
    model_path = check_input_file(args.model, "--model")
    check_distinct([("", src), ("--model", model_path)], [("-o", Path(args.output).expanduser())])
    out = check_output_file(args.output, "-o", _SVQ_SUFFIXES)

    # 2. inputs
    pixels = load_image(src, str(args.data))
    model = load_autoencoder(model_path, f"--model {args.model}")
    _check_channels(pixels.shape[2], model, str(args.data))
    layer_weights = _layer_weights_option(args, model.quantizer.num_layers)

    # 3. work
    t0 = time.perf_counter()
    header, chunks = compress_pixels(model, pixels, coding=args.coding or "adaptive", rate_weight=rate_weight,
                                     repeat_bits=repeat_bits, layer_weights=layer_weights)
    data = pack_image_file(header, chunks)

    # 4. output
    write_outputs([(out, bytes_writer(data))])
    if not args.quiet:
        print(format_rd_table(_layer_rows(unpack_image_file(data))))
        print(f"wrote {args.output}: {len(data)} bytes, {8 * len(data) / (header.height * header.width):.4f} bpp, "
              f"{header.height}x{header.width} {_COLOR[header.channels]} image in {len(chunks)} layers "
              f"in {time.perf_counter() - t0:.1f} s")
    return 0


def _read(path: Path, what: str) -> ImageFile:
    try:
        return read_image_file(path)
    except BitstreamError as e:
        raise CLIError(f"{what}: {e}") from None


def decompress_image(args: argparse.Namespace) -> int:
    """``decompress`` of an image file: the first ``--layers`` layers through ``--model``'s decoder."""
    # 1. options and files, before any work
    if args.layers is not None:
        try:
            check_int(args.layers, "--layers", min=1)
        except ValueError as e:
            raise CLIError(str(e)) from None
    if args.reference_key is not None:
        raise CLIError("--reference-key names an entry of an array file; an image file's --reference is an image")
    src = check_input_file(args.input)
    if has_container_magic(src):
        raise CLIError(f"{args.input}: an array file (.svq container), not an image file: decompress it to an "
                       f"array (.npy, .npz, .pt)")
    _check_model_option(args, "decompress")
    model_path = check_input_file(args.model, "--model")
    ref_path = check_input_file(args.reference, "--reference", IMAGE_SUFFIXES) if args.reference else None
    inputs = [("", src), ("--model", model_path)] + ([("--reference", ref_path)] if ref_path is not None else [])
    check_distinct(inputs, [("-o", Path(args.output).expanduser())])
    out = check_output_file(args.output, "-o", IMAGE_SUFFIXES)

    # 2. inputs
    f = _read(src, str(args.input))
    if args.layers is not None and args.layers > f.num_layers:
        raise CLIError(f"--layers {args.layers}: {args.input} holds {f.num_layers} layers, cannot decode more")
    layers = f.num_layers if args.layers is None else args.layers
    model = load_autoencoder(model_path, f"--model {args.model}")
    h = f.header
    fingerprint = autoencoder_fingerprint(model)
    if fingerprint != h.fingerprint:
        raise CLIError(f"{args.input} was made with another model (fingerprint {h.fingerprint.hex()}); "
                       f"--model {args.model} is {fingerprint.hex()}: pass the checkpoint it was made with")
    reference = load_image(ref_path, f"--reference {args.reference}") if ref_path is not None else None
    if reference is not None and reference.shape != (h.height, h.width, h.channels):
        raise CLIError(f"--reference {args.reference}: a {reference.shape[0]}x{reference.shape[1]} "
                       f"{_COLOR[reference.shape[2]]} image, the file holds a {h.height}x{h.width} {_COLOR[h.channels]} one")

    # 3. work
    q = model.quantizer
    try:
        decoded = decompress_layers(q.hierarchy, q.tables, f.chunks[:layers])
    except BitstreamError as e:
        raise CLIError(f"{args.input}: {e} (with --model {args.model})") from None
    pixels = decode_image(model, h, decoded)

    # 4. output
    write_outputs([(out, lambda path: save_image(path, pixels, out.suffix))])
    if not args.quiet:
        end = f.layer_end[layers - 1]
        psnr = "" if reference is None else f", PSNR {_psnr(pixels, reference):.2f} dB against --reference"
        print(f"wrote {args.output}: {h.height}x{h.width} {_COLOR[h.channels]} from {layers} of {f.num_layers} layers "
              f"({end} bytes, {8 * end / (h.height * h.width):.4f} bpp){psnr}")
    return 0


def image_file_info(f: ImageFile, name: str) -> dict[str, Any]:
    """What ``info --json`` prints about an image file: header fields, layers, where each ends, bits per pixel."""
    h = f.header
    pixels = h.height * h.width
    first = read_header(f.chunks[0])
    return {
        "file": name, "format": "svq-image", "bytes": f.size, "height": h.height, "width": h.width,
        "channels": h.channels, "model_channels": h.model_channels, "patch_size": h.patch_size,
        "latent_grid": list(h.grid), "padding": h.padding, "model_fingerprint": h.fingerprint.hex(),
        "quantizer_fingerprint": first.fingerprint.hex(), "codebook_size": first.num_leaves, "dim": first.dim,
        "header_bytes": f.header_size, "num_layers": f.num_layers, "stream_layers": f.stream_layers,
        "complete": f.num_layers == f.stream_layers, "layer_end": list(f.layer_end),
        "layer_bytes": [r["bytes"] for r in _layer_rows(f)], "coding": [read_header(c).coding for c in f.chunks],
        "bpp": [8 * end / pixels for end in f.layer_end],
    }  # fmt: skip


def info_image(args: argparse.Namespace) -> int:
    """``info`` of an image file (``--json``: one JSON object, see :func:`image_file_info`)."""
    src = check_input_file(args.input)
    f = _read(src, str(args.input))
    info = image_file_info(f, str(args.input))
    if args.json:
        print(json.dumps(info))
        return 0
    h = f.header
    cut = "" if info["complete"] else f" (cut: the stream has {f.stream_layers})"
    print(f"{args.input}: {h.height}x{h.width} {_COLOR[h.channels]} image, {f.num_layers} layers{cut}, {f.size} bytes, "
          f"{info['bpp'][-1]:.4f} bpp; model {h.model_channels} channels, {h.patch_size}-pixel patches, latent grid "
          f"{h.grid[0]}x{h.grid[1]}, padding {h.padding}, fingerprint {h.fingerprint.hex()}")
    print(format_rd_table(_layer_rows(f)))
    return 0
