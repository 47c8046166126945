"""Plain-text tables the command line prints: bytes and MSE per layer of a stream, the chunks of a file."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..coding import read_header

__all__ = ["chunk_table", "format_table", "layer_summary"]


def format_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """Right-aligned columns under ``header`` and a dashed rule."""
    cells = [list(map(str, header))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def layer_summary(chunks: Sequence[bytes], decoded: Any, reference: np.ndarray | None) -> str:
    """Bytes per layer, cumulative bits per vector and, with a ``reference`` shaped like the data, the MSE per layer.

    Args:
        chunks: the layer chunks (at least ``decoded.num_layers``).
        decoded: :class:`~svq_modules.coding.Decoded` of those chunks.
        reference: the original array ``[..., D]`` (any real dtype), or None.
    """
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
    return format_table(rows, header)


def chunk_table(chunks: Sequence[bytes]) -> str:
    """One row per chunk: its header fields and size."""
    rows = []
    for c in chunks:
        h = read_header(c)
        rows.append([h.layer, h.coding, h.step, h.embed or "-", h.num_vectors, h.num_symbols, h.payload_len, h.embed_len, len(c)])
    return format_table(rows, ["layer", "coding", "step", "embed", "vectors", "symbols", "payload", "embedded", "bytes"])
