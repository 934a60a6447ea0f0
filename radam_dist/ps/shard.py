"""The state every call of one shard shares, and the calls that need nothing else: register,
pull, async push.

The state: the variables and optimizer (``ParameterStore``), the placement, the table of
applied request ids (a retried push is applied once), the write-ahead log that every update is
appended to before it is applied, and the fail-stop flag.

One Condition, ``Shard.cond``, guards all of it, and the round coordinator (rounds.py) and the
checkpointer (checkpointer.py) take the same one: an update changes the store, the log and the
request-id table together; a sync round must change them together with the round's staged
pushes; and a checkpoint must see all of them, and start its log segment, at one instant.
Every request is checked completely before the Condition is taken to change anything, so a
refused request leaves the state exactly as it was.
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from radam_dist.ps.errors import PSError
from radam_dist.ps.pushes import Gradient, PushResult
from radam_dist.ps.metrics import PSMetrics
from radam_dist.ps.options import ServeOptions
from radam_dist.ps.storage import WalBrokenError, WriteAheadLog
from radam_dist.ps.store import ParameterStore, VariableSpec

# The logger these lines always had (the "logger" field of the JSON log lines).
log = logging.getLogger("radam_dist.ps.service")

DEDUP_CAPACITY = 100_000  # request ids remembered (a checkpoint keeps the newest 10,000)
DEDUP_CHECKPOINTED = 10_000


class Shard:
    """One shard's parameters, optimizer and bookkeeping; ``cond`` guards every field."""

    def __init__(self, options: ServeOptions, metrics: PSMetrics, wal: Optional[WriteAheadLog]):
        self.options = options
        self.metrics = metrics
        self.cond = threading.Condition()
        self.store = ParameterStore()  # replaced (under cond) by the first registration
        self.placement: dict = {}
        self.wal = wal
        self._dedup: "collections.OrderedDict[str, int]" = collections.OrderedDict()
        self.pushes_applied = 0
        self.pushes_refused = 0
        self.pushes_skipped = 0
        self.failed: Optional[str] = None  # why the server stopped taking updates (fail-stop)
        self.on_fail_stop: Optional[Callable[[str], None]] = None  # the server: health NOT_SERVING

    # -- request ids ----------------------------------------------------------------------------
    def remember(self, request_id: str, version: int) -> None:
        if not request_id:
            return
        self._dedup[request_id] = version
        self._dedup.move_to_end(request_id)
        while len(self._dedup) > DEDUP_CAPACITY:
            self._dedup.popitem(last=False)

    def dedup_items(self) -> list:
        """The newest request ids with their versions, as a checkpoint keeps them."""
        return list(self._dedup.items())[-DEDUP_CHECKPOINTED:]

    # -- checks -----------------------------------------------------------------------------------
    def check_job(self, job_id: str) -> None:
        """Every call names its job: one registered under another id is refused."""
        if self.store.registered and job_id != self.store.job_id:
            raise PSError("FAILED_PRECONDITION",
                          f"this server holds job {self.store.job_id[:100]!r}; the call names job "
                          f"{job_id[:100]!r} (PSClient(job_id=...) must be the job's id); nothing "
                          "changed")

    def data_loss(self, message: str) -> PSError:
        """The caller saw updates this server no longer has: never stale-and-continue."""
        log.error("DATA LOSS: %s", message)
        self.metrics.data_loss.inc()
        return PSError("DATA_LOSS", message + ": this server lost acknowledged updates (restored "
                                              "from an older state); stop the job and restore it")

    # -- updates (cond held) ----------------------------------------------------------------------
    def wal_append(self, version_before: int, request_ids: List[str], grads: Dict[str, Gradient],
                   **extra) -> None:
        """Append to the log before anything changes; a write error refuses the push (nothing
        applied, nothing acknowledged). A log that could not be brought back to a record
        boundary is broken: the server stops serving (fail-stop) and a restart recovers."""
        try:
            with self.metrics.wal_fsync_seconds.time():
                self.wal.append(version_before, request_ids, grads, **extra)
        except WalBrokenError as err:
            self.fail_stop(str(err))
            raise PSError("INTERNAL", f"write-ahead log broken, this server stopped serving: {err}; "
                                      "restart it (recovery reads the directory)") from err
        except OSError as err:
            raise PSError("UNAVAILABLE",
                          f"write-ahead log write failed ({err.strerror or err}); the update was not "
                          "applied nor acknowledged and the log was truncated back; retry later") from err

    def fail_stop(self, reason: str) -> None:
        if self.failed is None:
            self.failed = reason
            log.error("FAIL-STOP: %s; health is NOT_SERVING, every update is refused until a "
                      "restart", reason)
            if self.on_fail_stop is not None:
                self.on_fail_stop(reason)

    def apply_locked(self, grads: Dict[str, Gradient], request_ids: List[str], **extra) -> None:
        """Log, then apply one update (an async push or a sync round's mean)."""
        if self.wal is not None:
            self.wal_append(self.store.version, request_ids, grads, **extra)
        with self.metrics.apply_seconds.time():
            self.store.apply(grads)
        for rid in request_ids:
            self.remember(rid, self.store.version)

    def counted(self, applied: int, skipped: int) -> None:
        """A sync round's members: applied, or left out as not finite (cond held)."""
        self.pushes_applied += applied
        self.pushes_skipped += skipped

    def count_refused(self) -> None:
        with self.cond:
            self.pushes_refused += 1

    # -- recovery (before any call, no lock needed) ------------------------------------------------
    def restore(self, meta: dict, arrays: Dict[str, np.ndarray]) -> None:
        """The state of a checkpoint (``Checkpointer.export_locked``'s ``meta``)."""
        self.store.import_state(meta, arrays)
        self.placement = meta.get("placement", {})
        for rid, version in meta.get("dedup", []):
            self.remember(rid, version)

    def replay(self, grads: Dict[str, Gradient], request_ids: List[str]) -> None:
        """An update read back from the log (already logged: not appended again)."""
        self.store.apply(grads)
        for rid in request_ids:
            self.remember(rid, self.store.version)

    # -- Register ---------------------------------------------------------------------------------
    def register(self, config_json: str, specs: Sequence[VariableSpec], values: Dict[str, np.ndarray],
                 job_id: str, placement: dict,
                 persist: Callable[[ParameterStore, dict], None]) -> Tuple[bool, int, int, List[str]]:
        """(created, version, step, names). The first registration becomes this shard's state
        only once ``persist`` (its checkpoint and log segment) returns: durable before visible."""
        with self.cond:
            canonical = self.store.check_registration(config_json, specs, job_id)
            created = not self.store.registered
            if created:
                store = ParameterStore()
                store.create(canonical, specs, values, job_id)
                persist(store, placement)  # the lock is held: no call sees the store before
                self.store, self.placement = store, placement
                log.info("registered %d variables (%d parameters), optimizer %s",
                         len(specs), self.store.num_parameters, canonical)
            return created, self.store.version, self.store.step, self.store.names

    # -- Pull ---------------------------------------------------------------------------------------
    def pull(self, job_id: str, names: Sequence[str], if_newer_than: int
             ) -> Tuple[dict, List[str], Dict[str, np.ndarray]]:
        """(PullHeader fields, names, a snapshot of their values; none when not modified)."""
        with self.cond:
            self.check_job(job_id)
            names = self.store.check_names(list(names))
            version, step = self.store.version, self.store.step
            if if_newer_than > version:
                raise self.data_loss(f"a pull for values newer than version {if_newer_than}, but "
                                     f"this server is at version {version}")
            if if_newer_than >= 0 and version <= if_newer_than:
                return dict(version=version, step=step, not_modified=True), [], {}
            return dict(version=version, step=step), names, self.store.read(names)

    def check_names(self, names: Sequence[str]) -> List[str]:
        with self.cond:
            return self.store.check_names(list(names))

    def snapshot(self, names: Sequence[str]) -> Tuple[List[str], Dict[str, np.ndarray], int, int]:
        """(names, values, version, step) at one instant (PushPull's answer)."""
        with self.cond:
            names = self.store.check_names(list(names))
            return names, self.store.read(names), self.store.version, self.store.step

    # -- Push ---------------------------------------------------------------------------------------
    def check_registered(self) -> None:
        with self.cond:
            if not self.store.registered:
                raise PSError("FAILED_PRECONDITION", "push before registration: call Register first")

    def check_push(self, request_id: str, grads: Dict[str, Gradient], known_finite: Dict[str, bool]
                   ) -> Tuple[Optional[PushResult], bool]:
        """(the answer to a request id applied before, or None; whether the gradients are all
        finite). Raises PSError for gradients that do not fit the variables."""
        with self.cond:
            if request_id and request_id in self._dedup:
                return PushResult(self._dedup[request_id], self.store.step, duplicate=True), True
            return None, self.store.check_gradients(grads, self.options.nonfinite, known_finite)

    def push_async(self, base_version: int, request_id: str,
                   grads: Optional[Dict[str, Gradient]]) -> PushResult:
        """Apply on arrival unless computed from a version more than --max-staleness old."""
        with self.cond:
            version = self.store.version
            if base_version > version:
                raise self.data_loss(f"gradients computed at version {base_version}, but "
                                     f"this server is at version {version}")
            staleness = version - base_version
            self.metrics.staleness.observe(staleness)
            limit = self.options.max_staleness
            if 0 <= limit < staleness:
                raise PSError("ABORTED",
                              f"stale gradients: computed at version {base_version}, server at "
                              f"{version}, staleness {staleness} > --max-staleness {limit}; pull and "
                              "recompute")
            if grads is None:
                self.pushes_skipped += 1
                return PushResult(version, self.store.step, skipped=True)
            if not grads:
                return PushResult(version, self.store.step)
            self.apply_locked(grads, [request_id])
            self.pushes_applied += 1
            return PushResult(self.store.version, self.store.step)

    # -- Stats --------------------------------------------------------------------------------------
    def stats(self, job_id: str) -> dict:
        """The StatsResponse fields this object knows, at one instant."""
        with self.cond:
            self.check_job(job_id)
            s, o = self.store, self.options
            return dict(mode=o.mode, shard_index=o.shard_index, num_shards=o.num_shards,
                        version=s.version, step=s.step, num_parameters=s.num_parameters,
                        variables=list(s.specs.values()), pushes_applied=self.pushes_applied,
                        pushes_refused=self.pushes_refused, pushes_skipped=self.pushes_skipped,
                        optimizer_config_json=s.config_json or "",
                        wal_enabled=self.wal is not None, num_workers=o.num_workers,
                        max_staleness=o.max_staleness)
