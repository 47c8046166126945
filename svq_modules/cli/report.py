"""What the command line prints: bytes and MSE per layer of a stream, the chunks of a file.

Both tables go through the package's one table formatter,
:func:`svq_modules.lightning.table.format_rd_table` (plain Python: it does not import Lightning).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..coding import read_header
from ..lightning.table import format_rd_table

__all__ = ["chunk_table", "layer_summary"]


def layer_summary(chunks: Sequence[bytes], decoded: Any, reference: np.ndarray | None) -> str:
    """Per layer: coding, symbols, bytes, cumulative bytes and file bits per vector, and the MSE with a ``reference``.

    Args:
        chunks: the layer chunks (at least ``decoded.num_layers``).
        decoded: :class:`~svq_modules.coding.Decoded` of those chunks.
        reference: the original array shaped like the data (any real dtype), or None.
    """
    rows = []
    total = 0
    n = max(1, read_header(chunks[0]).num_vectors)
    ref = None if reference is None else torch.from_numpy(np.asarray(reference, dtype=np.float64))
    for layer, c in enumerate(chunks[: decoded.num_layers]):
        h = read_header(c)
        total += len(c)
        row: dict[str, Any] = {"layer": layer, "coding": h.coding, "symbols": h.num_symbols, "bytes": len(c),
                               "cum bytes": total, "cum bits/vec": f"{8 * total / n:.3f}"}  # fmt: skip
        if ref is not None:
            rec = decoded.reconstruction(layer + 1).double().cpu()
            row["mse"] = float(((rec - ref) ** 2).mean())
        rows.append(row)
    return format_rd_table(rows)


def chunk_table(chunks: Sequence[bytes]) -> str:
    """One row per chunk: its header fields and size."""
    rows = []
    for c in chunks:
        h = read_header(c)
        rows.append({"layer": h.layer, "coding": h.coding, "step": h.step, "embed": h.embed or "-", "vectors": h.num_vectors,
                     "symbols": h.num_symbols, "payload": h.payload_len, "embedded": h.embed_len, "bytes": len(c)})  # fmt: skip
    return format_rd_table(rows)
