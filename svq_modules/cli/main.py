"""Command-line tool: layered compression of ``[N, D]`` arrays and of images into ``.svq`` files.

Usage::

    python -m svq_modules compress data.npy -o data.svq --codebook-size 1024 --bits 4,2,2,2,2
    python -m svq_modules decompress data.svq --layers 3 -o approx.npy --reference data.npy
    python -m svq_modules info data.svq

    python -m svq_modules compress photo.png --model CKPT -o photo.svq
    python -m svq_modules decompress photo.svq --model CKPT --layers 2 -o out.png
    python -m svq_modules info photo.svq --json

Images (``.png``, ``.jpg``, ``.jpeg``, ``.bmp``, ``.tif``, ``.tiff``, picked by
the input's suffix) are coded with a trained
:class:`~svq_modules.lightning.ScalableVQAutoencoder` checkpoint (``--model``,
written by ``train.py``) into a progressive image file that a cut right after
any layer leaves decodable; ``decompress`` and ``info`` tell it from an array
file by its magic. See :mod:`svq_modules.cli.images`.

``compress`` trains a :class:`~svq_modules.nn.ScalableVQ` on the data
(EMA k-means, then the hierarchy from the exact per-code statistics of the
data), or takes a trained one (``--model``), and writes a ``.svq`` file: the
per-layer chunks framed with their lengths, preceded by the model unless
``--model`` was given (the file then only carries the model's fingerprint and
``decompress`` needs the same ``--model``). With ``--embed-centers`` every chunk
is self-contained and ``--no-store-model`` gives a file that decodes without
any model. The layout is in ``docs/bitstream.md``.

Inputs: ``[N, D]`` float arrays in ``.npy``, ``.npz`` or ``.pt`` files (see
:func:`svq_modules.arrays.load_array`; ``--key`` picks an entry). Integer arrays
are refused (convert them to float: the decoded data is float32), and so are
arrays of other than two dimensions (reshape them to ``[N, D]``). Model files
(``--model`` / ``--save-model``) hold ``{"format", "config", "state_dict"}``; a
plain ``ScalableVQ.state_dict()`` saved with ``torch.save`` works too.

Every option and file is checked before any work: a user error is one line on
stderr, exit status 1, and no file is written. No output may be one of the
inputs (however its path is spelled). Outputs are written at the end, all or
none, atomically; Ctrl-C leaves no output and exits with status 130.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from ..coding import CODINGS
from .commands import cmd_compress, cmd_decompress, cmd_info
from .errors import CLIError, one_line
from .model_file import load_model  # noqa: F401  (imported from here by tests/test_bitstream.py)

__all__ = ["build_parser", "main"]

#: exit status of an interrupted command (128 + SIGINT, as shells report it)
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are :class:`CLIError` s (one line, exit 1) instead of ``sys.exit(2)``."""

    def error(self, message: str) -> NoReturn:
        raise CLIError(f"{message} (see {self.prog} --help)")


def _comma_list(text: str, kind: type) -> list[Any]:
    """``"4,2,2"`` -> ``[kind("4"), ...]``; pieces that ``kind`` cannot read stay strings, for the check to name them."""
    out: list[Any] = []
    for piece in text.split(","):
        piece = piece.strip()
        try:
            out.append(kind(piece))
        except ValueError:
            out.append(piece)
    return out


def _bits(text: str) -> list[int | str]:
    """``"4,2,2"`` -> ``[4, 2, 2]`` (:func:`_comma_list` of ints, for check_bit_proposal)."""
    return _comma_list(text, int)


