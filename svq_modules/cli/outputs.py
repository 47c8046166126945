"""All-or-nothing writing of a command's output files.

Every output is first written in full, atomically (see
:func:`svq_modules.coding.container.atomic_write`), to a temporary name next to
its destination; only when all are written are they renamed into place. On any
error or interrupt (``KeyboardInterrupt`` included) the temporary files are
removed and no destination is touched, except in the rename loop itself, where
outputs this call had already created are removed again.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from ..coding.container import atomic_write

__all__ = ["Writer", "bytes_writer", "write_outputs"]

#: writes one output in full to the path it is given (a temporary name with the destination's suffix)
Writer = Callable[[Path], None]


def bytes_writer(data: bytes) -> Writer:
    """A :data:`Writer` of fixed bytes (atomic)."""
    return lambda path: atomic_write(path, data)


def _remove(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def write_outputs(outputs: Sequence[tuple[Path, Writer]]) -> None:
    """Write every ``(destination, writer)`` pair, or none of them.

    Args:
        outputs: destinations (distinct, in writable directories) and their writers.
    """
    staged: list[tuple[Path, Path]] = []
    created: list[Path] = []
    try:
        for dest, writer in outputs:
            fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=f".partial{dest.suffix}", dir=dest.parent)
            os.close(fd)
            tmp = Path(name)
            staged.append((tmp, dest))
            _remove(tmp)  # the writer creates it (with the mode a new file gets)
            writer(tmp)
            if dest.exists():  # a replaced file keeps its permissions
                os.chmod(tmp, stat.S_IMODE(os.stat(dest).st_mode))
        for tmp, dest in staged:
            existed = os.path.lexists(dest)
            os.replace(tmp, dest)
            if not existed:
                created.append(dest)
    except BaseException:
        for tmp, _ in staged:
            _remove(tmp)
        for dest in created:
            _remove(dest)
        raise
