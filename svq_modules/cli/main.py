"""Command-line tool: layered compression of ``[N, D]`` arrays into ``.svq`` files.

Usage::

    python -m svq_modules compress data.npy -o data.svq --codebook-size 1024 --bits 4,2,2,2,2
    python -m svq_modules decompress data.svq --layers 3 -o approx.npy --reference data.npy
    python -m svq_modules info data.svq

``compress`` trains a :class:`~svq_modules.nn.ScalableVQ` on the data
(EMA k-means, then the hierarchy from the exact per-code statistics of the
data), or takes a trained one (``--model``), and writes a ``.svq`` file: the
per-layer chunks framed with their lengths, preceded by the model unless
``--model`` was given (the file then only carries the model's fingerprint and
``decompress`` needs the same ``--model``). With ``--embed-centers`` every chunk
is self-contained and ``--no-store-model`` gives a file that decodes without
any model. The layout is in ``docs/bitstream.md``.

Inputs: ``.npy`` (``numpy.load(allow_pickle=False)``) or ``.pt`` (a tensor or
array saved with ``torch.save``, loaded with ``weights_only=True``) of shape
``[N, D]`` (or ``[..., D]``: the leading shape is kept). Model files
(``--model`` / ``--save-model``) hold ``{"format", "config", "state_dict"}``; a
plain ``ScalableVQ.state_dict()`` saved with ``torch.save`` works too. All files
are written atomically (temporary file in the same directory, then rename).
"""

from __future__ import annotations

import argparse
import io
import math
import sys
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..coding import CODINGS, BitstreamError, compress_layers, decompress_layers, read_header
from ..coding.container import atomic_write, read_container, write_container

MODEL_FORMAT = "svq_modules.ScalableVQ"
MODEL_VERSION = 1


class CLIError(Exception):
    """A user error: printed without a traceback, exit status 1."""


# --------------------------------------------------------------------------------------- files