def _numbers(text: str) -> list[float | str]:
    """``"2,2,0,1"`` -> ``[2.0, 2.0, 0.0, 1.0]`` (:func:`_comma_list` of floats, for check_layer_weights)."""
    return _comma_list(text, float)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m svq_modules``; each subcommand sets ``func`` to its command."""
    p = _Parser(prog="python -m svq_modules", description="Scalable (layered) VQ compression of [N, D] arrays and images.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{compress,decompress,info}")

    c = sub.add_parser("compress", help="train (or load) a ScalableVQ and write a layered .svq file; or code an image")
    c.add_argument("data", help="input [N, D] float array (.npy, .npz, .pt), or image (.png, .jpg, ...: needs --model)")
    c.add_argument("-o", "--output", required=True, help="output .svq file")
    c.add_argument("--key", help="entry of an .npz file or of a dict saved with torch.save (default: the first)")
    c.add_argument("--model", help="use this trained model instead of training; the file then needs it to decode "
                                   "(images: the ScalableVQAutoencoder checkpoint of train.py, required)")
    c.add_argument("--save-model", help="also write the trained model to this file (.pt)")
    c.add_argument("--no-store-model", action="store_true", help="do not put the trained model into the .svq file")
    c.add_argument("--coding", choices=CODINGS,
                   help="payload coding (default: adaptive for images, entropy for arrays; adaptive and context "
                        "need a grid of latents, so images only)")
    c.add_argument("--embed-centers", choices=["float16", "float32"], help="self-contained chunks carrying their centers")
    c.add_argument("--rate-weight", type=float, metavar="W",
                   help="pick each vector's codeword by least error + W x (mean error) x (its code length in bits): "
                        "smaller files, larger errors (default: 1 for images, 0 for arrays: the nearest codeword)")
    c.add_argument("--repeat-bits", type=float, metavar="F",
                   help="images: a codeword that repeats its left or upper neighbour's counts F of its bits in that "
                        "choice (in [0, 1]; default 0.4; 1: no preference)")
    c.add_argument("--layer-weights", type=_numbers, metavar="W0,W1,...",
                   help="images: in that choice, a codeword's error is its error after each layer weighted by these "
                        "(one per layer of the model, the last: full depth; used as given; default 2,2,0,...,0,1 "
                        "unless a layer of the image then decodes more than 0.1%% worse than the one before it, "
                        "when 0,...,0,1, full depth alone, may be used instead)")
    t = c.add_argument_group("training (not with --model)")
    t.add_argument("--codebook-size", type=int, help="K, number of codewords, at most N (default 1024)")
    t.add_argument("--bits", type=_bits, help="bits per layer, base first (default 4,2,2,2,2)")
    steps = t.add_mutually_exclusive_group()
    steps.add_argument("--epochs", type=int, help="training passes over the data (default 10)")
    steps.add_argument("--iters", type=int, help="training steps (instead of --epochs)")
    t.add_argument("--batch-size", type=int, help="training batch size, at most N (default 8192)")
    t.add_argument("--kmeans-iters", type=int, help="Lloyd iterations of the k-means init (default 10)")
    t.add_argument("--seed", type=int, help="random seed (default 0)")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no summary")
    c.set_defaults(func=cmd_compress)

    d = sub.add_parser("decompress", help="decode the first layers of a .svq file")
    d.add_argument("input", help=".svq file (array or image file)")
    d.add_argument("-o", "--output", required=True, help="output array (.npy, .npz, .pt), or image (.png, .jpg, ...)")
    d.add_argument("--layers", type=int, help="number of layers to decode (default all)")
    d.add_argument("--model", help="the model the file was made with (when it does not include one; images: always)")
    d.add_argument("--reference", help="original array: print the MSE per layer (image file: original image, PSNR)")
    d.add_argument("--reference-key", help="entry of an .npz / dict .pt --reference file (default: the first)")
    d.add_argument("-q", "--quiet", action="store_true", help="no summary")
    d.set_defaults(func=cmd_decompress)

    i = sub.add_parser("info", help="print the layers of a .svq file")
    i.add_argument("input", help=".svq file")
    i.add_argument("--json", action="store_true", help="image files: print one JSON object (layer_end, bpp, ...)")
    i.set_defaults(func=cmd_info)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    0: done; 1: a user error (bad option, bad or missing file, corrupt stream), printed
    as one ``error: ...`` line on stderr, nothing written; 130: interrupted (Ctrl-C),
    nothing written. ``--help`` prints the help and returns 0.
    """
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    except KeyboardInterrupt:
        print("error: interrupted, nothing written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (CLIError, ValueError) as e:  # ValueError: the package's bad-input errors (BitstreamError is one)
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    except OSError as e:  # a file that went away or became unreadable after the checks, a full disk...
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or one_line(e)}", file=sys.stderr)
        return 1
