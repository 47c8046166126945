"""Per-layer byte streams of scalable VQ: :func:`compress_layers` and :func:`decompress_layers`.

A stream is a list of *chunks*, one per layer: ``chunks[l]`` carries the layer-``l``
symbols of every vector that sends one. A receiver decodes any prefix
``chunks[:n]``. This module composes the parts of the format:

* :mod:`.chunk`: header layout, CRC32, parsing one chunk, the order of chunks;
* :mod:`.tables`: model fingerprint, branch probabilities and the cached codec tables;
* :mod:`.payload`: raw and entropy coding of a layer's symbols;
* :mod:`.context`: context coding of a layer's symbols on a grid of vectors (adaptive or not);
* :mod:`.embedded`: the model part of self-contained chunks.

With ``coding="entropy"``, ``"context"`` or ``"adaptive"`` a layer whose coded payload would be
larger than its raw payload is written raw (the chunk header says per chunk which
coding it uses), so a chunk is never larger than its raw version. The byte
layout is written down in ``docs/bitstream.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from ..hierarchy import Hierarchy
from ..layers import LayerTables
from ..validation import check_choice, check_int
from .chunk import (
    CODINGS,
    EMBED_DTYPES,
    GRID_CODINGS,
    MAX_NDIM,
    MAX_STEP,
    MAX_VECTORS,
    BitstreamError,
    Chunk,
    ChunkHeader,
    as_bytes,
    check_sequence,
    pack_chunk,
    parse_chunk,
)
from .context import context_fits, decode_context, encode_grid_layer
from .embedded import codec_from_embedded, embed_section
from .payload import decode_entropy, decode_raw, encode_entropy, encode_raw, raw_payload_size
from .tables import CodecTables, check_model, codec_tables, to_numpy

__all__ = ["Decoded", "compress_layers", "decompress_layers"]


class Decoded(NamedTuple):
    """Result of :func:`decompress_layers`.

    Attributes:
        nodes: ``[n, N]`` int64, tree node of every vector after each decoded layer.
        centers: ``[M, D]`` float center of every node: the model's, or for a
            self-contained stream decoded without the model the embedded centers
            (float32; NaN rows for nodes not sent).
        batch_shape: shape of the indices the stream was made from.
        stream_layers: number of layers the sender produced.
    """

    nodes: Tensor
    centers: Tensor
    batch_shape: tuple[int, ...]
    stream_layers: int

    @property
    def num_layers(self) -> int:
        """Decoded layers n."""
        return self.nodes.shape[0]

    def reconstruction(self, num_layers: int | None = None) -> Tensor:
        """``[*batch_shape, D]`` reconstruction after the first ``num_layers`` decoded layers (default all)."""
        n = self.num_layers if num_layers is None else check_int(num_layers, "num_layers", min=1, max=self.num_layers)
        rows = self.nodes[n - 1].to(self.centers.device)
        return self.centers[rows].reshape(*self.batch_shape, self.centers.shape[1])


# ---------------------------------------------------------------------------------------------- writing


def _check_options(coding: object, embed_centers: object, entropy_step: object) -> int | None:
    """One-line ``ValueError`` for an unknown coding / embed type / step; returns the step as an int (or None)."""
    if not isinstance(coding, str) or coding not in CODINGS:
        raise ValueError(f"unknown coding {coding!r}; expected one of {CODINGS}")
    if embed_centers is not None:
        check_choice(embed_centers, "embed_centers", list(EMBED_DTYPES))
    return None if entropy_step is None else check_int(entropy_step, "entropy_step", min=1, max=MAX_STEP)


def _flatten_indices(indices: Tensor | np.ndarray, num_leaves: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """``indices [*batch]`` -> ``([N] intp, batch shape)``, checked: integer dtype, in ``[0, K)``, N < 2**48."""
    if isinstance(indices, np.ndarray):
        if not np.issubdtype(indices.dtype, np.integer):
            raise ValueError(f"indices must be an integer array, got dtype {indices.dtype}")
        if indices.size and (int(indices.min()) < 0 or int(indices.max()) >= num_leaves):  # before any int64 wrap
            raise ValueError(
                f"indices out of range: values in [{int(indices.min())}, {int(indices.max())}] "
                f"but the codebook has {num_leaves} codes"
            )
        indices = torch.from_numpy(np.asarray(indices, dtype=np.int64, order="C"))
    if not torch.is_tensor(indices):
        raise ValueError(f"indices must be an integer tensor, got {type(indices).__name__}")
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise ValueError(f"indices must be an integer tensor, got dtype {indices.dtype}")
    if indices.dim() > MAX_NDIM:
        raise ValueError(f"indices have {indices.dim()} dimensions; the format supports at most {MAX_NDIM}")
    shape = tuple(int(s) for s in indices.shape)
    flat = indices.detach().reshape(-1).cpu().long().numpy().astype(np.intp, copy=False)
    if flat.size >= MAX_VECTORS:
        raise ValueError(f"{flat.size} vectors: the format supports fewer than 2**48")
    if flat.size and (int(flat.min()) < 0 or int(flat.max()) >= num_leaves):
        raise ValueError(
            f"indices out of range: values in [{int(flat.min())}, {int(flat.max())}] but the codebook has {num_leaves} codes"
        )
    return flat, shape


def compress_layers(
    hierarchy: Hierarchy,
    tables: LayerTables,
    indices: Tensor | np.ndarray,
    *,
    coding: str = "entropy",
    num_layers: int | None = None,
    embed_centers: str | None = None,
    entropy_step: int | None = None,
) -> list[bytes]:
    """Per-layer chunks of codeword indices.

    Args:
        hierarchy: the model's merge tree.
        tables: its layer tables (``L`` layers).
        indices: ``[*batch]`` int codeword indices (``N`` elements); the batch
            shape is stored in chunk 0 and given back by the decoder.
        coding: ``"entropy"`` (default), ``"context"``, ``"adaptive"`` or ``"raw"``.
            ``"context"`` (:mod:`.context`) is for indices on a grid
            ``[..., H, W]`` (image latents, feature maps): each symbol is
            coded given its left and upper neighbours' symbols (a grid of
            more than ``context.MAX_DIAGONALS`` anti-diagonals is entropy
            coded instead). ``"adaptive"``: the same, its probabilities also
            learning from the layer's earlier symbols; a layer is context
            coded where that is no larger or its table of counts would exceed
            ``context.MAX_ADAPTIVE_ENTRIES``. With a coding other than
            ``"raw"`` a layer whose coded payload would be larger than its raw
            payload is written raw (its header says so).
        num_layers: produce layers ``0..num_layers-1`` (default all ``L``).
        embed_centers: ``None``, ``"float16"`` or ``"float32"``: self-contained
            chunks that also carry their layer's tree structure and node centers.
        entropy_step: tree levels per entropy-coded step, 1..8 (default
            ``min(3, deepest path of the layer)``); 1 = one Bernoulli decision per step.

    Returns:
        ``num_layers`` chunks; ``chunks[l]`` holds layer ``l``.

    Raises:
        ValueError: invalid arguments (out-of-range indices, unknown coding ...),
            raised before any table is built or any symbol coded.
    """
    step_arg = _check_options(coding, embed_centers, entropy_step)
    check_model(hierarchy, tables)
    L = tables.num_layers
    num_layers = L if num_layers is None else check_int(num_layers, "num_layers", min=1, max=L)
    idx, shape = _flatten_indices(indices, hierarchy.num_leaves)
    layer_coding_asked = coding
    if coding in GRID_CODINGS and not context_fits(shape):  # raises on fewer than 2 dimensions
        layer_coding_asked = "entropy"  # a long, thin grid: the decoder would need one round per diagonal
    codec = codec_tables(hierarchy, tables)
    n = idx.shape[0]
    centers = to_numpy(hierarchy.center) if embed_centers is not None else None

    chunks: list[bytes] = []
    link = 0
    for layer in range(num_layers):
        sym = codec.leaf_symbol[layer][idx]
        active = np.flatnonzero(sym >= 0)
        leaves = idx[active] if active.size < n else idx
        layer_coding, step, coded = "raw", 0, layer_coding_asked
        if layer_coding_asked == "entropy":
            step = step_arg or codec.auto_step(layer)
            payload = encode_entropy(codec, layer, step, leaves)
        elif layer_coding_asked in GRID_CODINGS:  # adaptive: never larger than context coding
            coded, payload = encode_grid_layer(codec, layer, idx, shape, adaptive=layer_coding_asked == "adaptive")
        if layer_coding_asked != "raw" and len(payload) <= raw_payload_size(codec, layer, leaves):
            layer_coding = coded
        else:  # never larger than raw: this layer goes raw
            step = 0
        if layer_coding == "raw":
            payload = encode_raw(codec, layer, leaves)
        chunk = pack_chunk(
            coding=layer_coding,
            embed=embed_centers,
            step=step,
            layer=layer,
            stream_layers=num_layers,
            model_layers=L,
            fingerprint=codec.fingerprint,
            num_vectors=n,
            num_symbols=active.size,
            dim=hierarchy.dim,
            num_leaves=codec.num_leaves,
            link=link,
            batch_shape=shape if layer == 0 else None,
            embed_section=embed_section(codec, centers, layer, embed_centers) if embed_centers is not None else b"",
            payload=payload,
        )
        link = int.from_bytes(chunk[-4:], "little")
        chunks.append(chunk)
    return chunks


# ---------------------------------------------------------------------------------------------- reading


def decompress_layers(
    hierarchy: Hierarchy | None,
    tables: LayerTables | None,
    chunks: Sequence[bytes],
    *,
    num_layers: int | None = None,
) -> Decoded:
    """Decode a prefix of layers.

    Args:
        hierarchy, tables: the model the stream was made with; or both ``None``
            to decode a self-contained stream (made with ``embed_centers``).
        chunks: ``chunks[i]`` = layer ``i``, for ``i = 0..n-1`` (bytes-like).
            Each chunk may use any coding.
        num_layers: decode only the first ``num_layers`` chunks (default all given).

    Returns:
        :class:`Decoded`; its ``nodes [n, N]`` equal
        ``decode_codes(tables, encode_indices(tables, idx)[:n])``.

    Raises:
        ValueError: invalid arguments (a model of the wrong type, ``num_layers`` < 1).
        BitstreamError: no chunks, a corrupt or truncated chunk, a gap, wrong
            order or duplicate, chunks of another model or stream, invalid symbols.
    """
    if (hierarchy is None) != (tables is None):
        raise ValueError("give both hierarchy and tables, or neither (self-contained stream)")
    if hierarchy is not None:
        check_model(hierarchy, tables)
    if num_layers is not None:
        num_layers = check_int(num_layers, "num_layers", min=1)
    if isinstance(chunks, (bytes, bytearray, memoryview, str)):
        raise BitstreamError("chunks must be a sequence of per-layer byte strings, not a single bytes object")
    try:
        chunk_list = list(chunks)
    except TypeError:
        raise BitstreamError(f"chunks must be a sequence of bytes, got {type(chunks).__name__}") from None
    if not chunk_list:
        raise BitstreamError("no chunks given: need at least layer 0")
    if num_layers is not None:
        if num_layers > len(chunk_list):
            raise BitstreamError(f"num_layers={num_layers} but only {len(chunk_list)} chunks given")
        chunk_list = chunk_list[:num_layers]
    views = [as_bytes(c, f"chunk {i}") for i, c in enumerate(chunk_list)]  # types first, before any CRC
    parsed = [parse_chunk(c, f"chunk {i}") for i, c in enumerate(views)]
    first = check_sequence(parsed)
    codec = codec_tables(hierarchy, tables) if hierarchy is not None else None
    try:
        return _decode(codec, hierarchy, parsed, first)
    except BitstreamError:
        raise
    except (MemoryError, OverflowError) as e:
        raise BitstreamError(f"stream too large to decode ({type(e).__name__}: {e})") from None
    except (ValueError, IndexError) as e:  # a crafted chunk that passed the checks: still an error of the input
        raise BitstreamError(f"corrupt stream ({type(e).__name__}: {e})") from None


def _decode(codec: CodecTables | None, hierarchy: Hierarchy | None, parsed: list[Chunk], first: ChunkHeader) -> Decoded:
    """Layer by layer: the active vectors, their start nodes, then the chunk's payload coder."""
    if codec is not None:
        if first.fingerprint != codec.fingerprint:
            raise BitstreamError(
                f"model fingerprint mismatch: the stream was made with model {first.fingerprint.hex()}, "
                f"this model is {codec.fingerprint.hex()}"
            )
        if (first.num_leaves, first.dim, first.model_layers) != (codec.num_leaves, codec.dim, codec.model_layers):
            raise BitstreamError(
                f"stream is for K={first.num_leaves}, D={first.dim}, L={first.model_layers}; "
                f"the model has K={codec.num_leaves}, D={codec.dim}, L={codec.model_layers}"
            )
    else:
        codec = codec_from_embedded(parsed, first)
    n = first.num_vectors
    nodes = np.empty((len(parsed), n), dtype=np.intp)
    state = np.full(n, codec.root, dtype=np.intp)
    for layer, c in enumerate(parsed):
        what = f"chunk {layer}"
        active = np.flatnonzero(codec.group_size[layer][state] > 0)
        if active.size != c.header.num_symbols:
            raise BitstreamError(
                f"{what}: header says {c.header.num_symbols} symbols but {active.size} vectors send one in layer {layer}"
            )
        start = state[active]
        if c.header.coding == "raw":
            new = decode_raw(codec, layer, start, active, c.payload, what)
        elif c.header.coding in GRID_CODINGS:
            new = decode_context(codec, layer, state, active, first.batch_shape or (), c.payload, what,
                                 adaptive=c.header.coding == "adaptive")
        else:
            new = decode_entropy(codec, layer, c.header.step, start, c.payload, what)
        nodes[layer] = state
        nodes[layer, active] = new
        state = nodes[layer]
    return Decoded(
        nodes=torch.from_numpy(nodes.astype(np.int64, copy=False)),
        centers=hierarchy.center.detach() if hierarchy is not None else codec.centers,
        batch_shape=first.batch_shape if first.batch_shape is not None else (),
        stream_layers=first.stream_layers,
    )
