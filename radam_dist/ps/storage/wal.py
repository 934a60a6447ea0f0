"""The write-ahead log: segments ``wal-<first version>-<seq>.log`` of checksummed records,
and ``wal.head``, which names the newest segment (FORMATS.md, "Write-ahead log").

A record is appended and fsync'ed *before* its update is applied or its push acknowledged, so
everything acknowledged is in the log. ``scan_segment`` tells the one damage a crash can cause
(a torn tail of the newest segment, never acknowledged: dropped) from every other (may be
acknowledged data: ``RecoveryError``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import zlib
from pathlib import Path
from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple

from radam_dist._files import fsync_path, remove_quietly, write_atomic
from radam_dist.ps.pushes import Gradient
from radam_dist.ps.storage.arrays import pack_arrays, unpack_arrays
from radam_dist.ps.storage.errors import DISCARD_HINT, RecoveryError, WalBrokenError

# The logger these lines always had (the "logger" field of the JSON log lines).
log = logging.getLogger("radam_dist.ps.durability")

WAL_RE = re.compile(r"^wal-(\d{12})-(\d{6})\.log$")
WAL_RECORD_MARK = b"R3"
WAL_OLD_MARK = b"R2"  # the unreleased format without a trailer: refused, not read
WAL_HEADER = 14  # mark, length, payload crc, header crc
WAL_TRAILER_MARK = b"\xa5E3Z"
WAL_TRAILER = 8  # trailer mark, payload crc again: written after the payload, never all zeros
WAL_HEAD = "wal.head"


class WalRecord(NamedTuple):
    kind: str  # "apply": an update; "stage": a sync push held for its round
    version_before: int  # apply: the version it was applied to; stage: the round
    request_ids: List[str]
    grads: Dict[str, Gradient]
    meta: dict  # everything else (worker id, the round's members, ...)


def encode_record(version_before: int, request_ids: List[str], grads: Dict[str, Gradient],
                  kind: str = "apply", **extra) -> bytes:
    arrays, items = {}, []
    for name in sorted(grads):
        grad = grads[name]
        arrays[f"{name}/values"] = grad.values
        if grad.is_sparse:
            arrays[f"{name}/indices"] = grad.indices
        items.append({"name": name, "sparse": grad.is_sparse})
    index, buffers = pack_arrays(arrays)
    meta = json.dumps(dict(extra, kind=kind, version_before=version_before, request_ids=request_ids,
                           grads=items, arrays=index)).encode()
    payload = b"".join([struct.pack("<I", len(meta)), meta, *[bytes(b) for b in buffers]])
    crc = zlib.crc32(payload)
    head = WAL_RECORD_MARK + struct.pack("<II", len(payload), crc)
    return head + struct.pack("<I", zlib.crc32(head)) + payload + _trailer(crc)


def _trailer(crc: int) -> bytes:
    return WAL_TRAILER_MARK + struct.pack("<I", crc)


def decode_record(payload: bytes) -> WalRecord:
    (meta_len,) = struct.unpack_from("<I", payload, 0)
    meta = json.loads(payload[4:4 + meta_len])
    arrays = unpack_arrays(meta.pop("arrays"), memoryview(payload)[4 + meta_len:])
    grads = {}
    for item in meta.pop("grads"):
        name = item["name"]
        grads[name] = Gradient(arrays[f"{name}/values"],
                               arrays[f"{name}/indices"] if item["sparse"] else None)
    return WalRecord(meta.pop("kind", "apply"), int(meta.pop("version_before")),
                     list(meta.pop("request_ids")), grads, meta)


class Damage(NamedTuple):
    path: Path
    offset: int
    size: int  # of the file
    torn: bool  # True: an unacknowledged torn tail that may be dropped
    reason: str

    def describe(self) -> str:
        return f"{self.path} at byte {self.offset} of {self.size}: {self.reason}"


def scan_segment(data: bytes, path: Path, newest: bool) -> Tuple[List[Tuple[int, bytes]], Optional[Damage]]:
    """([(offset, payload)] of the intact records, the first damage or None).

    A torn tail is only possible in the newest segment, and only at its end: a header cut
    short, a record whose header and declared length plus trailer run past the end of the file,
    a last record whose trailer is all zeros (space the file system allocated before the data
    arrived), or a tail of zeros. The header carries its own checksum, so a damaged length field
    is never mistaken for a torn record; the trailer is written after the payload and is never
    zeros, so a full-length record with its trailer intact and a failing payload checksum is
    damage (a flipped bit in an acknowledged record), whatever its payload ends with.
    """
    records, pos, size = [], 0, len(data)
    while pos < size:
        rest = data[pos:]

        def damage(reason: str, torn_possible: bool) -> Damage:
            torn = newest and torn_possible
            return Damage(path, pos, size, torn, reason)

        if not rest.strip(b"\0"):
            return records, damage(f"{size - pos} zero bytes instead of a record", True)
        if len(rest) < WAL_HEADER:
            return records, damage(f"a record header cut short ({len(rest)} of {WAL_HEADER} bytes)",
                                   WAL_RECORD_MARK.startswith(rest[:2]))
        if rest[:2] == WAL_OLD_MARK and pos == 0:
            return records, damage("a segment of the earlier, unreleased format (records 'R2' "
                                   "without a trailer), which this version does not read", False)
        if rest[:2] != WAL_RECORD_MARK:
            return records, damage(f"no record marker (found {rest[:2]!r})", False)
        length, crc = struct.unpack_from("<II", rest, 2)
        (head_crc,) = struct.unpack_from("<I", rest, 10)
        if zlib.crc32(rest[:10]) != head_crc:
            return records, damage("record header checksum mismatch", False)
        end = WAL_HEADER + length + WAL_TRAILER
        if end > len(rest):
            return records, damage(
                f"record of {length} bytes (+{WAL_TRAILER}-byte trailer) cut short after "
                f"{len(rest) - WAL_HEADER} bytes", True)
        payload = rest[WAL_HEADER:WAL_HEADER + length]
        trailer = rest[WAL_HEADER + length:end]
        if trailer != _trailer(crc):
            # The trailer never reached the disk (zeros where it should be) only in a last
            # record; a non-zero wrong trailer, or zeros with records after it, is damage.
            missing = end == len(rest) and not trailer.strip(b"\0")
            return records, damage(
                f"record trailer {'missing (zeros)' if missing else 'damaged'} "
                f"({length}-byte record)", missing)
        if zlib.crc32(payload) != crc:
            # Full length, trailer intact: the whole record was written (and may have been
            # acknowledged); a failing checksum is damage, never a torn tail.
            return records, damage(f"record payload checksum mismatch ({length} bytes, its "
                                   "trailer intact: written in full, then damaged)", False)
        records.append((pos, payload))
        pos += end
    return records, None


class WriteAheadLog:
    """Append-only, fsync'ed log of applied updates, in segments that start at checkpoints."""

    def __init__(self, directory: Path):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._file = None
        self.path: Optional[Path] = None
        self.seq = -1
        self.broken: Optional[str] = None  # why appends are refused (fail-stop), or None
        self.end = 0  # bytes of the open segment up to the end of its last complete record
        # the system calls of append (attributes so that a test can inject a disk fault)
        self._write, self._fsync, self._truncate = os.write, os.fsync, os.ftruncate

    @staticmethod
    def seq_of(path: Path) -> int:
        return int(WAL_RE.match(path.name).group(2))

    @staticmethod
    def first_version_of(path: Path) -> int:
        return int(WAL_RE.match(path.name).group(1))

    def segments(self) -> List[Path]:
        return sorted((p for p in self.directory.iterdir() if WAL_RE.match(p.name)), key=self.seq_of)

    def head(self) -> Optional[dict]:
        """What ``wal.head`` says is the newest segment (None: no head file)."""
        path = self.directory / WAL_HEAD
        if not path.exists():
            return None
        try:
            head = json.loads(path.read_text())
            return {"seq": int(head["seq"]), "first_version": int(head["first_version"]),
                    # written by a version that starts segments only at checkpoints (so a
                    # checkpoint existed); heads without it may come from unregistered starts
                    "checkpointed": bool(head.get("checkpointed", False))}
        except (ValueError, KeyError, TypeError) as err:
            raise RecoveryError(f"{path} is damaged ({err}); it names the newest write-ahead log "
                                f"segment. {DISCARD_HINT}") from err

    def chain(self, start_seq: int) -> List[Path]:
        """The segments from ``start_seq`` to the newest, checked complete; RecoveryError else."""
        segments = {self.seq_of(p): p for p in self.segments()}
        head = self.head()
        newest = max(segments, default=-1)
        if head is not None and head["seq"] > newest:
            raise RecoveryError(
                f"write-ahead log segment {head['seq']} (wal-{head['first_version']:012d}-"
                f"{head['seq']:06d}.log), the newest according to {self.directory / WAL_HEAD}, is "
                f"missing from {self.directory} (the newest present is {newest}); the updates it "
                f"held are lost. {DISCARD_HINT}")
        if start_seq not in segments:
            raise RecoveryError(
                f"write-ahead log segment {start_seq} that continues the checkpoint is missing "
                f"from {self.directory}; the updates after the checkpoint are lost. {DISCARD_HINT}")
        missing = [s for s in range(start_seq, newest + 1) if s not in segments]
        if missing:
            raise RecoveryError(
                f"write-ahead log segments {missing[:5]}{' ...' if len(missing) > 5 else ''} are "
                f"missing from {self.directory} (present: {sorted(segments)[:10]}); the updates "
                f"they held are lost. {DISCARD_HINT}")
        return [segments[s] for s in range(start_seq, newest + 1)]

    def read(self, segments: List[Path]) -> Iterator[Tuple[Path, WalRecord]]:
        """Every record of ``segments`` in order. A torn tail of the last one is moved to a
        ``.torn`` file and truncated (logged); any other damage raises RecoveryError, whose
        ``damage`` attribute says where."""
        for i, path in enumerate(segments):
            data = path.read_bytes()
            records, damage = scan_segment(data, path, newest=i == len(segments) - 1)
            for offset, payload in records:
                try:
                    record = decode_record(payload)
                except (ValueError, KeyError, TypeError, struct.error) as err:
                    err = RecoveryError(f"write-ahead log {path} at byte {offset}: the record's "
                                        f"checksum holds but it does not decode ({err}). {DISCARD_HINT}")
                    err.damage = Damage(path, offset, len(data), False, "undecodable")
                    raise err
                yield path, record
            if damage is None:
                continue
            if not damage.torn:
                err = RecoveryError(
                    f"write-ahead log {damage.describe()}. This is not a torn tail (the only "
                    "damage a crash can cause), so the record and those after it may hold "
                    f"acknowledged updates; refusing to start. {DISCARD_HINT}")
                err.damage = damage
                raise err
            self.cut(path, damage.offset, "torn tail of the newest segment, written when the "
                     "process died: never acknowledged (" + damage.reason + ")")

    def cut(self, path: Path, offset: int, why: str) -> None:
        """Truncate ``path`` at ``offset``; the dropped bytes are kept in ``<path>.torn-<offset>``."""
        with open(path, "r+b") as f:
            f.seek(offset)
            tail = f.read()
            keep = path.with_name(f"{path.name}.torn-{offset}")
            keep.write_bytes(tail)
            f.truncate(offset)
            os.fsync(f.fileno())
        log.warning("write-ahead log %s: dropped %d bytes from byte %d (%s); kept in %s",
                    path.name, len(tail), offset, why, keep.name)

    def start_segment(self, first_version: int) -> None:
        """Close the current segment and open a new one for records from ``first_version``.
        Called only when a checkpoint is written (which then names it)."""
        seq = self.next_seq()
        path = self.directory / f"wal-{first_version:012d}-{seq:06d}.log"
        new_file = open(path, "ab", buffering=0)
        try:
            fsync_path(self.directory)
            write_atomic(self.directory / WAL_HEAD,
                         json.dumps({"seq": seq, "first_version": first_version,
                                     "checkpointed": True}).encode())
        except BaseException:
            # (a full disk) the old segment stays open and current; nothing names the new one
            new_file.close()
            remove_quietly(path)
            raise
        self.close()
        self._file, self.path, self.seq, self.end = new_file, path, seq, 0

    def next_seq(self) -> int:
        """The sequence number the next segment gets (from 1)."""
        existing = [self.seq_of(p) for p in self.segments()]
        head = self.head() if (self.directory / WAL_HEAD).exists() else None
        return max(existing + ([head["seq"]] if head else []), default=0) + 1

    def append(self, version_before: int, request_ids: List[str], grads: Dict[str, Gradient],
               kind: str = "apply", **extra) -> None:
        """Write one record and fsync it; only then may the update be acknowledged.

        On any error (ENOSPC, EIO, ...) the segment is truncated back to where the record
        started and fsync'ed, and the error re-raised: the update must not be applied nor
        acknowledged, and the next append starts at a record boundary again. If that cleanup
        fails too, the log is marked broken and every later append raises ``WalBrokenError``
        (the server stops serving; a restart recovers from what is on disk)."""
        if self.broken is not None:
            raise WalBrokenError(f"the write-ahead log is broken ({self.broken}); this server "
                                 "takes no more updates: restart it to recover from the directory")
        if self._file is None:
            raise WalBrokenError("no write-ahead log segment is open (nothing registered yet?)")
        record = encode_record(version_before, request_ids, grads, kind, **extra)
        fd = self._file.fileno()
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            view, written = memoryview(record), 0
            while written < len(view):
                written += self._write(fd, view[written:])
            self._fsync(fd)
        except BaseException as err:
            try:
                self._truncate(fd, start)
                self._fsync(fd)
            except BaseException as again:
                self.broken = (f"appending to {self.path} at byte {start} failed ({err!r}) and "
                               f"truncating it back failed too ({again!r})")
                log.error("write-ahead log: %s", self.broken)
                raise WalBrokenError(self.broken) from err
            log.error("write-ahead log: appending %d bytes to %s at byte %d failed (%r); "
                      "truncated back, the update is refused", len(record), self.path, start, err)
            raise
        self.end = start + len(record)

    def drop_before(self, version: int) -> None:
        """Delete segments holding only records older than ``version`` (the oldest checkpoint)."""
        segments = self.segments()
        for path, following in zip(segments, segments[1:]):
            if path != self.path and self.first_version_of(following) <= version:
                path.unlink(missing_ok=True)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
