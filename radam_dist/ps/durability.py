"""Checkpoints, the write-ahead log, and the lock on the checkpoint directory.

Checkpoint file ``ckpt-<version>.radps``::

    MAGIC | u64 metadata length | metadata JSON | raw arrays | sha256 of everything before

written to a temporary name, fsync'ed, renamed into place and the directory fsync'ed, so a
crash leaves either the old or the new file, never half of one. A checkpoint written with
``--wal`` names (``wal_segment``) the log segment that continues it.

The write-ahead log (``--wal``) holds one record per applied update (an async push, or a sync
round's averaged gradients) and one per staged sync push, appended and fsync'ed *before* the
update is applied or the push acknowledged. Records::

    b"R3" | u32 payload length | u32 crc32(payload) | u32 crc32(the 10 bytes before) | payload
          | trailer
    payload = u32 metadata length | metadata JSON | raw arrays
    trailer = b"\xa5E3Z" | u32 crc32(payload)   (8 bytes, never all zeros)

(Segments of the earlier, unreleased ``R2`` format, which had no trailer, are not read: a
server refuses to start on one, naming it.)

Segments are named ``wal-<first version>-<seq>.log``; a new one starts at each checkpoint,
``wal.head`` names the newest one, and segments older than the oldest kept checkpoint are
deleted.

Recovery tells a torn tail from damage (see ``scan_segment``): the process can only have died
while writing the *last* record of the *newest* segment, and that record was never
acknowledged (its fsync had not returned), so a record whose trailer is missing at the end of
the newest segment (cut short, or zeros where the trailer should be, or a zero-filled tail) is
dropped -- its bytes are kept in a ``.torn`` file. Anything else -- a bad header, a full-length
record whose trailer is intact but whose payload checksum fails, a damaged record in an older
segment, a missing segment, a head that names a segment that is gone -- may be acknowledged
data and raises ``RecoveryError``: the server refuses to start unless the operator passes
``--discard-damaged-state``, which moves the damaged files aside and logs what it dropped.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import socket
import struct
import time
import zlib
from pathlib import Path
from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple

import numpy as np

from radam_dist._files import fsync_path, remove_quietly, write_atomic
from radam_dist.ps.store import Gradient
from radam_dist.ps.tensors import numpy_dtype

log = logging.getLogger(__name__)

CKPT_MAGIC = b"RADAM-PS-CKPT-1\n"
CKPT_RE = re.compile(r"^ckpt-(\d{12})\.radps$")
WAL_RE = re.compile(r"^wal-(\d{12})-(\d{6})\.log$")
WAL_MARK = b"R3"
WAL_OLD_MARK = b"R2"  # the unreleased format without a trailer: refused, not read
WAL_HEADER = 14  # mark, length, payload crc, header crc
WAL_TRAILER_MARK = b"\xa5E3Z"
WAL_TRAILER = 8  # trailer mark, payload crc again: written after the payload, never all zeros
WAL_HEAD = "wal.head"
WAL_MARK_NAME = "wal.mark"
LOCK_NAME = "LOCK"
TEMP_RE = re.compile(r"^\..+\.\d+\.tmp$")  # write_checkpoint's and write_atomic's temporary names
DISCARD_HINT = ("restore the file from a backup, or restart with --discard-damaged-state to "
                "move the damaged files aside and continue without the updates they hold")


class RecoveryError(RuntimeError):
    """Durable state is damaged or incomplete: starting would silently lose acknowledged updates."""


class WalBrokenError(RuntimeError):
    """An append failed and the log could not be brought back to its last complete record:
    the server must stop serving (a restart recovers from the directory)."""


class DirectoryLockedError(RuntimeError):
    """Another server holds the checkpoint directory."""


# -- the directory lock -----------------------------------------------------------------------
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


# -- arrays -----------------------------------------------------------------------------------
def _pack_arrays(arrays: Dict[str, np.ndarray]) -> Tuple[list, List[memoryview]]:
    index, buffers, offset = [], [], 0
    for key, array in arrays.items():
        array = np.asarray(array, order="C")  # (ascontiguousarray makes 0-d arrays 1-d)
        index.append({"key": key, "dtype": array.dtype.name, "shape": list(array.shape),
                      "offset": offset, "nbytes": int(array.nbytes)})
        buffers.append(memoryview(array.reshape(-1).view(np.uint8)) if array.size else memoryview(b""))
        offset += array.nbytes
    return index, buffers


def _unpack_arrays(index: list, blob: memoryview) -> Dict[str, np.ndarray]:
    out = {}
    for item in index:
        start, end = item["offset"], item["offset"] + item["nbytes"]
        if end > len(blob):
            raise ValueError(f"array {item['key']!r} runs past the end of the data")
        out[item["key"]] = np.frombuffer(blob[start:end], dtype=numpy_dtype(item["dtype"])).reshape(
            item["shape"]).copy()
    return out


# -- checkpoints ------------------------------------------------------------------------------
def write_checkpoint(directory: Path, meta: dict, arrays: Dict[str, np.ndarray], keep: int = 2) -> Tuple[Path, str]:
    """Atomically write a checkpoint; returns (path, sha256 hex). Keeps the newest ``keep``."""
    directory.mkdir(parents=True, exist_ok=True)
    index, buffers = _pack_arrays(arrays)
    header = json.dumps(dict(meta, arrays=index)).encode()
    final = directory / f"ckpt-{int(meta['version']):012d}.radps"
    tmp = directory / f".{final.name}.{os.getpid()}.tmp"
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as f:
            for piece in (CKPT_MAGIC, struct.pack("<Q", len(header)), header, *buffers):
                digest.update(piece)
                f.write(piece)
            f.write(digest.digest())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        remove_quietly(tmp)  # (ENOSPC) the half-written file would keep its space
        raise
    fsync_path(directory)
    for old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
    return final, digest.hexdigest()


def sweep_temp_files(directory: Path) -> List[str]:
    """Delete the temporary files of writes that never finished (a crash or a full disk
    before the rename); only the holder of the directory lock calls this. Returns their names."""
    if not directory.exists():
        return []
    swept = []
    for p in sorted(directory.iterdir()):
        if TEMP_RE.match(p.name) and p.is_file():
            size = p.stat().st_size
            p.unlink()
            swept.append(p.name)
            log.info("removed %s (%d bytes), left by a write that did not finish", p.name, size)
    return swept


def space_needed(directory: Path) -> int:
    """Bytes a new checkpoint here needs, estimated by the newest one on disk."""
    kept = list_checkpoints(directory)
    return kept[-1].stat().st_size if kept else 0


def list_checkpoints(directory: Path) -> List[Path]:
    """Checkpoint files, oldest first."""
    if not directory.exists():
        return []
    return sorted(p for p in directory.iterdir() if CKPT_RE.match(p.name))


def read_checkpoint(path: Path) -> Tuple[dict, Dict[str, np.ndarray]]:
    """(metadata, arrays); ValueError if the file is damaged."""
    data = path.read_bytes()
    if len(data) < len(CKPT_MAGIC) + 8 + 32 or not data.startswith(CKPT_MAGIC):
        raise ValueError(f"{path}: not a radam_dist parameter-server checkpoint "
                         f"({len(data)} bytes, bad magic or too short)")
    body, checksum = memoryview(data)[:-32], data[-32:]
    if hashlib.sha256(body).digest() != checksum:
        raise ValueError(f"{path}: sha256 mismatch over its {len(data)} bytes (damaged or "
                         "partially written)")
    (header_len,) = struct.unpack_from("<Q", data, len(CKPT_MAGIC))
    start = len(CKPT_MAGIC) + 8
    meta = json.loads(bytes(body[start:start + header_len]))
    arrays = _unpack_arrays(meta.pop("arrays"), body[start + header_len:])
    return meta, arrays


def load_latest_checkpoint(directory: Path) -> Optional[Tuple[Path, dict, Dict[str, np.ndarray]]]:
    """The newest checkpoint whose checksum verifies (older ones are tried in turn)."""
    found = load_checkpoints(directory)
    return found[0] if found[0] is not None else None


def load_checkpoints(directory: Path):
    """((path, meta, arrays) of the newest valid checkpoint or None, [(path, why) newer ones
    that did not verify])."""
    damaged = []
    for path in reversed(list_checkpoints(directory)):
        try:
            meta, arrays = read_checkpoint(path)
        except (ValueError, OSError, KeyError, TypeError, json.JSONDecodeError,
                UnicodeDecodeError, struct.error) as err:
            log.warning("checkpoint %s does not verify: %s", path, err)
            damaged.append((path, str(err)))
            continue
        return (path, meta, arrays), damaged
    return None, damaged


# -- write-ahead log --------------------------------------------------------------------------
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
    index, buffers = _pack_arrays(arrays)
    meta = json.dumps(dict(extra, kind=kind, version_before=version_before, request_ids=request_ids,
                           grads=items, arrays=index)).encode()
    payload = b"".join([struct.pack("<I", len(meta)), meta, *[bytes(b) for b in buffers]])
    crc = zlib.crc32(payload)
    head = WAL_MARK + struct.pack("<II", len(payload), crc)
    return head + struct.pack("<I", zlib.crc32(head)) + payload + _trailer(crc)


def _trailer(crc: int) -> bytes:
    return WAL_TRAILER_MARK + struct.pack("<I", crc)


def decode_record(payload: bytes) -> WalRecord:
    (meta_len,) = struct.unpack_from("<I", payload, 0)
    meta = json.loads(payload[4:4 + meta_len])
    arrays = _unpack_arrays(meta.pop("arrays"), memoryview(payload)[4 + meta_len:])
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
                                   WAL_MARK.startswith(rest[:2]))
        if rest[:2] == WAL_OLD_MARK and pos == 0:
            return records, damage("a segment of the earlier, unreleased format (records 'R2' "
                                   "without a trailer), which this version does not read", False)
        if rest[:2] != WAL_MARK:
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
