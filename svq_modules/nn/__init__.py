"""The ``nn.Module`` side: the codebook learner, the scalable index and ``ScalableVQ`` composing them."""

from .codebook import EMACodebook
from .index import ScalableIndex
from .quantizer import ScalableVQ, VQOutput

__all__ = ["EMACodebook", "ScalableIndex", "ScalableVQ", "VQOutput"]
