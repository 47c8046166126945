"""ScalableVQ: scalable (layered, progressive) vector quantization for PyTorch."""

from .coding import BitstreamError
from .hierarchy import Hierarchy, build_hierarchy, code_statistics
from .layers import (
    LayerRates,
    LayerTables,
    build_layers,
    decode_codes,
    encode_indices,
    layer_rates,
    reconstruct,
    resolve_bits,
)
from .nn import ScalableVQ, VQOutput

__version__ = "0.1.0"

__all__ = [
    "BitstreamError",
    "ScalableVQ",
    "VQOutput",
    "Hierarchy",
    "LayerRates",
    "LayerTables",
    "build_hierarchy",
    "build_layers",
    "code_statistics",
    "decode_codes",
    "encode_indices",
    "layer_rates",
    "reconstruct",
    "resolve_bits",
]
