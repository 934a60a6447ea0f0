"""``wal.mark``: how far the write-ahead log reached, so that a log cut at a record boundary
is seen (FORMATS.md, "wal.mark")."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path
from typing import Optional, Tuple

from radam_dist._files import fsync_path
from radam_dist.ps.storage.errors import DISCARD_HINT, RecoveryError

WAL_MARK_NAME = "wal.mark"


class WalMark:
    """``wal.mark``: a high-water mark of the log, fsync'ed every ``--wal-mark-interval``.

    A segment cut exactly at a record boundary looks like a log with fewer records; the mark
    (segment, byte offset and version after the newest acknowledged record, at the time it was
    written) lets recovery see that records it once held are gone. File: two 64-byte slots,
    written in turn, so a crash while writing one leaves the other intact::

        b"RWM1" | u64 counter | u64 segment seq | u64 end offset | u64 version | u32 crc32
        (of the 36 bytes before) | zeros to 64 bytes
    """

    SLOT = 64
    _FORMAT = "<4sQQQQ"
    _MAGIC = b"RWM1"

    def __init__(self, directory: Path):
        self.path = directory / WAL_MARK_NAME
        self._counter = 0
        self._last: Optional[Tuple[int, int, int]] = None
        current = self.read()
        if current is not None:
            self._counter = current["counter"]
            self._last = (current["seq"], current["end"], current["version"])

    @classmethod
    def _slot(cls, counter: int, seq: int, end: int, version: int) -> bytes:
        body = struct.pack(cls._FORMAT, cls._MAGIC, counter, seq, end, version)
        return (body + struct.pack("<I", zlib.crc32(body))).ljust(cls.SLOT, b"\0")

    def read(self) -> Optional[dict]:
        """The newest valid slot ({counter, seq, end, version}), None without a mark;
        RecoveryError where the file holds something that is not a mark."""
        if not self.path.exists():
            return None
        data = self.path.read_bytes()
        found, damaged = [], 0
        for i in range(2):
            slot = data[i * self.SLOT:(i + 1) * self.SLOT]
            if not slot.strip(b"\0"):
                continue  # never written (a crash during the very first write leaves zeros)
            body = slot[:36]
            if len(slot) < 40 or struct.unpack_from("<I", slot, 36)[0] != zlib.crc32(body) \
                    or body[:4] != self._MAGIC:
                damaged += 1
                continue
            _, counter, seq, end, version = struct.unpack(self._FORMAT, body)
            found.append({"counter": counter, "seq": seq, "end": end, "version": version})
        if not found and (damaged or data.strip(b"\0")):
            raise RecoveryError(f"{self.path} is damaged ({len(data)} bytes, no slot verifies); it "
                                "records how far the write-ahead log reached, so a shortened log "
                                f"could not be detected. {DISCARD_HINT}")
        return max(found, key=lambda m: m["counter"]) if found else None

    def write(self, seq: int, end: int, version: int) -> bool:
        """Record (segment, end offset, version), fsync'ed; False when it is already recorded."""
        if self._last == (seq, end, version):
            return False
        self._counter += 1
        slot = self._slot(self._counter, seq, end, version)
        created = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, slot, (self._counter % 2) * self.SLOT)
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            fsync_path(self.path.parent)
        self._last = (seq, end, version)
        return True
