"""Transport: per-layer byte chunks of layer symbols and the ``.svq`` container."""

from .stream import CODINGS, BitstreamError, ChunkHeader, Decoded, compress_layers, decompress_layers, read_header

__all__ = ["CODINGS", "BitstreamError", "ChunkHeader", "Decoded", "compress_layers", "decompress_layers", "read_header"]
