"""The command line's user-error class and its one-line messages."""

from __future__ import annotations

__all__ = ["CLIError", "one_line"]


class CLIError(Exception):
    """A user error: :func:`svq_modules.cli.main` prints it as one line, without a traceback, exit status 1."""


def one_line(error: BaseException, limit: int = 300) -> str:
    """``error``'s message on one line (whitespace runs collapsed), at most ``limit`` characters."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
