"""Checkpoint files ``ckpt-<version>.radps`` and the temporary files of unfinished writes
(FORMATS.md, "Checkpoint")."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from radam_dist._files import fsync_path, remove_quietly
from radam_dist.ps.storage.arrays import pack_arrays, unpack_arrays

# The logger these lines always had (the "logger" field of the JSON log lines).
log = logging.getLogger("radam_dist.ps.durability")

CKPT_MAGIC = b"RADAM-PS-CKPT-1\n"
CKPT_RE = re.compile(r"^ckpt-(\d{12})\.radps$")
TEMP_RE = re.compile(r"^\..+\.\d+\.tmp$")  # write_checkpoint's and write_atomic's temporary names

Loaded = Tuple[Path, dict, Dict[str, np.ndarray]]


def write_checkpoint(directory: Path, meta: dict, arrays: Dict[str, np.ndarray],
                     keep: int = 2) -> Tuple[Path, str]:
    """Atomically write a checkpoint; returns (path, sha256 hex). Keeps the newest ``keep``.

    Written beside, fsync'ed, renamed and the directory fsync'ed: a crash leaves the old file
    or the new one, never half of one."""
    directory.mkdir(parents=True, exist_ok=True)
    index, buffers = pack_arrays(arrays)
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


def checkpoint_version(path: Path) -> int:
    """The version in a checkpoint's name."""
    return int(CKPT_RE.match(path.name).group(1))


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
    arrays = unpack_arrays(meta.pop("arrays"), body[start + header_len:])
    return meta, arrays


def load_latest_checkpoint(directory: Path) -> Optional[Loaded]:
    """The newest checkpoint whose checksum verifies (older ones are tried in turn)."""
    found = load_checkpoints(directory)
    return found[0] if found[0] is not None else None


def load_checkpoints(directory: Path) -> Tuple[Optional[Loaded], List[Tuple[Path, str]]]:
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
