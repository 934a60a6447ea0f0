"""Checkpoints and the write-ahead log.

Checkpoint file ``ckpt-<version>.radps``::

    MAGIC | u64 metadata length | metadata JSON | raw arrays | sha256 of everything before

written to a temporary name, fsync'ed, renamed into place and the directory fsync'ed, so a
crash leaves either the old or the new file, never half of one; a file whose checksum does
not match is skipped on load and the previous one is used.

The write-ahead log (``--wal``) holds one record per applied update (an async push, or a sync
round's averaged gradients), appended and fsync'ed *before* the update is applied and
acknowledged. A restart loads the newest valid checkpoint and re-applies every later record,
so an acknowledged push survives ``kill -9``. Records::

    b"RW" | u32 payload length | u32 crc32(payload) | payload
    payload = u32 metadata length | metadata JSON | raw arrays

A torn record at the end of the log (the process died while writing it) was never
acknowledged; it is dropped. Segments are named ``wal-<first version>-<seq>.log``; a new one
starts at each checkpoint and segments older than the oldest kept checkpoint are deleted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
import zlib
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from radam_dist.ps.store import Gradient
from radam_dist.ps.tensors import numpy_dtype

log = logging.getLogger(__name__)

CKPT_MAGIC = b"RADAM-PS-CKPT-1\n"
CKPT_RE = re.compile(r"^ckpt-(\d{12})\.radps$")
WAL_RE = re.compile(r"^wal-(\d{12})-(\d{6})\.log$")
WAL_MARK = b"RW"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    with open(tmp, "wb") as f:
        for piece in (CKPT_MAGIC, struct.pack("<Q", len(header)), header, *buffers):
            digest.update(piece)
            f.write(piece)
        f.write(digest.digest())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    _fsync_dir(directory)
    for old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
    return final, digest.hexdigest()


def list_checkpoints(directory: Path) -> List[Path]:
    """Checkpoint files, oldest first."""
    if not directory.exists():
        return []
    return sorted(p for p in directory.iterdir() if CKPT_RE.match(p.name))


def read_checkpoint(path: Path) -> Tuple[dict, Dict[str, np.ndarray]]:
    """(metadata, arrays); ValueError if the file is damaged."""
    data = path.read_bytes()
    if len(data) < len(CKPT_MAGIC) + 8 + 32 or not data.startswith(CKPT_MAGIC):
        raise ValueError(f"{path}: not a radam_dist parameter-server checkpoint")
    body, checksum = memoryview(data)[:-32], data[-32:]
    if hashlib.sha256(body).digest() != checksum:
        raise ValueError(f"{path}: checksum mismatch (damaged or partially written)")
    (header_len,) = struct.unpack_from("<Q", data, len(CKPT_MAGIC))
    start = len(CKPT_MAGIC) + 8
    meta = json.loads(bytes(body[start:start + header_len]))
    arrays = _unpack_arrays(meta.pop("arrays"), body[start + header_len:])
    return meta, arrays


def load_latest_checkpoint(directory: Path) -> Optional[Tuple[Path, dict, Dict[str, np.ndarray]]]:
    """The newest checkpoint whose checksum verifies (older ones are tried in turn)."""
    for path in reversed(list_checkpoints(directory)):
        try:
            meta, arrays = read_checkpoint(path)
        except (ValueError, OSError, KeyError, json.JSONDecodeError) as err:
            log.warning("skipping checkpoint %s: %s", path, err)
            continue
        return path, meta, arrays
    return None


# -- write-ahead log --------------------------------------------------------------------------
def encode_record(version_before: int, request_ids: List[str], grads: Dict[str, Gradient]) -> bytes:
    arrays, items = {}, []
    for name in sorted(grads):
        grad = grads[name]
        arrays[f"{name}/values"] = grad.values
        if grad.is_sparse:
            arrays[f"{name}/indices"] = grad.indices
        items.append({"name": name, "sparse": grad.is_sparse})
    index, buffers = _pack_arrays(arrays)
    meta = json.dumps({"version_before": version_before, "request_ids": request_ids,
                       "grads": items, "arrays": index}).encode()
    payload = b"".join([struct.pack("<I", len(meta)), meta, *[bytes(b) for b in buffers]])
    return WAL_MARK + struct.pack("<II", len(payload), zlib.crc32(payload)) + payload


def decode_record(payload: bytes) -> Tuple[int, List[str], Dict[str, Gradient]]:
    (meta_len,) = struct.unpack_from("<I", payload, 0)
    meta = json.loads(payload[4:4 + meta_len])
    arrays = _unpack_arrays(meta["arrays"], memoryview(payload)[4 + meta_len:])
    grads = {}
    for item in meta["grads"]:
        name = item["name"]
        grads[name] = Gradient(arrays[f"{name}/values"],
                               arrays[f"{name}/indices"] if item["sparse"] else None)
    return int(meta["version_before"]), list(meta["request_ids"]), grads


class WriteAheadLog:
    """Append-only, fsync'ed log of applied updates, in segments that start at checkpoints."""

    def __init__(self, directory: Path):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._file = None
        self.path: Optional[Path] = None

    def segments(self) -> List[Path]:
        return sorted(p for p in self.directory.iterdir() if WAL_RE.match(p.name))

    def records(self) -> Iterator[Tuple[int, List[str], Dict[str, Gradient]]]:
        """Every intact record in order; a torn tail of a segment is dropped (truncated)."""
        for path in self.segments():
            with open(path, "rb") as f:
                data = f.read()
            pos = 0
            while pos < len(data):
                header_end = pos + 10
                valid = data[pos:pos + 2] == WAL_MARK and header_end <= len(data)
                if valid:
                    length, crc = struct.unpack_from("<II", data, pos + 2)
                    payload = data[header_end:header_end + length]
                    valid = len(payload) == length and zlib.crc32(payload) == crc
                if not valid:
                    log.warning("WAL %s: torn or damaged record at byte %d of %d, dropping the rest "
                                "(it was never acknowledged)", path.name, pos, len(data))
                    with open(path, "r+b") as f:
                        f.truncate(pos)
                        os.fsync(f.fileno())
                    break
                yield decode_record(payload)
                pos = header_end + length

    def start_segment(self, first_version: int) -> None:
        """Close the current segment and open a new one for records from ``first_version``."""
        self.close()
        existing = [int(WAL_RE.match(p.name).group(2)) for p in self.segments()]
        seq = max(existing, default=-1) + 1
        self.path = self.directory / f"wal-{first_version:012d}-{seq:06d}.log"
        self._file = open(self.path, "ab")
        _fsync_dir(self.directory)

    def append(self, version_before: int, request_ids: List[str], grads: Dict[str, Gradient]) -> None:
        """Write one record and fsync it; only then may the update be acknowledged."""
        record = encode_record(version_before, request_ids, grads)
        self._file.write(record)
        self._file.flush()
        os.fsync(self._file.fileno())

    def drop_before(self, version: int) -> None:
        """Delete segments holding only records older than ``version`` (the oldest checkpoint)."""
        segments = self.segments()
        for path, following in zip(segments, segments[1:]):
            if path != self.path and int(WAL_RE.match(following.name).group(1)) <= version:
                path.unlink(missing_ok=True)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
