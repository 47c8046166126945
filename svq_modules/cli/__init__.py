"""Command line: ``python -m svq_modules compress | decompress | info`` (see :mod:`svq_modules.cli.main`)."""

from .errors import CLIError
from .main import main

__all__ = ["CLIError", "main"]