def load_array(path: str | Path) -> np.ndarray:
    """``.npy`` / ``.pt`` file -> float array ``[..., D]`` (at least 2-D, finite)."""
    path = Path(path)
    if not path.exists():
        raise CLIError(f"{path}: no such file")
    if path.suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except ValueError as e:
            raise CLIError(f"{path}: not a plain .npy array ({e})") from None
    elif path.suffix == ".pt":
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if torch.is_tensor(obj):
            arr = obj.detach().float().numpy() if obj.dtype == torch.bfloat16 else obj.detach().numpy()
        elif isinstance(obj, np.ndarray):
            arr = obj
        else:
            raise CLIError(f"{path}: expected a tensor saved with torch.save, got {type(obj).__name__}")
    else:
        raise CLIError(f"{path}: unsupported file type {path.suffix!r} (use .npy or .pt)")
    if arr.ndim < 2 or arr.shape[-1] < 1:
        raise CLIError(f"{path}: expected an [N, D] array, got shape {list(arr.shape)}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise CLIError(f"{path}: expected a real numeric array, got dtype {arr.dtype}")
    if arr.size == 0:
        raise CLIError(f"{path}: the array is empty (shape {list(arr.shape)})")
    arr = np.asarray(arr)
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise CLIError(f"{path}: the array contains NaN or Inf")
    return arr


def save_array(path: str | Path, arr: np.ndarray) -> None:
    """Atomically write ``arr`` as ``.npy`` or ``.pt``."""
    path = Path(path)
    if path.suffix == ".npy":
        atomic_write(path, lambda f: np.save(f, arr, allow_pickle=False))
    elif path.suffix == ".pt":
        atomic_write(path, lambda f: torch.save(torch.from_numpy(np.ascontiguousarray(arr)), f))
    else:
        raise CLIError(f"{path}: unsupported output type {path.suffix!r} (use .npy or .pt)")


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
    try:
        raw = zlib.decompress(data)
    except zlib.error as e:
        raise CLIError(f"{what}: corrupt model section ({e})") from None
    return model_from_bytes(raw, what)


def model_from_bytes(data: bytes, what: str = "model") -> Any:
    """Inverse of :func:`model_to_bytes`; also accepts a plain ``ScalableVQ.state_dict()``."""
    from ..nn import ScalableVQ

    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CLIError(f"{what}: cannot read the model ({type(e).__name__}: {e})") from None
    if isinstance(obj, dict) and obj.get("format") == MODEL_FORMAT:
        if obj.get("version") != MODEL_VERSION:
            raise CLIError(f"{what}: unsupported model file version {obj.get('version')!r}")
        config, state = obj["config"], obj["state_dict"]
    elif isinstance(obj, dict) and torch.is_tensor(obj.get("codebook")) and torch.is_tensor(obj.get("layers_widths")):
        state = obj
        widths = state["layers_widths"]
        config = {
            "dim": int(state["codebook"].shape[1]),
            "codebook_size": int(state["codebook"].shape[0]),
            "bits": [max(1, int(w)) for w in widths[:-1].tolist()],
            "num_layers": int(widths.shape[0]),
        }
    else:
        raise CLIError(f"{what}: not a ScalableVQ model file (expected {MODEL_FORMAT!r} or a ScalableVQ state_dict)")
    try:
        vq = ScalableVQ(config["dim"], config["codebook_size"], list(config["bits"]), num_layers=config["num_layers"])
        vq.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise CLIError(f"{what}: cannot load the model ({e})") from None
    vq.eval()
    if not vq.is_built:
        raise CLIError(f"{what}: the model has no hierarchy yet (call update() before saving it)")
    return vq


def load_model(path: str | Path) -> Any:
    path = Path(path)
    if not path.exists():
        raise CLIError(f"{path}: no such file")
    return model_from_bytes(path.read_bytes(), str(path))


# --------------------------------------------------------------------------------------- training


def parse_bits(text: str) -> list[int]:
    try:
        bits = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--bits must be comma-separated positive ints, got {text!r}") from None
    if not bits or any(b <= 0 for b in bits):
        raise argparse.ArgumentTypeError(f"--bits must be comma-separated positive ints, got {text!r}")
    return bits


def train_model(x: torch.Tensor, args: argparse.Namespace) -> Any:
    """EMA-train a ScalableVQ codebook on ``x [N, D]``, then build it from the exact statistics of ``x``."""
    from tqdm.auto import tqdm

    from ..nn import ScalableVQ

    n, dim = x.shape
    if args.codebook_size < 2 ** args.bits[0]:
        raise CLIError(f"--codebook-size {args.codebook_size} is smaller than the base layer's 2**{args.bits[0]} cells")
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    vq = ScalableVQ(dim, args.codebook_size, args.bits, kmeans_iters=args.kmeans_iters)
    vq.train()
    batch = max(1, min(args.batch_size, n))
    per_epoch = math.ceil(n / batch)
    steps = args.iters if args.iters is not None else args.epochs * per_epoch
    with tqdm(total=steps, desc="training codebook", unit="batch", disable=args.quiet, file=sys.stderr) as bar:
        done = 0
        while done < steps:
            perm = torch.randperm(n, generator=gen)
            for s in range(0, n, batch):
                if done == steps:
                    break
                vq(x[perm[s : s + batch]])
                done += 1
                bar.update(1)
    if not args.quiet:
        print("building hierarchy ...", file=sys.stderr)
    return ScalableVQ.from_codebook(vq.codebook.detach().clone(), x=x, bits=args.bits)


# --------------------------------------------------------------------------------------- reports


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [list(map(str, header))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def summary(chunks: Sequence[bytes], decoded: Any, reference: np.ndarray | None) -> str:
    """Bytes per layer, cumulative bits per vector and (with a reference) MSE per layer."""
    rows = []
    total = 0
    n = max(1, read_header(chunks[0]).num_vectors)
    ref = None if reference is None else torch.from_numpy(np.asarray(reference, dtype=np.float64))
    for layer, c in enumerate(chunks[: decoded.num_layers]):
        h = read_header(c)
        total += len(c)
        row = [layer, h.coding, h.num_symbols, len(c), total, f"{8 * total / n:.3f}"]
        if ref is not None:
            rec = decoded.reconstruction(layer + 1).double().cpu()
            row.append(f"{float(((rec - ref) ** 2).mean()):.4e}")
        rows.append(row)
    header = ["layer", "coding", "symbols", "bytes", "cum bytes", "cum bits/vec"] + (["MSE"] if ref is not None else [])
    return _table(rows, header)


# --------------------------------------------------------------------------------------- commands


def cmd_compress(args: argparse.Namespace) -> int:
    arr = load_array(args.data)
    batch_shape, dim = arr.shape[:-1], arr.shape[-1]
    x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).reshape(-1, dim)
    t0 = time.perf_counter()
    if args.model:
        vq = load_model(args.model)
        if vq.dim != dim:
            raise CLIError(f"{args.model}: the model is for D={vq.dim}, the data has D={dim}")
    else:
        vq = train_model(x, args)
        if args.save_model:
            atomic_write(args.save_model, model_to_bytes(vq))
    store_model = not args.model and not args.no_store_model
    if not args.model and args.no_store_model and not (args.embed_centers or args.save_model):
        raise CLIError("--no-store-model needs --embed-centers or --save-model, or the file could not be decoded")
    with torch.no_grad():
        idx = vq.quantize(x).reshape(batch_shape)
    hierarchy, tables = vq.hierarchy, vq.tables
    chunks = compress_layers(hierarchy, tables, idx, coding=args.coding, embed_centers=args.embed_centers)
    size = write_container(args.output, chunks, pack_model(vq) if store_model else None)
    decoded = decompress_layers(hierarchy, tables, chunks)
    if not args.quiet:
        print(summary(chunks, decoded, arr.astype(np.float64)))
        print(
            f"wrote {args.output}: {size} bytes ({sum(map(len, chunks))} in {len(chunks)} layer chunks"
            f"{', model included' if store_model else ''}) in {time.perf_counter() - t0:.1f} s"
        )
    return 0


def cmd_decompress(args: argparse.Namespace) -> int:
    if args.layers is not None and args.layers < 1:
        raise CLIError("--layers must be >= 1")
    container = read_container(args.input, max_chunks=args.layers)
    if args.layers is not None and args.layers > container.num_chunks:
        raise CLIError(f"{args.input} holds {container.num_chunks} layers, --layers {args.layers} asked for more")
    if args.model:
        vq = load_model(args.model)
    elif container.model is not None:
        vq = unpack_model(container.model, f"{args.input} (model section)")
    else:
        vq = None
        if read_header(container.chunks[0]).embed is None:
            raise CLIError(f"{args.input} references an external model (fingerprint {container.fingerprint.hex()}): pass --model")
    if vq is not None:
        decoded = decompress_layers(vq.hierarchy, vq.tables, container.chunks)
    else:
        decoded = decompress_layers(None, None, container.chunks)
    approx = decoded.reconstruction().detach().cpu().float().numpy()
    save_array(args.output, approx)
    reference = None
    if args.reference:
        reference = load_array(args.reference)
        if tuple(reference.shape) != tuple(approx.shape):
            raise CLIError(f"--reference has shape {list(reference.shape)}, the decoded data {list(approx.shape)}")
    if not args.quiet:
        print(summary(container.chunks, decoded, None if reference is None else reference.astype(np.float64)))
        print(f"wrote {args.output}: {list(approx.shape)} from {decoded.num_layers} of {container.num_chunks} layers")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    container = read_container(args.input)
    print(
        f"{args.input}: {container.num_chunks} layer chunks, model fingerprint {container.fingerprint.hex()}, "
        f"model {'included (' + str(len(container.model)) + ' bytes)' if container.model is not None else 'external'}"
    )
    rows = []
    for c in container.chunks:
        h = read_header(c)
        rows.append([h.layer, h.coding, h.step, h.embed or "-", h.num_vectors, h.num_symbols, h.payload_len, h.embed_len, len(c)])
    print(_table(rows, ["layer", "coding", "step", "embed", "vectors", "symbols", "payload", "embedded", "bytes"]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m svq_modules", description="Scalable (layered) VQ compression of [N, D] arrays.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="train (or load) a ScalableVQ and write a layered .svq file")
    c.add_argument("data", help="input [N, D] array (.npy or .pt)")
    c.add_argument("-o", "--output", required=True, help="output .svq file")
    c.add_argument("--codebook-size", type=int, default=1024, help="K, number of codewords (default 1024)")
    c.add_argument("--bits", type=parse_bits, default=[4, 2, 2, 2, 2], help="bits per layer, base first (default 4,2,2,2,2)")
    c.add_argument("--model", help="use this trained model instead of training; the file then needs it to decode")
    c.add_argument("--save-model", help="also write the trained model to this file")
    c.add_argument("--no-store-model", action="store_true", help="do not put the trained model into the .svq file")
    c.add_argument("--coding", choices=CODINGS, default="entropy", help="payload coding (default entropy)")
    c.add_argument("--embed-centers", choices=["float16", "float32"], help="self-contained chunks carrying their centers")
    c.add_argument("--epochs", type=int, default=10, help="training passes over the data (default 10)")
    c.add_argument("--iters", type=int, help="training steps (overrides --epochs)")
    c.add_argument("--batch-size", type=int, default=8192, help="training batch size (default 8192)")
    c.add_argument("--kmeans-iters", type=int, default=10, help="Lloyd iterations of the k-means init (default 10)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no summary")
    c.set_defaults(func=cmd_compress)

    d = sub.add_parser("decompress", help="decode the first layers of a .svq file")
    d.add_argument("input", help=".svq file")
    d.add_argument("-o", "--output", required=True, help="output array (.npy or .pt)")
    d.add_argument("--layers", type=int, help="number of layers to decode (default all)")
    d.add_argument("--model", help="the model the file was made with (when it does not include one)")
    d.add_argument("--reference", help="original array: print the MSE per layer")
    d.add_argument("-q", "--quiet", action="store_true")
    d.set_defaults(func=cmd_decompress)

    i = sub.add_parser("info", help="print the layers of a .svq file")
    i.add_argument("input")
    i.set_defaults(func=cmd_info)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CLIError, BitstreamError, FileNotFoundError, IsADirectoryError, PermissionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

