"""Training a ScalableVQ codebook for ``compress`` (when no ``--model`` is given)."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..validation import check_bit_proposal, check_int
from .errors import CLIError

if TYPE_CHECKING:
    from ..nn import ScalableVQ

__all__ = ["FitOptions", "check_fit_options", "fit_model"]


@dataclass(frozen=True)
class FitOptions:
    """The training options of ``compress`` (command-line names in the comments)."""

    codebook_size: int = 1024  # --codebook-size, K
    bits: tuple[int, ...] = (4, 2, 2, 2, 2)  # --bits, base layer first
    epochs: int = 10  # --epochs, passes over the data (unless iters is given)
    iters: int | None = None  # --iters, training steps
    batch_size: int = 8192  # --batch-size (at most N: a batch never holds a vector twice)
    kmeans_iters: int = 10  # --kmeans-iters, Lloyd iterations of the k-means initialization
    seed: int = 0  # --seed
    quiet: bool = False  # -q: no progress bar


def check_fit_options(opts: FitOptions, num_vectors: int | None = None) -> None:
    """Every training option in range (and K <= ``num_vectors`` when given), checked before any training.

    Raises:
        CLIError: one line naming the option, the value and what is allowed.
    """
    try:
        check_bit_proposal(list(opts.bits), name="--bits")
        k = check_int(opts.codebook_size, "--codebook-size", min=1)
        check_int(opts.epochs, "--epochs", min=1)
        if opts.iters is not None:
            check_int(opts.iters, "--iters", min=1)
        check_int(opts.batch_size, "--batch-size", min=1)
        check_int(opts.kmeans_iters, "--kmeans-iters", min=0)
        check_int(opts.seed, "--seed", min=0, max=2**63 - 1)
    except ValueError as e:
        raise CLIError(str(e)) from None
    if k < 2 ** opts.bits[0]:
        raise CLIError(
            f"--codebook-size {k} is smaller than the base layer's 2**{opts.bits[0]} = {2 ** opts.bits[0]} cells "
            f"(--bits {','.join(map(str, opts.bits))}): use a larger codebook or fewer base-layer bits"
        )
    if num_vectors is not None and k > num_vectors:
        raise CLIError(
            f"--codebook-size {k} is more than the {num_vectors} vectors of the data: "
            f"k-means cannot place more codewords than there are vectors (use at most {num_vectors})"
        )


def fit_model(x: torch.Tensor, opts: FitOptions) -> ScalableVQ:
    """EMA-train a ScalableVQ codebook on ``x``, then build it from the exact statistics of ``x``.

    Args:
        x: ``[N, D]`` float32 training vectors (already checked).
        opts: checked options (:func:`check_fit_options`).

    Returns:
        A built :class:`~svq_modules.nn.ScalableVQ` with ``opts.codebook_size`` codewords.
    """
    from tqdm.auto import tqdm

    from ..nn import ScalableVQ

    n, dim = x.shape
    bits = list(opts.bits)
    gen = torch.Generator().manual_seed(opts.seed)
    torch.manual_seed(opts.seed)
    vq = ScalableVQ(dim, opts.codebook_size, bits, kmeans_iters=opts.kmeans_iters)
    vq.train()
    batch = min(opts.batch_size, n)
    steps = opts.iters if opts.iters is not None else opts.epochs * math.ceil(n / batch)
    with tqdm(total=steps, desc="training codebook", unit="batch", disable=opts.quiet, file=sys.stderr) as bar:
        done = 0
        while done < steps:
            perm = torch.randperm(n, generator=gen)
            for s in range(0, n, batch):
                if done == steps:
                    break
                vq(x[perm[s : s + batch]])
                done += 1
                bar.update(1)
    if not opts.quiet:
        print("building hierarchy ...", file=sys.stderr)
    return ScalableVQ.from_codebook(vq.codebook.detach().clone(), x=x, bits=bits)
