"""Files that are either the old complete version or the new complete version, never half.

Everything segjax writes outside Orbax checkpoints and that a later run or another
process reads back (annotation JSON, cached image embeddings, stored mask logits,
generated dataset annotations) goes through `atomic_open`: the bytes go to a unique
temporary file in the target's folder, are flushed and fsync'ed, then `os.replace`d
onto the target (atomic on POSIX and Windows), and the folder is fsync'ed so the
rename survives a power cut. A failure (or a kill) at any point leaves the previous
file untouched and no temporary file behind (a kill may leave one `.tmp_*`, which
nothing reads).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import IO


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Opens a temporary file for writing that replaces `path` when the block ends
    without an exception. mode: 'w' (text) or 'wb' (binary). The folder is created."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode 'w' or 'wb', got {mode!r}")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_" + os.path.basename(path) + ".", dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _sync_folder(folder)


def _sync_folder(folder: str) -> None:
    # the rename is durable once the folder entry is on disk; not every file system
    # (or OS) lets a folder be opened and synced, and then there is nothing more to do
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
