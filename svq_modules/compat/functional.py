"""Seed-compatible functional API: ``encode_layers`` / ``decode_layer`` and friends.

A user of the ``scalablevq`` package switches by changing the import::

    from svq_modules.compat.functional import encode_layers, decode_layer

    layers = encode_layers(data, quantized_data, cluster_centers, [4, 2, 2, 2, 2])
    context = None
    for layer in layers:
        decoded, context = decode_layer(layer, context)   # [N, D], better each layer

Array arguments may be torch tensors, NumPy arrays (e.g. scikit-learn's
``KMeans.cluster_centers_`` / ``labels_``) or nested lists.

This module only gathers the public names; they live in
:mod:`~svq_modules.compat.records` (``Layer``, ``DecodingContext``,
``EncodedLayers``), :mod:`~svq_modules.compat.encode`,
:mod:`~svq_modules.compat.decode`, :mod:`~svq_modules.compat.transcode`,
:mod:`~svq_modules.compat.tree` (the seed's ``build_layers``: a cluster tree,
not the core :func:`svq_modules.layers.build_layers`) and
:mod:`~svq_modules.compat.visualize`. Differences from the seed: see
``docs/seed-compat.md``.
"""

from __future__ import annotations

from .bits import NBitsProposal
from .decode import decode_layer, decode_layers
from .encode import encode_layers, encode_scalable
from .records import DecodingContext, EncodedLayers, Layer
from .transcode import encode_known_layers, layer_codebook, transcode
from .tree import ClusterTree, build_layers
from .visualize import visualize_layers

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
