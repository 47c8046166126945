"""The subcommands ``compress``, ``decompress`` and ``info``.

Each command first checks every option and every file (inputs exist and are
readable files of the right kind, outputs are file names with a supported suffix
in writable directories, no output is an input), then loads, then works, and
writes its outputs last, all or none (:func:`~svq_modules.cli.outputs.write_outputs`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..arrays import ARRAY_SUFFIXES, load_array, save_array
from ..coding import GRID_CODINGS, BitstreamError, compress_layers, decompress_layers, read_header
from ..coding.container import pack_container, read_container
from ..coding.image_file import has_image_magic
from ..validation import check_int, check_vectors
from .errors import CLIError
from .fit import FitOptions, check_fit_options, fit_model
from .images import compress_image, decompress_image, info_image, is_image_path, rate_weight_option
from .model_file import load_model, model_to_bytes, pack_model, unpack_model
from .outputs import bytes_writer, write_outputs
from .paths import check_distinct, check_input_file, check_output_file
from .report import chunk_table, layer_summary

__all__ = ["SVQ_SUFFIXES", "MODEL_SUFFIXES", "TRAINING_OPTIONS", "cmd_compress", "cmd_decompress", "cmd_info"]

#: suffix of the files ``compress`` writes
SVQ_SUFFIXES = (".svq",)
#: suffixes of the model files ``compress --save-model`` writes
MODEL_SUFFIXES = (".pt", ".pth")
#: ``compress`` options that only apply when it trains a model: command-line name -> FitOptions field
TRAINING_OPTIONS = {
    "--codebook-size": "codebook_size",
    "--bits": "bits",
    "--epochs": "epochs",
    "--iters": "iters",
    "--batch-size": "batch_size",
    "--kmeans-iters": "kmeans_iters",
    "--seed": "seed",
}


def _load_vectors(path: Path, key: str | None, what: str) -> tuple[np.ndarray, torch.Tensor]:
    """The data of ``compress``: the array as stored and as ``[N, D]`` float32 (integer arrays are refused)."""
    try:
        arr = load_array(path, key)
    except (ValueError, FileNotFoundError) as e:
        raise CLIError(str(e)) from None
    if np.issubdtype(arr.dtype, np.integer):
        raise CLIError(
            f"{what}: integer array (dtype {arr.dtype}); convert it to float first, e.g. np.save(path, x.astype(np.float32))"
        )
    if arr.ndim != 2:
        raise CLIError(
            f"{what}: expected an [N, D] array, got shape {list(arr.shape)}; reshape it to [N, D] first "
            f"(e.g. x.reshape(-1, {arr.shape[-1]}) for vectors along the last axis)"
        )
    limit = float(np.finfo(np.float32).max)
    if arr.size and (float(arr.max()) > limit or float(arr.min()) < -limit):  # training runs in float32
        raise CLIError(f"{what}: values beyond the float32 range (|x| > {limit:.3g}); scale the data first")
    x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    try:
        return arr, check_vectors(x, name=what)
    except ValueError as e:
        raise CLIError(str(e)) from None


def _fit_options(args: argparse.Namespace) -> FitOptions:
    """FitOptions from the parsed arguments; options not given keep their defaults."""
    given = {field: getattr(args, field) for field in TRAINING_OPTIONS.values() if getattr(args, field) is not None}
    if "bits" in given:
        given["bits"] = tuple(given["bits"])
    return FitOptions(quiet=args.quiet, **given)


def _check_compress_options(args: argparse.Namespace) -> None:
    """Option combinations of ``compress`` that cannot work or would be ignored."""
    if args.model:
        given = [name for name, field in TRAINING_OPTIONS.items() if getattr(args, field) is not None]
        if given:
            raise CLIError(f"{', '.join(given)}: training options, but --model gives a trained model; drop them or --model")
        if args.save_model:
            raise CLIError("--save-model writes the model compress trains, but --model gives one; copy that file instead")
    elif args.no_store_model and not (args.embed_centers or args.save_model):
        raise CLIError("--no-store-model needs --embed-centers or --save-model, or the file could not be decoded")
    if args.coding in GRID_CODINGS:
        raise CLIError(f"--coding {args.coding}: codes each latent given its neighbours on an image's grid; an [N, D] "
                       "array's vectors have none: use entropy (default) or raw")


def cmd_compress(args: argparse.Namespace) -> int:
    """``compress``: [N, D] array or image (picked by the input's suffix) -> ``.svq`` file."""
    if is_image_path(args.data):
        return compress_image(args)
    return compress_array(args)


def compress_array(args: argparse.Namespace) -> int:
    """Train (or load) a ScalableVQ on an ``[N, D]`` array and write its layered ``.svq`` file."""
    # 1. options and files, before any work
    _check_compress_options(args)
    rate_weight = rate_weight_option(args, 0.0)
    if args.repeat_bits is not None:
        raise CLIError("--repeat-bits: an option for images (it needs the latents' grid); drop it for arrays")
    if args.layer_weights is not None:
        raise CLIError("--layer-weights: an option for images; for arrays use ScalableVQ.quantize(x, layer_weights=...)")
    opts = _fit_options(args)
    if not args.model:
        check_fit_options(opts)  # values; K against N once the data is read
    data = check_input_file(args.data, "", ARRAY_SUFFIXES)
    inputs = [("", data)]
    if args.model:
        inputs.append(("--model", check_input_file(args.model, "--model")))
    outputs = [("-o", args.output, SVQ_SUFFIXES)]
    if args.save_model:
        outputs.append(("--save-model", args.save_model, MODEL_SUFFIXES))
    check_distinct(inputs, [(opt, Path(path).expanduser()) for opt, path, _ in outputs])  # first: the worst mistake
    out_paths = [check_output_file(path, opt, suffixes) for opt, path, suffixes in outputs]

    # 2. inputs
    arr, x = _load_vectors(data, args.key, str(args.data))
    vq = load_model(inputs[1][1], f"--model {args.model}") if args.model else None
    if vq is not None and vq.dim != x.shape[1]:
        raise CLIError(f"--model {args.model}: the model is for D={vq.dim}, the data has D={x.shape[1]}")
    if vq is None:
        check_fit_options(opts, num_vectors=x.shape[0])

    # 3. work
    t0 = time.perf_counter()
    if vq is None:
        vq = fit_model(x, opts)
    store_model = not args.model and not args.no_store_model
    with torch.no_grad():
        idx = vq.quantize(x, rate_weight, relative=True)
    chunks = compress_layers(vq.hierarchy, vq.tables, idx, coding=args.coding or "entropy",
                             embed_centers=args.embed_centers)
    data_bytes = pack_container(chunks, pack_model(vq) if store_model else None)
    text = None if args.quiet else layer_summary(chunks, decompress_layers(vq.hierarchy, vq.tables, chunks), arr)

    # 4. outputs, all or none
    writers = [(out_paths[0], bytes_writer(data_bytes))]
    if args.save_model:
        writers.append((out_paths[1], bytes_writer(model_to_bytes(vq))))
    write_outputs(writers)
    if text is not None:
        print(text)
        print(
            f"wrote {args.output}: {len(data_bytes)} bytes ({sum(map(len, chunks))} in {len(chunks)} layer chunks"
            f"{', model included' if store_model else ''}) in {time.perf_counter() - t0:.1f} s"
        )
    return 0


def _decoder(args: argparse.Namespace, container: Any, model_path: Path | None) -> Any:
    """The model decoding ``container``: ``--model``, else the file's own, else None (self-contained chunks)."""
    if model_path is not None:
        return load_model(model_path, f"--model {args.model}")
    if container.model is not None:
        return unpack_model(container.model, f"{args.input} (model section)")
    if read_header(container.chunks[0]).embed is None:
        raise CLIError(f"{args.input} references an external model (fingerprint {container.fingerprint.hex()}): pass --model")
    return None


def _is_image_file(path: str) -> bool:
    """Whether ``path`` is an image file (by its magic; False for a file that cannot be read)."""
    return has_image_magic(Path(path).expanduser())


def cmd_decompress(args: argparse.Namespace) -> int:
    """``decompress``: the first ``--layers`` layers of a ``.svq`` file -> array file, or image for an image file.

    The image path is taken for a file with the image magic, and for an image output
    name (so that a damaged image file is reported as such, not as a wrong output type).
    """
    if _is_image_file(args.input) or is_image_path(args.output):
        return decompress_image(args)
    # 1. options and files, before any work
    if args.layers is not None:
        try:
            check_int(args.layers, "--layers", min=1)
        except ValueError as e:
            raise CLIError(str(e)) from None
    src = check_input_file(args.input)
    inputs = [("", src)]
    model_path = check_input_file(args.model, "--model") if args.model else None
    ref_path = check_input_file(args.reference, "--reference", ARRAY_SUFFIXES) if args.reference else None
    inputs += [(opt, p) for opt, p in (("--model", model_path), ("--reference", ref_path)) if p is not None]
    if args.reference_key is not None and ref_path is None:
        raise CLIError("--reference-key names an entry of the --reference file, but no --reference was given")
    check_distinct(inputs, [("-o", Path(args.output).expanduser())])  # first: the worst mistake
    out = check_output_file(args.output, "-o", ARRAY_SUFFIXES)

    # 2. inputs
    container = read_container(src, max_chunks=args.layers)
    if args.layers is not None and args.layers > container.num_chunks:
        raise CLIError(f"--layers {args.layers}: {args.input} holds {container.num_chunks} layers, cannot decode more")
    vq = _decoder(args, container, model_path)
    reference = None
    if ref_path is not None:
        try:
            reference = load_array(ref_path, args.reference_key)
        except (ValueError, FileNotFoundError) as e:
            raise CLIError(str(e)) from None

    # 3. work
    try:
        decoded = decompress_layers(None if vq is None else vq.hierarchy, None if vq is None else vq.tables, container.chunks)
    except BitstreamError as e:
        raise CLIError(f"{args.input}: {e}" + (f" (with --model {args.model})" if model_path is not None else "")) from None
    approx = decoded.reconstruction().detach().cpu().float().numpy()
    if reference is not None and tuple(reference.shape) != tuple(approx.shape):
        raise CLIError(f"--reference {args.reference}: shape {list(reference.shape)}, the decoded data {list(approx.shape)}")
    text = None if args.quiet else layer_summary(container.chunks, decoded, reference)

    # 4. output
    write_outputs([(out, lambda path: save_array(path, approx))])
    if text is not None:
        print(text)
        print(f"wrote {args.output}: {list(approx.shape)} from {decoded.num_layers} of {container.num_chunks} layers")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """``info``: the model section and the layer chunks of a ``.svq`` file (or the header and layers of an image file)."""
    src = check_input_file(args.input)
    if _is_image_file(args.input):
        return info_image(args)
    if args.json:
        raise CLIError(f"--json: only for image files for now; {args.input} is an array file, use info without --json")
    container = read_container(src)
    model = f"included ({len(container.model)} bytes)" if container.model is not None else "external"
    print(
        f"{args.input}: {container.num_chunks} layer chunks, model fingerprint {container.fingerprint.hex()}, model {model}"
    )
    print(chunk_table(container.chunks))
    return 0
