"""Progressive image files: a small header, then the layer chunks of one stream, back to back, compacted.

Pure bytes in / bytes out (no model inside): :func:`pack_image_file` writes,
:func:`unpack_image_file` checks and splits. Unlike the ``.svq`` container
(:mod:`.container`, which stores the number of chunks), an image file does not
say how many layers it holds: every chunk is self-delimiting, so a file cut
right after any complete layer is a valid, shorter file, and a file cut
anywhere else is refused.

Version 2 (written) stores each layer chunk *compacted*: what every chunk of
the file shares (the quantizer's fingerprint, K, D, the layer counts, the
latent grid) is in the file header once, and a chunk keeps only its coding,
step, symbol count, payload length, payload and the CRC32 of the whole chunk
it stands for. The reader rebuilds each full chunk (:func:`~.chunk.pack_chunk`)
and checks it against that CRC, so every field is still covered and every
chunk still links to the previous one. About 10 bytes a layer instead of 76,
which counts on small images. Version 1 files (full chunks) are still read.
Layout in ``docs/bitstream.md`` ("Image files").
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Sequence
from typing import Any, NamedTuple

from .chunk import CODINGS, CRC_FIELD, HEADER, MAGIC, BitstreamError, as_bytes, check_sequence, pack_chunk, parse_chunk

__all__ = [
    "IMAGE_HEADER_SIZE",
    "IMAGE_MAGIC",
    "IMAGE_VERSION",
    "PADDINGS",
    "ImageFile",
    "ImageHeader",
    "has_image_magic",
    "pack_image_file",
    "read_image_file",
    "unpack_image_file",
]

IMAGE_MAGIC = b"SVQI"
IMAGE_VERSION = 2
#: padding of the image up to the patch grid; the header stores the index (1 = replicate the edge pixels)
PADDINGS = ("none", "edge")
#: image channels a file may hold (1 = grayscale, 3 = RGB)
_CHANNELS = (1, 3)
#: magic, version, channels, model_channels, padding, height, width, grid_h, grid_w, patch_size, reserved, fingerprint
_HEAD_V1 = struct.Struct("<4sBBBBIIIIHH8s")
#: version 2: the same, then what every chunk shares: quantizer fingerprint, dim, num_leaves, model_layers, stream_layers
_STREAM = struct.Struct("<8sIIHH")
_HEAD = struct.Struct(_HEAD_V1.format + _STREAM.format[1:])
#: bytes before the first chunk: the header and its CRC32
IMAGE_HEADER_SIZE = _HEAD.size + CRC_FIELD.size
_HEADER_SIZES = {1: _HEAD_V1.size + CRC_FIELD.size, 2: IMAGE_HEADER_SIZE}
_MAX_U32 = 0xFFFFFFFF
# positions of ndim, embed_len, payload_len in a chunk's HEADER fields (see chunk.py / docs/bitstream.md)
_NDIM, _EMBED_LEN, _PAYLOAD_LEN = 4, 16, 17
_DIM_BYTES = 8


class ImageHeader(NamedTuple):
    """What an image file says before its chunks.

    Attributes:
        height / width: the image's size in pixels (what the decoder writes).
        channels: 1 (grayscale) or 3 (RGB), the channels of the original image.
        model_channels: channels of the autoencoder's input (a grayscale image
            through an RGB model: 1 and 3).
        padding: ``"none"`` (the size is a multiple of the patch) or ``"edge"``
            (edge pixels replicated up to the patch grid, cropped after decoding).
        patch_size: pixels per side of the patch one latent vector stands for.
        grid: ``(grid_h, grid_w)`` latent vectors: ``ceil(height / patch_size)``, ``ceil(width / patch_size)``.
        fingerprint: 8 bytes identifying the whole autoencoder (encoder, decoder and quantizer).
    """

    height: int
    width: int
    channels: int
    model_channels: int
    padding: str
    patch_size: int
    grid: tuple[int, int]
    fingerprint: bytes


class ImageFile(NamedTuple):
    """A parsed image file.

    Attributes:
        header: its :class:`ImageHeader`.
        chunks: the layer chunks it holds, layers ``0..n-1`` of one stream.
        layer_end: byte offset at which each layer ends (``layer_end[-1]`` = file size).
        stream_layers: layers the sender produced (``n`` for a complete file, more for a cut one).
        header_size: bytes before layer 0 (the header and its CRC; depends on the file's version).
    """

    header: ImageHeader
    chunks: list[bytes]
    layer_end: list[int]
    stream_layers: int
    header_size: int = IMAGE_HEADER_SIZE

    @property
    def num_layers(self) -> int:
        """Layers the file holds."""
        return len(self.chunks)

    @property
    def size(self) -> int:
        """File size in bytes."""
        return self.layer_end[-1]


def _grid_side(pixels: int, patch: int) -> int:
    return -(-pixels // patch)


def _check_header(h: ImageHeader, error: type[Exception]) -> None:
    """Every field in range and consistent (``error``: ValueError when writing, BitstreamError when reading)."""
    if h.channels not in _CHANNELS or h.model_channels not in _CHANNELS or h.channels > h.model_channels:
        raise error(f"image of {h.channels} channels through a model of {h.model_channels}: expected 1 or 3 "
                    f"channels, and a model with at least the image's channels")
    if not (1 <= h.height <= _MAX_U32 and 1 <= h.width <= _MAX_U32 and 1 <= h.patch_size <= 0xFFFF):
        raise error(f"image size {h.height}x{h.width} or patch size {h.patch_size} out of range")
    want = (_grid_side(h.height, h.patch_size), _grid_side(h.width, h.patch_size))
    if tuple(h.grid) != want:
        raise error(f"latent grid {list(h.grid)} does not fit a {h.height}x{h.width} image in "
                    f"{h.patch_size}-pixel patches (expected {list(want)})")
    padded = h.height % h.patch_size or h.width % h.patch_size
    if h.padding not in PADDINGS or (h.padding == "none") == bool(padded):
        raise error(f"padding {h.padding!r} for a {h.height}x{h.width} image in {h.patch_size}-pixel patches "
                    f"(expected {PADDINGS[1]!r} when the size is not a multiple of the patch, else {PADDINGS[0]!r})")
    if not isinstance(h.fingerprint, (bytes, bytearray)) or len(h.fingerprint) != 8:
        raise error(f"fingerprint must be 8 bytes, got {h.fingerprint!r}")


def pack_image_file(header: ImageHeader, chunks: Sequence[bytes]) -> bytes:
    """Image file bytes: the header, its CRC32, then the chunks back to back.

    Args:
        header: the image's header (checked).
        chunks: layers ``0..n-1`` of one stream of ``[1, grid_h, grid_w]`` indices
            (checked like a decoder checks them, so a file that cannot be read is never written).

    Raises:
        ValueError: a header field out of range, no chunks.
        BitstreamError: a chunk that is not valid, not part of one stream, or of another grid.
    """
    _check_header(header, ValueError)
    if isinstance(chunks, (bytes, bytearray, memoryview, str)) or not chunks:
        raise ValueError("chunks must be a non-empty sequence of per-layer byte strings")
    views = [as_bytes(c, f"chunk {i}") for i, c in enumerate(chunks)]
    parsed = [parse_chunk(c, f"chunk {i}") for i, c in enumerate(views)]
    _check_chunks(parsed, header)
    if any(c.header.embed is not None for c in parsed):
        raise ValueError("image file chunks carry no embedded centers (the model decodes them); make them without")
    first = parsed[0].header
    head = _HEAD.pack(
        IMAGE_MAGIC, IMAGE_VERSION, header.channels, header.model_channels, PADDINGS.index(header.padding),
        header.height, header.width, header.grid[0], header.grid[1], header.patch_size, 0, bytes(header.fingerprint),
        first.fingerprint, first.dim, first.num_leaves, first.model_layers, first.stream_layers,
    )  # fmt: skip
    compact = [
        b"".join([bytes([CODINGS.index(c.header.coding), c.header.step]), _varint(c.header.num_symbols),
                  _varint(len(c.payload)), bytes(c.payload), CRC_FIELD.pack(c.header.crc)])
        for c in parsed
    ]  # fmt: skip
    return b"".join([head, CRC_FIELD.pack(zlib.crc32(head)), *compact])


def _varint(value: int) -> bytes:
    """LEB128: 7 bits a byte, least significant first, high bit = more bytes follow."""
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(view: memoryview, pos: int, what: str) -> tuple[int, int]:
    """``(value, position after it)`` of the LEB128 integer at ``pos`` (at most 8 bytes: < 2**56)."""
    value = 0
    for i in range(8):
        if pos + i >= len(view):
            raise BitstreamError(f"truncated image file: it ends inside {what}")
        byte = view[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if byte == 0 and i > 0:
                raise BitstreamError(f"corrupt image file: {what} is not a minimal LEB128 (a trailing zero byte)")
            return value, pos + i + 1
    raise BitstreamError(f"corrupt image file: {what} is longer than 8 bytes")


def _check_chunks(parsed: list[Any], header: ImageHeader) -> int:
    """Layers ``0..n-1`` of one stream of ``[1, grid_h, grid_w]`` indices; returns the stream's layer count."""
    first = check_sequence(parsed)
    if first.batch_shape != (1, *header.grid):
        raise BitstreamError(
            f"layer 0 holds indices of shape {list(first.batch_shape or ())}, the header's latent grid is "
            f"{list(header.grid)} (expected [1, {header.grid[0]}, {header.grid[1]}])"
        )
    return first.stream_layers


def _read_header(view: memoryview) -> tuple[ImageHeader, tuple[Any, ...], int]:
    """``(header, shared chunk fields (version 2; empty for version 1), header size)``."""
    if len(view) == 0:
        raise BitstreamError("empty file (0 bytes), not an image file")
    if bytes(view[:4]) != IMAGE_MAGIC[: len(view[:4])]:
        raise BitstreamError(f"not an image file: bad magic {bytes(view[:4])!r} (expected {IMAGE_MAGIC!r})")
    version = view[4] if len(view) > 4 else None
    if version is not None and version not in _HEADER_SIZES:
        raise BitstreamError(f"unsupported image file version {version} (this reader supports {list(_HEADER_SIZES)})")
    size = _HEADER_SIZES.get(version, IMAGE_HEADER_SIZE)
    if len(view) < size:
        raise BitstreamError(f"truncated image file: {len(view)} bytes, its header alone has {size}")
    (crc,) = CRC_FIELD.unpack_from(view, size - CRC_FIELD.size)
    if crc != zlib.crc32(view[: size - CRC_FIELD.size]):
        raise BitstreamError("image file header CRC32 mismatch: corrupt file")
    fields = (_HEAD if version == 2 else _HEAD_V1).unpack_from(view)
    _m, _v, channels, model_channels, padding, height, width, gh, gw, patch, reserved, fp = fields[:12]
    if reserved or padding >= len(PADDINGS):
        raise BitstreamError(f"unknown padding {padding} or reserved field {reserved} in the image file header")
    header = ImageHeader(height, width, channels, model_channels, PADDINGS[padding], patch, (gh, gw), bytes(fp))
    _check_header(header, BitstreamError)
    return header, fields[12:], size


def _chunk_length(view: memoryview, pos: int, layer: int) -> int:
    """Length of the chunk starting at ``pos``, from its header; the chunk must lie inside the file."""
    left = len(view) - pos
    if bytes(view[pos : pos + 4]) != MAGIC[: min(4, left)]:
        raise BitstreamError(f"layer {layer} at byte {pos}: bad magic {bytes(view[pos : pos + 4])!r}, "
                             f"not a layer chunk (expected {MAGIC!r}): corrupt file")
    if left < HEADER.size:
        raise BitstreamError(f"truncated image file: it ends inside layer {layer} ({left} of at least "
                             f"{HEADER.size + CRC_FIELD.size} bytes)")
    fields = HEADER.unpack_from(view, pos)
    length = HEADER.size + _DIM_BYTES * fields[_NDIM] + fields[_EMBED_LEN] + fields[_PAYLOAD_LEN] + CRC_FIELD.size
    if length > left:
        raise BitstreamError(f"truncated or corrupt image file: it ends inside layer {layer} (byte {len(view)}; "
                             f"the layer's header says it ends at byte {pos + length})")
    return length


def unpack_image_file(data: Any) -> ImageFile:
    """Check and split image file bytes.

    The whole file is checked (a reader wanting fewer layers slices
    ``chunks``): the header (magic, CRC, version, every field), then every
    chunk (its own checks, layers ``0..n-1`` of one stream, the header's latent
    grid); the file must end exactly after a chunk.

    Raises:
        BitstreamError: one line saying what is wrong (bad magic, CRC, truncated, trailing bytes, ...).
    """
    view = as_bytes(data, "image file")
    header, shared, pos = _read_header(view)
    size, ends, views = pos, [], []
    if pos == len(view):
        raise BitstreamError("truncated image file: it ends after its header, before layer 0")
    stream_layers = shared[-1] if shared else None
    while pos < len(view):
        layer = len(views)
        if stream_layers is not None and layer == stream_layers:
            raise BitstreamError(f"image file has {len(view) - pos} unexpected bytes after its last layer ({layer - 1})")
        if shared:
            chunk, pos = _expand_chunk(view, pos, layer, header, shared, views[-1] if views else None)
            views.append(chunk)
        else:  # version 1: full chunks
            length = _chunk_length(view, pos, layer)
            views.append(view[pos : pos + length])
            pos += length
            if stream_layers is None:
                stream_layers = parse_chunk(views[0], "layer 0").header.stream_layers
        ends.append(pos)
    parsed = [parse_chunk(c, f"layer {i}") for i, c in enumerate(views)]
    stream_layers = _check_chunks(parsed, header)
    return ImageFile(header, [bytes(c) for c in views], ends, stream_layers, size)


def _expand_chunk(view: memoryview, pos: int, layer: int, header: ImageHeader, shared: tuple[Any, ...],
                  previous: bytes | None) -> tuple[bytes, int]:
    """The full chunk a compacted layer at ``pos`` stands for, checked against its CRC; and where the next layer starts."""
    if len(view) - pos < 2:
        raise BitstreamError(f"truncated image file: it ends inside layer {layer}")
    coding, step = view[pos], view[pos + 1]
    if coding >= len(CODINGS):
        raise BitstreamError(f"layer {layer} at byte {pos}: unknown coding {coding}: corrupt file")
    num_symbols, at = _read_varint(view, pos + 2, f"layer {layer}'s symbol count")
    payload_len, at = _read_varint(view, at, f"layer {layer}'s payload length")
    end = at + payload_len + CRC_FIELD.size
    if end > len(view):
        raise BitstreamError(f"truncated or corrupt image file: it ends inside layer {layer} (byte {len(view)}; "
                             f"the layer says it ends at byte {end})")
    fingerprint, dim, num_leaves, model_layers, stream_layers = shared
    grid = (1, *header.grid)
    try:
        chunk = pack_chunk(
            coding=CODINGS[coding], embed=None, step=step, layer=layer, stream_layers=stream_layers,
            model_layers=model_layers, fingerprint=fingerprint, num_vectors=grid[1] * grid[2], num_symbols=num_symbols,
            dim=dim, num_leaves=num_leaves, link=0 if previous is None else int.from_bytes(previous[-4:], "little"),
            batch_shape=grid if layer == 0 else None, embed_section=b"", payload=bytes(view[at : at + payload_len]),
        )  # fmt: skip
    except struct.error:  # a field too large for its slot: corrupt
        raise BitstreamError(f"layer {layer} at byte {pos}: header fields out of range: corrupt file") from None
    if chunk[-4:] != bytes(view[end - 4 : end]):
        raise BitstreamError(f"layer {layer} at byte {pos}: CRC32 mismatch: corrupt file")
    return chunk, end


def has_image_magic(path: str | os.PathLike) -> bool:
    """Whether the file at ``path`` starts with :data:`IMAGE_MAGIC` (False when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(IMAGE_MAGIC)) == IMAGE_MAGIC
    except OSError:
        return False


def read_image_file(path: str | os.PathLike) -> ImageFile:
    """Read and check an image file (see :func:`unpack_image_file`)."""
    with open(path, "rb") as f:
        data = f.read()
    return unpack_image_file(data)
