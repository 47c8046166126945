"""The ``nn.Module`` side: the codebook learner, the scalable index and ``ScalableVQ`` composing them."""

from .quantizer import ScalableVQ, VQOutput

__all__ = ["ScalableVQ", "VQOutput"]
