"""Durable file writes shared by the parameter server's checkpoints and log head and by the
kernel cache (radam_dist/native): write beside, fsync, rename, fsync the folder, so that a
crash leaves the old file or the new one, never a part of either."""

import os
from pathlib import Path


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's fsync makes a rename in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``, durably and all at once."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)  # a full disk must not keep the half-written file (and its space)
        raise
    fsync_path(path.parent)


def remove_quietly(path: Path) -> None:
    """Delete ``path`` if it is there; errors are ignored (the caller is already failing)."""
    try:
        os.unlink(path)
    except OSError:
        pass
