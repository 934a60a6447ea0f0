"""Bringing a shard back from its checkpoint directory at start.

The newest checkpoint that verifies is loaded; with --wal the log segments that continue it are
replayed (updates re-applied, staged sync pushes held again); ``wal.mark`` is compared with
where the log ends. Whatever would silently lose acknowledged updates -- a damaged checkpoint
with nothing to replace it, a log without its checkpoint, a missing segment, a damaged record
that is not a torn tail, a log shorter than the mark -- raises ``RecoveryError`` (the server
refuses to start), unless ``--discard-damaged-state``, which moves the damaged files into
``discarded-<time>/`` and logs what was dropped. The rules are in storage/FORMATS.md.

Runs once, in the servicer's constructor, before any call can arrive: it takes no lock.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Iterable, NamedTuple, Optional

from radam_dist.ps.options import ServeOptions
from radam_dist.ps.rounds import Decision, RoundCoordinator
from radam_dist.ps.shard import Shard
from radam_dist.ps.storage import (DISCARD_HINT, WAL_HEAD, WAL_MARK_NAME, WAL_RE, RecoveryError,
                                   WalMark, WriteAheadLog, load_checkpoints, sweep_temp_files)

# The logger these lines always had (the "logger" field of the JSON log lines).
log = logging.getLogger("radam_dist.ps.service")


class Recovered(NamedTuple):
    """What the checkpointer carries on with."""

    mark: Optional[WalMark]  # None without --wal
    checkpoint_version: int  # of the checkpoint resumed from; -1: none


class Recovery:
    """Restores ``shard`` and ``rounds`` from ``options.checkpoint_dir`` (``run``)."""

    def __init__(self, options: ServeOptions, shard: Shard, rounds: RoundCoordinator):
        self.directory: Optional[Path] = options.checkpoint_dir
        self.options = options
        self.discard = options.discard_damaged_state
        self.shard = shard
        self.rounds = rounds
        self.wal: Optional[WriteAheadLog] = shard.wal
        self.mark: Optional[WalMark] = None
        self.checkpoint_version = -1

    def _aside(self, paths: Iterable[Path], why: str) -> None:
        """--discard-damaged-state: move ``paths`` into ``discarded-<time>/`` and log it."""
        paths = [p for p in paths if p.exists()]
        if not paths:
            return
        target = self.directory / time.strftime("discarded-%Y%m%dT%H%M%SZ", time.gmtime())
        target.mkdir(exist_ok=True)
        for p in paths:
            shutil.move(str(p), str(target / p.name))
            log.warning("DISCARDED %s (%d bytes) to %s: %s", p.name, (target / p.name).stat().st_size,
                        target, why)

    def run(self) -> Recovered:
        """Load, check and replay; RecoveryError where that would lose acknowledged updates."""
        directory = self.directory
        if directory is None:
            return Recovered(None, -1)
        discard, wal, store = self.discard, self.wal, self.shard.store
        sweep_temp_files(directory)  # ours: we hold the directory lock
        loaded, damaged = load_checkpoints(directory)
        segments = wal.segments() if wal is not None else []
        try:
            head = wal.head() if wal is not None else None
        except RecoveryError:
            if not discard:
                raise
            self._aside([directory / WAL_HEAD], "does not parse")
            head = None
        if damaged and (loaded is None or wal is None):
            what = "; ".join(why for _, why in damaged[:3])
            if loaded is None:
                consequence = (f"none of the {len(damaged)} checkpoint(s) verifies, so the "
                               "registration, parameters and optimizer state are lost")
            else:
                consequence = (f"falling back to {loaded[0].name} would lose the updates after it "
                               "(no --wal to replay them)")
            message = f"{what}: {consequence}. {DISCARD_HINT}"
            if not discard:
                raise RecoveryError(message)
            self._aside([p for p, _ in damaged], "does not verify")
            if loaded is None:
                self._aside(segments + [directory / WAL_HEAD, directory / WAL_MARK_NAME],
                            "continues a checkpoint that does not verify")
                segments, head = [], None
        if loaded is None and wal is not None and (head is not None or segments) and not damaged:
            # Fresh: every segment empty and the head among them, written before registration
            # (by earlier versions, which opened a segment at every start). A segment with
            # records, a head naming a segment that is gone, or a head written at a checkpoint
            # means the checkpoint they continue (with the registration) was deleted.
            nonempty = [p for p in segments if p.stat().st_size]
            present = {wal.seq_of(p) for p in segments}
            if nonempty or (head is not None and (head["seq"] not in present
                                                  or head["checkpointed"])):
                message = (f"{directory} holds a write-ahead log ({len(segments)} segment(s), "
                           f"{sum(p.stat().st_size for p in segments)} bytes) but no checkpoint: the "
                           "checkpoint it continues (with the registration) was deleted. "
                           f"{DISCARD_HINT}")
                if not discard:
                    raise RecoveryError(message)
                self._aside(segments + [directory / WAL_HEAD, directory / WAL_MARK_NAME],
                            "no checkpoint to replay onto")
        if loaded is not None:
            path, meta, arrays = loaded
            if (meta.get("shard_index"), meta.get("num_shards")) != (
                    self.options.shard_index, self.options.num_shards):
                raise RecoveryError(
                    f"{path} belongs to shard {meta.get('shard_index')} of {meta.get('num_shards')}, "
                    f"this server is shard {self.options.shard_index} of {self.options.num_shards}")
            self.shard.restore(meta, arrays)
            self.rounds.restore_checkpoint(meta)
            self.checkpoint_version = store.version
            log.info("resumed from %s at version %d", path.name, store.version)
            if wal is None:
                self._refuse_unread_log(meta)
            if wal is not None:
                self._replay(meta)
                self._check_mark()
                if damaged:  # every update they held is back from the log
                    for p, why in damaged:
                        log.warning("checkpoint %s does not verify (%s); its updates were replayed "
                                    "from the write-ahead log instead", p.name, why)
                    self._aside([p for p, _ in damaged], "does not verify (replaced by the log)")
        if wal is not None and self.mark is None:
            self.mark = self._load_mark()
        return Recovered(self.mark, self.checkpoint_version)

    def _load_mark(self) -> WalMark:
        try:
            return WalMark(self.directory)
        except RecoveryError:
            if not self.discard:
                raise
            self._aside([self.directory / WAL_MARK_NAME], "does not verify")
            return WalMark(self.directory)

    def _check_mark(self) -> None:
        """Refuse a log that ends before what ``wal.mark`` says it once held: records cut off at
        a record boundary (which no checksum can see) were acknowledged."""
        self.mark = self._load_mark()
        mark = self.mark.read()
        if mark is None:
            return
        version = self.shard.store.version
        present = {self.wal.seq_of(p): p for p in self.wal.segments()}
        segment = present.get(mark["seq"])
        size = segment.stat().st_size if segment is not None else None
        short = segment is not None and size < mark["end"]
        gone = segment is None and mark["seq"] > max(present, default=-1)
        if not (short or gone or version < mark["version"]):
            return
        where = (f"{segment.name} has {size} bytes, the mark {mark['end']}" if segment is not None
                 else f"segment {mark['seq']} is missing")
        message = (f"the write-ahead log ends at version {version} but "
                   f"{self.mark.path} recorded version {mark['version']} ({where}): acknowledged "
                   f"records were removed from the end of the log. {DISCARD_HINT}")
        if not self.discard:
            raise RecoveryError(message)
        log.warning("DISCARDING: %s", message)

    def _refuse_unread_log(self, meta: dict) -> None:
        """A server restarted without --wal over a log that holds updates after the checkpoint
        would silently drop them."""
        directory = self.directory
        start = int(meta.get("wal_segment", 0))
        pending = [p for p in directory.iterdir() if WAL_RE.match(p.name)
                   and WriteAheadLog.seq_of(p) >= start and p.stat().st_size]
        if not pending:
            return
        message = (f"{directory} holds a write-ahead log with updates after the checkpoint "
                   f"({', '.join(sorted(p.name for p in pending)[:3])}) but this server runs without "
                   "--wal, which would drop them: restart with --wal, or with "
                   "--discard-damaged-state to discard them")
        if not self.discard:
            raise RecoveryError(message)
        self._aside(pending, "write-ahead log ignored (no --wal)")

    def _replay(self, meta: dict) -> None:
        """Re-apply the log after the checkpoint: updates in order, staged pushes of the round
        still open held again."""
        wal, discard, store = self.wal, self.discard, self.shard.store
        segments = wal.segments()
        start = meta.get("wal_segment")
        if start is None:  # written without --wal: replay whatever continues it
            later = [p for p in segments if wal.first_version_of(p) >= store.version]
            if not later:
                return
            start = wal.seq_of(later[0])
        try:
            chain = wal.chain(int(start))
        except RecoveryError as err:
            if not discard:
                raise
            present = {wal.seq_of(p): p for p in segments}
            chain, seq = [], int(start)
            while seq in present:
                chain.append(present[seq])
                seq += 1
            log.warning("DISCARDING: %s", err)
            self._aside([p for p in segments if wal.seq_of(p) > int(start) and p not in chain],
                        "after a missing segment")
        replayed = 0
        try:
            for path, record in wal.read(chain):
                if record.kind == "stage":
                    if record.version_before == store.version:
                        grads = None if record.meta.get("skipped") else record.grads
                        self.rounds.restore_stage(record.meta.get("worker", ""),
                                                  record.request_ids[0], grads)
                    continue
                if record.version_before != store.version:
                    raise RecoveryError(
                        f"write-ahead log {path}: the next update is for version "
                        f"{record.version_before}, the state is at version {store.version}: the "
                        f"updates in between are missing. {DISCARD_HINT}")
                round_ = store.version
                self.shard.replay(record.grads, record.request_ids)
                if "members" in record.meta:
                    self.rounds.restore_round(round_, Decision(dict(record.meta["members"]),
                                                               frozenset(record.meta.get("skipped", ()))))
                replayed += 1
        except RecoveryError as err:
            if not discard:
                raise
            damage = getattr(err, "damage", None)
            log.warning("DISCARDING: %s", err)
            rest = chain[chain.index(damage.path) + 1:] if damage is not None else []
            if damage is not None:
                wal.cut(damage.path, damage.offset, "--discard-damaged-state: " + damage.reason)
            self._aside(rest, "after a damaged record")
        if replayed:
            log.info("replayed %d write-ahead log records, now at version %d",
                     replayed, store.version)
