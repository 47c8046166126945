"""Seed-compatible functional API (``scalablevq`` call conventions) and its visualisation.

``from svq_modules.compat import encode_layers, decode_layer, build_layers, visualize_layers``
is the same as importing them from :mod:`svq_modules.compat.functional` (the
documented path). ``build_layers`` here is the seed's cluster tree; the core
``svq_modules.build_layers`` (layer tables) is a different function.
"""

from .functional import (
    ClusterTree,
    DecodingContext,
    EncodedLayers,
    Layer,
    NBitsProposal,
    build_layers,
    decode_layer,
    decode_layers,
    encode_known_layers,
    encode_layers,
    encode_scalable,
    layer_codebook,
    transcode,
    visualize_layers,
)

__all__ = [
    "Layer",
    "DecodingContext",
    "EncodedLayers",
    "ClusterTree",
    "NBitsProposal",
    "encode_layers",
    "encode_scalable",
    "decode_layer",
    "decode_layers",
    "encode_known_layers",
    "transcode",
    "layer_codebook",
    "build_layers",
    "visualize_layers",
]
