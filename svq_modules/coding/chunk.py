"""One layer chunk on its own: the header layout, the CRC32 trailer, parsing and serializing.

A chunk is ``header (72 bytes) | batch shape (8 bytes per dimension, layer 0 only)
| embedded section | payload | CRC32 (4 bytes)``, every integer little-endian; the
fields are listed in ``docs/bitstream.md``. :func:`parse_chunk` checks one chunk
on its own (magic, CRC, every field's range, the exact length) and
:func:`check_sequence` checks that parsed chunks are layers ``0..n-1`` of one
stream. What the payload and the embedded section mean is decided by
:mod:`.payload` and :mod:`.embedded`.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence
from typing import Any, NamedTuple

__all__ = [
    "CODINGS",
    "GRID_CODINGS",
    "CRC_FIELD",
    "EMBED_DTYPES",
    "FORMAT_VERSION",
    "HEADER",
    "MAGIC",
    "MAX_LAYERS",
    "MAX_NDIM",
    "MAX_STEP",
    "MAX_VECTORS",
    "MIN_CHUNK_SIZE",
    "BitstreamError",
    "Chunk",
    "ChunkHeader",
    "as_bytes",
    "check_sequence",
    "pack_chunk",
    "parse_chunk",
    "read_header",
]

MAGIC = b"SVQL"
FORMAT_VERSION = 1
#: payload codings; the header stores the index (0 = raw, 1 = entropy, 2 = context, 3 = adaptive context: see .context)
CODINGS = ("raw", "entropy", "context", "adaptive")
#: the codings of indices on a grid [..., H, W] (a symbol given its left and upper neighbours)
GRID_CODINGS = ("context", "adaptive")
#: embedded-center types; the header stores the value
EMBED_DTYPES: dict[str | None, int] = {None: 0, "float16": 1, "float32": 2}
_EMBED_NAMES = {v: k for k, v in EMBED_DTYPES.items()}
#: tree levels per entropy-coded step: 1..MAX_STEP
MAX_STEP = 8
MAX_NDIM = 32
MAX_VECTORS = 1 << 48
MAX_LAYERS = 0xFFFF

#: magic, version, coding, embed, ndim, layer, stream_layers, model_layers, step,
#: fingerprint, num_vectors, num_symbols, dim, num_leaves, link, reserved, embed_len, payload_len
HEADER = struct.Struct("<4sBBBBHHHH8sQQIIIIQQ")
#: a CRC32 as stored after a chunk (and after the parts of a ``.svq`` file)
CRC_FIELD = struct.Struct("<I")
_DIM = struct.Struct("<Q")
MIN_CHUNK_SIZE = HEADER.size + CRC_FIELD.size


class BitstreamError(ValueError):
    """A chunk or ``.svq`` file is corrupt, truncated, out of order, or belongs to another model or stream."""


class ChunkHeader(NamedTuple):
    """Parsed header of one layer chunk (see ``docs/bitstream.md``)."""

    version: int
    coding: str  # "raw" | "entropy" | "context" | "adaptive"
    embed: str | None  # None | "float16" | "float32"
    step: int  # entropy coding: tree levels per coded step (1..8); raw and context: 0
    layer: int
    stream_layers: int  # layers the sender produced (the stream is layers 0..stream_layers-1)
    model_layers: int  # L of the model
    fingerprint: bytes  # 8 bytes, see svq_modules.coding.tables.model_fingerprint
    num_vectors: int  # N
    num_symbols: int  # vectors that send a symbol in this layer
    dim: int  # D
    num_leaves: int  # K
    link: int  # CRC32 of the previous layer's chunk (0 for layer 0)
    batch_shape: tuple[int, ...] | None  # layer 0 only
    crc: int  # this chunk's CRC32
    embed_len: int
    payload_len: int


class Chunk(NamedTuple):
    """A parsed chunk: its header and views of its two sections."""

    header: ChunkHeader
    embed: memoryview
    payload: memoryview


def as_bytes(data: Any, what: str) -> memoryview:
    """A flat byte view of ``bytes`` / ``bytearray`` / ``memoryview``; anything else raises :class:`BitstreamError`."""
    if isinstance(data, (bytes, bytearray)):
        return memoryview(data)
    if isinstance(data, memoryview):
        try:
            return data if data.format == "B" and data.ndim == 1 else data.cast("B")
        except TypeError as e:
            raise BitstreamError(f"{what}: unsupported memoryview ({e})") from None
    raise BitstreamError(f"{what} must be bytes, got {type(data).__name__}")


def pack_chunk(
    *,
    coding: str,
    embed: str | None,
    step: int,
    layer: int,
    stream_layers: int,
    model_layers: int,
    fingerprint: bytes,
    num_vectors: int,
    num_symbols: int,
    dim: int,
    num_leaves: int,
    link: int,
    batch_shape: tuple[int, ...] | None,
    embed_section: bytes,
    payload: bytes,
) -> bytes:
    """Serialize one chunk: header, batch shape (layer 0), sections, then the CRC32 of all that.

    The caller gives valid fields (they come from a checked model and checked
    arguments); :func:`parse_chunk` is the inverse.
    """
    shape = tuple(batch_shape) if layer == 0 and batch_shape is not None else ()
    head = HEADER.pack(
        MAGIC, FORMAT_VERSION, CODINGS.index(coding), EMBED_DTYPES[embed], len(shape), layer, stream_layers,
        model_layers, step, fingerprint, num_vectors, num_symbols, dim, num_leaves, link, 0, len(embed_section),
        len(payload),
    )  # fmt: skip
    body = b"".join([head, *(_DIM.pack(s) for s in shape), embed_section, payload])
    return body + CRC_FIELD.pack(zlib.crc32(body))


def parse_chunk(chunk: Any, what: str) -> Chunk:
    """Check one chunk on its own: magic, CRC, header fields, lengths.

    Args:
        chunk: the chunk's bytes (bytes-like).
        what: how error messages name it, e.g. ``"chunk 2"``.

    Raises:
        BitstreamError: not a valid layer chunk (one line naming ``what`` and the problem).
    """
    data = as_bytes(chunk, what)
    if len(data) == 0:
        raise BitstreamError(f"{what} is empty (0 bytes)")
    if bytes(data[:4]) != MAGIC[: len(data[:4])]:
        raise BitstreamError(f"{what}: bad magic {bytes(data[:4])!r}, not a ScalableVQ layer chunk (expected {MAGIC!r})")
    if len(data) < MIN_CHUNK_SIZE:
        raise BitstreamError(f"{what}: truncated: {len(data)} bytes, shorter than the {MIN_CHUNK_SIZE}-byte header and CRC")
    (crc,) = CRC_FIELD.unpack_from(data, len(data) - 4)
    actual = zlib.crc32(data[:-4])
    if crc != actual:
        raise BitstreamError(
            f"{what}: CRC32 mismatch (stored {crc:#010x}, computed {actual:#010x}): corrupt or truncated chunk"
        )
    f = dict(zip(_FIELD_NAMES, HEADER.unpack_from(data, 0)))
    _check_fields(f, what)
    ndim, embed_len, payload_len = f["ndim"], f["embed_len"], f["payload_len"]
    expected = HEADER.size + _DIM.size * ndim + embed_len + payload_len + CRC_FIELD.size
    if expected != len(data):
        raise BitstreamError(
            f"{what}: length {len(data)} bytes does not match its header (header {HEADER.size} + shape "
            f"{_DIM.size * ndim} + embedded {embed_len} + payload {payload_len} + CRC 4 = {expected})"
        )
    offset = HEADER.size
    shape = None
    if f["layer"] == 0:
        shape = tuple(_DIM.unpack_from(data, offset + _DIM.size * i)[0] for i in range(ndim))
        if math.prod(shape) != f["num_vectors"]:
            raise BitstreamError(f"{what}: batch shape {list(shape)} does not hold {f['num_vectors']} vectors")
        offset += _DIM.size * ndim
    header = ChunkHeader(
        version=f["version"],
        coding=CODINGS[f["coding"]],
        embed=_EMBED_NAMES[f["embed"]],
        step=f["step"],
        layer=f["layer"],
        stream_layers=f["stream_layers"],
        model_layers=f["model_layers"],
        fingerprint=bytes(f["fingerprint"]),
        num_vectors=f["num_vectors"],
        num_symbols=f["num_symbols"],
        dim=f["dim"],
        num_leaves=f["num_leaves"],
        link=f["link"],
        batch_shape=shape,
        crc=crc,
        embed_len=embed_len,
        payload_len=payload_len,
    )
    return Chunk(header, data[offset : offset + embed_len], data[offset + embed_len : offset + embed_len + payload_len])


_FIELD_NAMES = (
    "magic", "version", "coding", "embed", "ndim", "layer", "stream_layers", "model_layers", "step",
    "fingerprint", "num_vectors", "num_symbols", "dim", "num_leaves", "link", "reserved", "embed_len", "payload_len",
)  # fmt: skip


def _check_fields(f: dict[str, Any], what: str) -> None:
    """Range checks of the header fields of one chunk (``f``: field name -> unpacked value)."""
    if f["version"] != FORMAT_VERSION:
        raise BitstreamError(f"{what}: unsupported format version {f['version']} (this reader supports {FORMAT_VERSION})")
    coding, step = f["coding"], f["step"]
    if coding >= len(CODINGS):
        raise BitstreamError(f"{what}: unknown coding {coding} (expected 0 = raw, 1 = entropy, 2 = context or 3 = adaptive)")
    if f["embed"] not in _EMBED_NAMES:
        raise BitstreamError(f"{what}: unknown embedded-center type {f['embed']} (expected 0, 1 = float16 or 2 = float32)")
    if (coding != 1 and step != 0) or (coding == 1 and not 1 <= step <= MAX_STEP):
        raise BitstreamError(f"{what}: invalid entropy step {step} for coding {CODINGS[coding]!r}")
    if f["reserved"]:
        raise BitstreamError(f"{what}: reserved header field is {f['reserved']}, expected 0")
    layer, stream_layers, model_layers = f["layer"], f["stream_layers"], f["model_layers"]
    if not 1 <= stream_layers <= model_layers:
        raise BitstreamError(f"{what}: stream of {stream_layers} layers for a model of {model_layers}")
    if layer >= stream_layers:
        raise BitstreamError(f"{what}: layer index {layer} outside the stream's {stream_layers} layers")
    if layer > 0 and f["ndim"]:
        raise BitstreamError(f"{what}: layer {layer} carries a batch shape (only layer 0 does)")
    if f["ndim"] > MAX_NDIM:
        raise BitstreamError(f"{what}: batch shape has {f['ndim']} dimensions (at most {MAX_NDIM})")
    num_vectors, num_symbols = f["num_vectors"], f["num_symbols"]
    if num_vectors >= MAX_VECTORS:
        raise BitstreamError(f"{what}: implausible number of vectors {num_vectors}")
    if num_symbols > num_vectors:
        raise BitstreamError(f"{what}: {num_symbols} symbols for {num_vectors} vectors")
    if f["dim"] < 1 or not 1 <= f["num_leaves"] < 1 << 31:
        raise BitstreamError(f"{what}: invalid dimension {f['dim']} or codebook size {f['num_leaves']}")
    if layer == 0 and f["link"] != 0:
        raise BitstreamError(f"{what}: layer 0 links to a previous chunk ({f['link']:#010x})")
    if (f["embed"] == 0) != (f["embed_len"] == 0):
        raise BitstreamError(f"{what}: embedded-center type {f['embed']} but {f['embed_len']} embedded bytes")


def read_header(chunk: bytes) -> ChunkHeader:
    """Parse and check one chunk on its own (magic, CRC, field ranges, lengths).

    Raises:
        BitstreamError: not a valid layer chunk.
    """
    return parse_chunk(chunk, "chunk").header


def check_sequence(chunks: Sequence[Chunk]) -> ChunkHeader:
    """Parsed chunks ``0..n-1`` must be layers ``0..n-1`` of one stream; returns layer 0's header.

    Checks the layer numbers (a gap, a wrong order and a duplicate are distinct
    messages), that fingerprint, ``N``, ``D``, ``K``, ``L`` and ``stream_layers``
    agree with layer 0, and that each chunk's ``link`` is the previous chunk's CRC.
    """
    first = chunks[0].header
    prev_crc = 0
    for i, c in enumerate(chunks):
        h = c.header
        if h.layer != i:
            kind = "duplicated layer" if h.layer < i else "gap or wrong order"
            raise BitstreamError(f"chunk {i} is layer {h.layer}, expected layer {i} ({kind})")
        for name in ("fingerprint", "num_vectors", "dim", "num_leaves", "model_layers", "stream_layers"):
            if getattr(h, name) != getattr(first, name):
                raise BitstreamError(
                    f"chunk {i}: {name} {getattr(h, name)!r} differs from layer 0's {getattr(first, name)!r} "
                    "(chunks of different streams or models)"
                )
        if i > 0 and h.link != prev_crc:
            raise BitstreamError(
                f"chunk {i} does not continue the given layer {i - 1} (it links to CRC {h.link:#010x}, "
                f"the previous chunk has {prev_crc:#010x}): chunks of different streams"
            )
        prev_crc = h.crc
    return first
