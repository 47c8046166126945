"""The one plain-text rate-distortion table (training, ``eval.py``, the command line).

Pure Python, imports nothing heavy: ``from svq_modules.lightning.table import format_rd_table``
does not import Lightning.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["RD_COLUMNS", "format_rd_table"]

#: known columns in table order: key -> (header, number format, minimum width)
RD_COLUMNS: dict[str, tuple[str, str, int]] = {
    "layer": ("layer", "{}", 6),
    "bits": ("bits/vec", "{:.3f}", 9),
    "bits_entropy": ("bits/vec(ent)", "{:.3f}", 13),
    "bpp": ("bpp", "{:.4f}", 9),
    "bpp_entropy": ("bpp(ent)", "{:.4f}", 10),
    "mse": ("MSE", "{:.4e}", 11),
    "psnr": ("PSNR dB", "{:.2f}", 8),
}


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key in RD_COLUMNS and key != "layer" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return RD_COLUMNS[key][1].format(float(value))
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_rd_table(rows: Sequence[Mapping[str, Any]], *, flat: Mapping[str, Any] | None = None,
                    title: str | None = None, markdown: bool = False) -> str:
    """Plain-text rate-distortion table: one line per layer, then optionally the flat VQ.

    Columns come from the keys of the rows: first ``layer``, then any keys this
    function does not know (e.g. ``coding``, ``bytes``; header = the key, shown with
    ``str``), then the known ones present, in the order of :data:`RD_COLUMNS`:
    ``bits`` / ``bits_entropy`` (cumulative bits per vector, raw and entropy-coded),
    ``bpp`` / ``bpp_entropy`` (the same per pixel), ``mse``, ``psnr``. A missing or
    ``None`` value prints as ``-``. Columns are right-aligned.

    Args:
        rows: one mapping per layer, e.g. ``{"layer": 0, "bits": 4.0, "mse": 1e-2}``.
        flat: the flat VQ with the same codebook (same keys); its first column reads ``flat``.
        title: a line above the table.
        markdown: a Markdown table (for README / docs pages written by ``bench/``) instead
            of aligned plain text.

    Returns:
        The table, lines joined by ``"\\n"`` (no trailing newline).
    """
    every = list(rows) + ([flat] if flat is not None else [])
    if not every:
        raise ValueError("rows is empty: nothing to tabulate")
    keys: list[str] = []
    for row in every:
        keys += [k for k in row if k not in keys]
    extra = [k for k in keys if k not in RD_COLUMNS]
    columns = ["layer"] + extra + [k for k in RD_COLUMNS if k != "layer" and k in keys]
    body = [[_cell(k, r.get(k)) for k in columns] for r in rows]
    if flat is not None:
        body.append(["flat"] + [_cell(k, flat.get(k)) for k in columns[1:]])
    heads = [RD_COLUMNS[k][0] if k in RD_COLUMNS else k for k in columns]
    widths = [max([len(h), RD_COLUMNS.get(k, ("", "", 0))[2]] + [len(line[i]) for line in body])
              for i, (k, h) in enumerate(zip(columns, heads))]
    lines = [title] if title else []
    if markdown:
        lines += (["", "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)] if title else
                  ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)])
        lines += ["| " + " | ".join(line) + " |" for line in body]
        return "\n".join(lines)
    head = " ".join(h.rjust(w) for h, w in zip(heads, widths))
    lines += [head, "-" * len(head)]
    lines += [" ".join(c.rjust(w) for c, w in zip(line, widths)) for line in body]
    return "\n".join(lines)
