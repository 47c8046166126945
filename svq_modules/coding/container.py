""".svq container files: the layer chunks of one stream (and optionally the model) in one file.

Layout (see ``docs/bitstream.md``): a header with its own CRC32, an optional
zlib-compressed model section with its own CRC32, then every chunk after its
u64 length. Files are written atomically (temporary file in the same folder,
then ``os.replace``), so an error never leaves a half-written file.
"""

from __future__ import annotations

import io
import os
import struct
import tempfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

from ..validation import check_int
from .chunk import CRC_FIELD, BitstreamError, as_bytes, check_sequence, parse_chunk

__all__ = [
    "CONTAINER_MAGIC",
    "CONTAINER_VERSION",
    "Container",
    "atomic_write",
    "pack_container",
    "read_container",
    "unpack_container",
    "write_container",
]

CONTAINER_MAGIC = b"SVQF"
CONTAINER_VERSION = 1
# magic, version, flags, reserved, num_chunks, model_len, fingerprint
_CONTAINER_HEAD = struct.Struct("<4sBBHIQ8s")
_LEN = struct.Struct("<Q")


class Container(NamedTuple):
    """Contents of a ``.svq`` file."""

    chunks: list[bytes]  # the layer chunks read (all, or the first `max_chunks`)
    model: bytes | None  # serialized model section, None when the file references an external model
    fingerprint: bytes  # model fingerprint of the chunks
    num_chunks: int  # chunks stored in the file


def pack_container(chunks: Sequence[bytes], model: bytes | None = None) -> bytes:
    """``.svq`` bytes: header + CRC, optional model section + CRC, then the chunks, each after its u64 length.

    Args:
        chunks: layers ``0..n-1`` of one stream (checked like a decoder checks them,
            so a file that could not be read is never written).
        model: the serialized model section, or None (the file then references
            an external model by the chunks' fingerprint).

    Raises:
        ValueError: no chunks, a model section that is not bytes.
        BitstreamError: a chunk that is not valid or not part of one stream.
    """
    if isinstance(chunks, (bytes, bytearray, memoryview, str)):
        raise ValueError("chunks must be a sequence of per-layer byte strings, not a single bytes object")
    if model is not None and not isinstance(model, (bytes, bytearray, memoryview)):
        raise ValueError(f"model must be bytes or None, got {type(model).__name__}")
    views = [as_bytes(c, f"chunk {i}") for i, c in enumerate(chunks)]
    if not views:
        raise ValueError("a container needs at least one chunk")
    first = check_sequence([parse_chunk(c, f"chunk {i}") for i, c in enumerate(views)])
    model = None if model is None else bytes(model)
    head = _CONTAINER_HEAD.pack(
        CONTAINER_MAGIC, CONTAINER_VERSION, 1 if model is not None else 0, 0, len(views), len(model or b""), first.fingerprint
    )
    parts = [head, CRC_FIELD.pack(zlib.crc32(head))]
    if model is not None:
        parts += [model, CRC_FIELD.pack(zlib.crc32(model))]
    for c in views:
        parts += [_LEN.pack(len(c)), bytes(c)]
    return b"".join(parts)


def unpack_container(data: bytes, max_chunks: int | None = None) -> Container:
    """Parse ``.svq`` bytes; with ``max_chunks`` only the first chunks are needed (a truncated tail is fine).

    Each chunk read is checked on its own (:func:`~.chunk.parse_chunk`) and must
    carry the fingerprint of the file header; the order of the chunks is checked
    by the decoder.

    Raises:
        ValueError: ``max_chunks`` not a positive int.
        BitstreamError: bad magic, version or CRC, truncated or trailing bytes.
    """
    if max_chunks is not None:
        max_chunks = check_int(max_chunks, "max_chunks", min=1)
    view = as_bytes(data, "container")
    hs = _CONTAINER_HEAD.size
    if bytes(view[:4]) != CONTAINER_MAGIC:
        raise BitstreamError(f"not a .svq file: bad magic {bytes(view[:4])!r} (expected {CONTAINER_MAGIC!r})")
    if len(view) < hs + 4:
        raise BitstreamError("truncated .svq file: incomplete header")
    (crc,) = CRC_FIELD.unpack_from(view, hs)
    if crc != zlib.crc32(view[:hs]):
        raise BitstreamError(".svq header CRC32 mismatch: corrupt file")
    _m, version, flags, reserved, num_chunks, model_len, fp = _CONTAINER_HEAD.unpack_from(view, 0)
    if version != CONTAINER_VERSION:
        raise BitstreamError(f"unsupported .svq container version {version} (this reader supports {CONTAINER_VERSION})")
    if flags & ~1 or reserved:
        raise BitstreamError(f"unknown .svq flags {flags:#x} or reserved field {reserved}")
    if num_chunks < 1:
        raise BitstreamError(".svq file holds no chunks")
    if not flags & 1 and model_len:
        raise BitstreamError(".svq header gives a model length but no model section")
    pos = hs + 4
    model = None
    if flags & 1:
        if len(view) < pos + model_len + 4:
            raise BitstreamError("truncated .svq file: model section incomplete")
        model = bytes(view[pos : pos + model_len])
        (mcrc,) = CRC_FIELD.unpack_from(view, pos + model_len)
        if mcrc != zlib.crc32(model):
            raise BitstreamError(".svq model section CRC32 mismatch: corrupt file")
        pos += model_len + 4
    want = num_chunks if max_chunks is None else min(num_chunks, max_chunks)
    chunks = []
    for i in range(want):
        if len(view) < pos + _LEN.size:
            raise BitstreamError(f"truncated .svq file: chunk {i} of {num_chunks} missing")
        (size,) = _LEN.unpack_from(view, pos)
        pos += _LEN.size
        if len(view) < pos + size:
            raise BitstreamError(f"truncated .svq file: chunk {i} has {len(view) - pos} of its {size} bytes")
        chunks.append(bytes(view[pos : pos + size]))
        pos += size
    if want == num_chunks and pos != len(view):
        raise BitstreamError(f".svq file has {len(view) - pos} unexpected bytes after its last chunk")
    for i, c in enumerate(chunks):
        if parse_chunk(c, f".svq chunk {i}").header.fingerprint != bytes(fp):
            raise BitstreamError(f".svq chunk {i} belongs to another model than the file header says")
    return Container(chunks=chunks, model=model, fingerprint=bytes(fp), num_chunks=num_chunks)


def _new_file_mode(path: Path) -> int:
    """Mode of an existing destination, else ``0o666`` minus the umask (what ``open`` would give)."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask


def atomic_write(path: str | os.PathLike, data: bytes | Callable[[io.BufferedWriter], None]) -> None:
    """Write a file atomically: a temporary file in the same directory, fsync, then ``os.replace``.

    Args:
        path: destination.
        data: the bytes, or a callable writing to the open binary file.

    On any error the temporary file is removed and ``path`` keeps its previous
    state (absent, or its old content); the error is re-raised.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, _new_file_mode(path))
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_container(path: str | os.PathLike, chunks: Sequence[bytes], model: bytes | None = None) -> int:
    """Write a ``.svq`` file atomically; returns its size in bytes."""
    data = pack_container(chunks, model)
    atomic_write(path, data)
    return len(data)


def read_container(path: str | os.PathLike, max_chunks: int | None = None) -> Container:
    """Read a ``.svq`` file (see :func:`unpack_container`)."""
    with open(path, "rb") as f:
        data = f.read()
    return unpack_container(data, max_chunks)
