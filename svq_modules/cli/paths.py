"""Checks of the command line's file arguments, all done before any work.

Inputs must be existing readable regular files; outputs must name a file (not a
directory) with a supported suffix in an existing writable directory; no output
may be the same file as an input or as another output, however the paths are
spelled (relative or absolute, ``./x``, ``..``, symbolic or hard links).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

from .errors import CLIError

__all__ = ["check_distinct", "check_input_file", "check_output_file"]


def _label(option: str, path: str | os.PathLike) -> str:
    return f"{option} {os.fspath(path)}" if option else os.fspath(path)


def check_input_file(path: str | os.PathLike, option: str = "", suffixes: Sequence[str] | None = None) -> Path:
    """An existing, readable regular file (symbolic links followed).

    Args:
        path: as given on the command line (``~`` is expanded).
        option: the option it came with (``"--model"``), ``""`` for a positional argument.
        suffixes: accepted file name suffixes in lower case (e.g. ``(".npy", ".pt")``, any case matches), None for any.

    Raises:
        CLIError: missing, a directory, not a regular file, unreadable, or an unsupported suffix.
    """
    p, what = Path(path).expanduser(), _label(option, path)
    try:
        mode = os.stat(p).st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise CLIError(f"{what}: no such file") from None
    except OSError as e:
        raise CLIError(f"{what}: cannot access the file ({e.strerror})") from None
    if stat.S_ISDIR(mode):
        raise CLIError(f"{what}: is a directory, expected a file")
    if not stat.S_ISREG(mode):
        raise CLIError(f"{what}: not a regular file")
    if suffixes is not None and p.suffix.lower() not in suffixes:
        raise CLIError(f"{what}: unsupported file type {p.suffix or '(none)'!r} (use {' or '.join(suffixes)})")
    try:
        with open(p, "rb"):
            pass
    except OSError as e:
        raise CLIError(f"{what}: cannot read the file ({e.strerror})") from None
    return p


def check_output_file(path: str | os.PathLike, option: str, suffixes: Sequence[str]) -> Path:
    """A file name with a supported suffix (any case) in an existing, writable directory (``~`` is expanded).

    An existing file is replaced (atomically, when the command succeeds); an
    existing directory, or anything else that is not a regular file, is refused.

    Raises:
        CLIError: one line naming the option, the path and what is wrong.
    """
    text = os.fspath(path)
    p, what = Path(text).expanduser(), _label(option, text)
    if not text:
        raise CLIError(f"{option}: an empty file name")
    if text.endswith(("/", os.sep)) or p.name in ("", ".", "..") or p.is_dir():
        raise CLIError(f"{what}: is a directory, expected a file name such as {p / ('output' + suffixes[0])}")
    if p.suffix.lower() not in suffixes:
        raise CLIError(f"{what}: unsupported output type {p.suffix or '(none)'!r} (use {' or '.join(suffixes)})")
    if os.path.lexists(p) and not p.is_file():
        raise CLIError(f"{what}: exists and is not a regular file")
    parent = p.parent
    if not parent.exists():
        raise CLIError(f"{what}: the directory {parent} does not exist")
    if not parent.is_dir():
        raise CLIError(f"{what}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CLIError(f"{what}: the directory {parent} is not writable")
    return p


def _same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name one file: same (device, inode) when both exist, else the same resolved path."""
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return os.path.normcase(os.path.realpath(a)) == os.path.normcase(os.path.realpath(b))
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def check_distinct(inputs: Sequence[tuple[str, Path]], outputs: Sequence[tuple[str, Path]]) -> None:
    """Refuse an output that is one of the inputs or another output.

    Args:
        inputs: ``(option, path)`` of every file the command reads (option ``""`` for a positional one).
        outputs: ``(option, path)`` of every file it writes.

    Raises:
        CLIError: naming both arguments.
    """
    for i, (out_opt, out) in enumerate(outputs):
        for in_opt, src in inputs:
            if _same_file(out, src):
                raise CLIError(
                    f"{_label(out_opt, out)}: is the same file as the input {_label(in_opt, src)}; "
                    "refusing to overwrite an input, choose another output name"
                )
        for other_opt, other in outputs[:i]:
            if _same_file(out, other):
                raise CLIError(f"{_label(out_opt, out)}: is the same file as {_label(other_opt, other)}; give different names")
