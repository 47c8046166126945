"""Transport: per-layer byte chunks of layer symbols and the ``.svq`` container.

Modules (one job each): :mod:`.chunk` (chunk header, CRC, parsing),
:mod:`.tables` (model fingerprint and codec tables), :mod:`.payload` (raw and
entropy coding of a layer), :mod:`.context` (context coding of a layer of a
grid of latents, adaptive or not), :mod:`.embedded` (self-contained chunks),
:mod:`.stream` (:func:`compress_layers` / :func:`decompress_layers`) and
:mod:`.container` (``.svq`` files). The byte format is in ``docs/bitstream.md``.
"""

from .chunk import CODINGS, EMBED_DTYPES, FORMAT_VERSION, GRID_CODINGS, MAGIC, BitstreamError, ChunkHeader, read_header
from .stream import Decoded, compress_layers, decompress_layers
from .tables import branch_prob_q16, fingerprint_tensors, model_fingerprint

__all__ = [
    "CODINGS",
    "EMBED_DTYPES",
    "FORMAT_VERSION",
    "GRID_CODINGS",
    "MAGIC",
    "BitstreamError",
    "ChunkHeader",
    "Decoded",
    "branch_prob_q16",
    "compress_layers",
    "decompress_layers",
    "fingerprint_tensors",
    "model_fingerprint",
    "read_header",
]
