"""When and what a shard writes to its checkpoint directory: checkpoints (on request, on the
timer, at shutdown, at registration) and ``wal.mark``. The file formats are storage's
(storage/FORMATS.md); this module decides their content.

A checkpoint is a snapshot of the store, the request-id table, the round decisions and the
worker ids, taken under the shard's Condition at one instant; with --wal the next log segment
starts at that instant too, and begins with the staged pushes, which would otherwise live only
in the segment a later checkpoint deletes. The file itself is written outside the Condition
(calls go on meanwhile), under the checkpointer's own lock, so two checkpoints never interleave.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np

from radam_dist._files import remove_quietly
from radam_dist.ps.errors import PSError
from radam_dist.ps.metrics import PSMetrics
from radam_dist.ps.options import ServeOptions
from radam_dist.ps.rounds import RoundCoordinator
from radam_dist.ps.shard import Shard
from radam_dist.ps.storage import WalMark, checkpoint_version, list_checkpoints, write_checkpoint
from radam_dist.ps.store import ParameterStore

# The logger these lines always had (the "logger" field of the JSON log lines).
log = logging.getLogger("radam_dist.ps.service")


def unavailable_on_disk_error(err: OSError, what: str) -> PSError:
    return PSError("UNAVAILABLE", f"{what} failed ({err.strerror or err}); nothing changed, "
                                  "retry once the checkpoint directory has room")


class Checkpointer:
    """Writes one shard's checkpoints and ``wal.mark``; owns the checkpoint lock, the version
    of the newest checkpoint written and the mark file (set by recovery, ``resume``)."""

    def __init__(self, options: ServeOptions, shard: Shard, rounds: RoundCoordinator,
                 metrics: PSMetrics):
        self.options = options
        self.directory: Optional[Path] = options.checkpoint_dir
        self.shard = shard
        self.rounds = rounds
        self.metrics = metrics
        self._lock = threading.Lock()  # one checkpoint at a time (the timer, a call, shutdown)
        self.last_version = -1  # of the newest checkpoint written or resumed from
        self.mark: Optional[WalMark] = None

    def resume(self, mark: Optional[WalMark], version: int) -> None:
        """What recovery found: the mark file, the version of the checkpoint it resumed from."""
        self.mark = mark
        self.last_version = version

    # -- content ----------------------------------------------------------------------------------
    def facts(self, placement: dict) -> dict:
        """What a checkpoint holds beside the store's state (cond held)."""
        return dict(shard_index=self.options.shard_index, num_shards=self.options.num_shards,
                    placement=placement, dedup=self.shard.dedup_items(),
                    **self.rounds.checkpoint_facts())

    def export_locked(self) -> Tuple[dict, Dict[str, np.ndarray]]:
        """(meta, arrays) of the current state; with --wal starts the segment it names (cond held)."""
        shard = self.shard
        meta, arrays = shard.store.export_state()
        meta.update(self.facts(shard.placement))
        wal = shard.wal
        if wal is not None:  # later records go to a segment that starts here
            wal.start_segment(shard.store.version)
            meta["wal_segment"] = wal.seq
            for worker, rid, grads in self.rounds.staged_pushes():  # they live on in the new segment
                wal.append(shard.store.version, [rid], grads or {}, kind="stage", worker=worker,
                           skipped=grads is None)
        return meta, arrays

    # -- writing ----------------------------------------------------------------------------------
    def save(self) -> Tuple[Optional[Path], int, str]:
        """Write a checkpoint of the current state (no-op without a directory / registration)."""
        shard = self.shard
        with self._lock:
            with shard.cond:
                if self.directory is None or not shard.store.registered:
                    return None, shard.store.version, ""
                if shard.failed is not None:  # fail-stop: leave the directory as it is on disk
                    log.warning("no checkpoint written: %s", shard.failed)
                    return None, shard.store.version, ""
                meta, arrays = self.export_locked()
            with self.metrics.checkpoint_seconds.time():
                return self._write(meta, arrays)

    def save_on_request(self, job_id: str) -> Tuple[Optional[Path], int, str]:
        """SaveCheckpoint: refusals first (PSError), then ``save``."""
        with self.shard.cond:
            self.shard.check_job(job_id)
        if self.directory is None:
            raise PSError("FAILED_PRECONDITION", "this server runs without --checkpoint-dir")
        if not self.shard.store.registered:
            raise PSError("FAILED_PRECONDITION", "nothing registered to checkpoint")
        if self.shard.failed is not None:
            raise PSError("INTERNAL", f"this server stopped serving ({self.shard.failed}); restart it")
        try:
            return self.save()
        except OSError as err:
            raise unavailable_on_disk_error(err, "writing the checkpoint") from err

    def _write(self, meta: dict, arrays: Dict[str, np.ndarray]) -> Tuple[Path, int, str]:
        path, digest = write_checkpoint(self.directory, meta, arrays, self.options.keep_checkpoints)
        wal = self.shard.wal
        if wal is not None:
            kept = list_checkpoints(self.directory)
            oldest = checkpoint_version(kept[0]) if kept else 0
            with self.shard.cond:
                wal.drop_before(oldest)
        with self.shard.cond:
            self.last_version = max(self.last_version, meta["version"])
        log.info("checkpoint %s (version %d)", path.name, meta["version"])
        return path, meta["version"], digest

    def write_registration(self, store: ParameterStore, placement: dict) -> None:
        """The first checkpoint, then the first log segment (cond held); on a write error
        nothing of either stays on disk and the registration is refused with UNAVAILABLE.
        Without --checkpoint-dir: nothing to write."""
        if self.directory is None:
            return
        wal = self.shard.wal
        meta, arrays = store.export_state()
        meta.update(self.facts(placement))
        if wal is not None:
            meta["wal_segment"] = wal.next_seq()
        try:
            path, _ = write_checkpoint(self.directory, meta, arrays, self.options.keep_checkpoints)
        except OSError as err:
            raise unavailable_on_disk_error(err, "writing the registration's checkpoint") from err
        if wal is not None:
            try:
                wal.start_segment(store.version)
            except OSError as err:
                remove_quietly(path)  # a checkpoint naming a segment that does not exist would be refused
                raise unavailable_on_disk_error(err, "starting the write-ahead log") from err
            assert wal.seq == meta["wal_segment"]
        self.last_version = 0

    def write_mark(self) -> bool:
        """fsync (segment, end, version) of the newest acknowledged record into ``wal.mark``
        (the server calls this every --wal-mark-interval). Only what is durable is recorded."""
        wal = self.shard.wal
        if self.mark is None or wal is None or self.shard.failed is not None:
            return False
        with self.shard.cond:
            if wal.path is None:
                return False
            seq, end, version = wal.seq, wal.end, self.shard.store.version
        return self.mark.write(seq, end, version)
