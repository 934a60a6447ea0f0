"""Sync rounds: the coordinator's decisions, signed, and the job's fixed set of workers.

A decision (which workers' staged pushes make round r, and which of them are left out of the
mean because their gradient was not finite on some shard) is taken by shard 0 alone. Workers
carry it to the other shards, so the other shards must be able to tell a decision of shard 0
from one a worker made up: shard 0 signs it with HMAC-SHA256 under a key that only the job's
servers hold (``--server-key-file``), and the others apply only what verifies.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Collection, Dict, FrozenSet, Iterable, List, Optional

from radam_dist.ps.errors import PSError

log = logging.getLogger(__name__)

SERVER_KEY_ENV = "RADAM_PS_SERVER_KEY"


@dataclass(frozen=True)
class Decision:
    """Round r's members (worker id -> the request id of its staged push) and the members left
    out of the mean on every shard (non-finite gradient somewhere, ``--nonfinite skip``)."""

    members: Dict[str, str]
    skipped: FrozenSet[str] = field(default_factory=frozenset)

    def to_json(self) -> list:
        return [dict(self.members), sorted(self.skipped)]

    @classmethod
    def from_json(cls, item) -> "Decision":
        """From ``to_json`` or the older form, a bare members dict."""
        if isinstance(item, dict):
            return cls(dict(item))
        members, skipped = item
        return cls(dict(members), frozenset(skipped))


class DecisionSigner:
    """Signs and checks decisions with the key the job's servers share (None: one shard, where
    no decision ever travels, so there is nothing to sign)."""

    def __init__(self, key: Optional[bytes]):
        self._key = key

    @property
    def enabled(self) -> bool:
        return self._key is not None

    @staticmethod
    def _message(job_id: str, num_shards: int, round_: int, decision: Decision) -> bytes:
        body = {"v": 1, "job": job_id, "shards": num_shards, "round": round_,
                "members": [[w, r, w in decision.skipped] for w, r in sorted(decision.members.items())]}
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    def sign(self, job_id: str, num_shards: int, round_: int, decision: Decision) -> bytes:
        if self._key is None:
            return b""
        return hmac.new(self._key, self._message(job_id, num_shards, round_, decision),
                        "sha256").digest()

    def check(self, mac: bytes, job_id: str, num_shards: int, round_: int, decision: Decision) -> None:
        """PERMISSION_DENIED unless ``mac`` is shard 0's signature of exactly this decision."""
        if self._key is None:
            raise PSError("FAILED_PRECONDITION",
                          "this server has no --server-key-file, so it cannot check that a round "
                          "was decided by shard 0; ApplyRound is refused")
        expected = self.sign(job_id, num_shards, round_, decision)
        if not mac or not hmac.compare_digest(bytes(mac), expected):
            raise PSError("PERMISSION_DENIED",
                          f"ApplyRound for round {round_} is not a decision of this job's "
                          "coordinator (its decision_mac is missing or does not verify under "
                          "--server-key-file): nothing applied. Deliver the members and "
                          "decision_mac exactly as CommitRound on shard 0 returned them")


def load_server_key(path: Optional[str], env: Dict[str, str]) -> Optional[bytes]:
    """The server-to-server key from ``path`` or ``$RADAM_PS_SERVER_KEY`` (stripped), or None."""
    if path:
        with open(path, "rb") as f:
            key = f.read().strip()
        if not key:
            raise ValueError(f"--server-key-file {path} is empty")
        return key
    key = env.get(SERVER_KEY_ENV, "").strip()
    return key.encode() if key else None


class SyncWorkers:
    """The job's K worker ids in sync mode: the first K distinct ids that stage.

    A sync round takes K distinct workers, so a (K+1)-th id can only be a made-up one or a
    replacement of a worker that went away; it is admitted only in place of one that has not
    staged for longer than ``idle_after`` seconds (--sync-timeout: every round in that time was
    abandoned anyway) and is not waiting in a round. Any other is refused before it can hold
    anything, so strangers cannot fill a shard's memory with staged pushes."""

    def __init__(self, k: int, idle_after: float, clock: Callable[[], float] = time.monotonic):
        self.k, self.idle_after, self._clock = k, idle_after, clock
        self._last: Dict[str, float] = {}  # worker id -> when it last staged

    def ids(self) -> List[str]:
        return sorted(self._last)

    def restore(self, ids: Iterable[str]) -> None:
        now = self._clock()
        for worker in ids:
            if worker not in self._last and len(self._last) < self.k:
                self._last[worker] = now

    def _replaceable(self, busy: Collection[str], now: float) -> Optional[str]:
        idle = [w for w, t in self._last.items() if now - t > self.idle_after and w not in busy]
        return min(idle, key=self._last.__getitem__) if idle else None

    def check(self, worker: str, busy: Collection[str] = ()) -> None:
        """FAILED_PRECONDITION unless ``admit(worker)`` would succeed now."""
        if worker in self._last or len(self._last) < self.k:
            return
        if self._replaceable(busy, self._clock()) is not None:
            return
        raise PSError(
            "FAILED_PRECONDITION",
            f"worker {worker[:100]!r} is not one of this sync job's {self.k} workers "
            f"({', '.join(w[:40] for w in self.ids()[:10])}), which all staged within the last "
            f"{self.idle_after:g}s (--sync-timeout); a sync job has a fixed set of worker ids: "
            "a restarted worker must keep its worker_id")

    def admit(self, worker: str, busy: Collection[str] = ()) -> None:
        self.check(worker, busy)
        now = self._clock()
        if worker not in self._last and len(self._last) >= self.k:
            gone = self._replaceable(busy, now)
            log.warning("sync workers: %r takes the place of %r, which has not staged for %.0fs",
                        worker, gone, now - self._last[gone])
            del self._last[gone]
        self._last[worker] = now
