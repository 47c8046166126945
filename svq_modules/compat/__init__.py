"""Seed-compatible functional API (``scalablevq`` call conventions) and its visualisation.

``from svq_modules.compat import encode_layers, decode_layer, build_layers, visualize_layers``
is the same as importing them from :mod:`svq_modules.compat.functional` (the
documented path). ``build_layers`` here is the seed's cluster tree; the core
``svq_modules.build_layers`` (layer tables) is a different function.
"""

from . import functional
from .functional import *  # noqa: F403  (the same names, listed once in functional.__all__)

__all__ = list(functional.__all__)
