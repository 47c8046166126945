"""Command line: ``python -m svq_modules compress | decompress | info``."""

from .main import main

__all__ = ["main"]
