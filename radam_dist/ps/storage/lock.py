"""``<dir>/LOCK``: one server per checkpoint directory (FORMATS.md, "LOCK")."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from radam_dist.ps.storage.errors import DirectoryLockedError

LOCK_NAME = "LOCK"


class DirectoryLock:
    """An exclusive ``flock`` on ``<dir>/LOCK``, which names its holder (pid, host, port).

    The kernel releases the lock when the process dies, so a crashed server never leaves a
    stale lock behind; the file itself stays (deleting it would let two holders lock two files).
    """

    def __init__(self, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / LOCK_NAME
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            self._fd = None
            raise DirectoryLockedError(
                f"checkpoint directory {directory} is in use by another server ({holder}); stop "
                "that server first, or give this one its own --checkpoint-dir") from None
        self.update()

    def update(self, **fields) -> None:
        """Rewrite the holder's description (the server adds its port once it is bound)."""
        info = dict(pid=os.getpid(), host=socket.gethostname(),
                    since=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **fields)
        data = json.dumps(info, sort_keys=True).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data + b"\n", 0)
        os.fsync(self._fd)

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
