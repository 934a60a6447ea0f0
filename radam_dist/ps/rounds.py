"""Sync rounds: the two-phase protocol that makes every shard apply the same rounds from the
same workers, or none (docs/PS.md, "Sync rounds across shards").

The phases, as ``RoundCoordinator`` names them (the client's ``SyncRound`` in client.py takes
the same steps from the other side):

1. **stage** -- a worker holds its push for round r on every shard (durably with --wal);
   nothing is applied.
2. **commit** -- the worker asks shard 0, the coordinator, to commit. Once ``num_workers``
   distinct workers have staged everywhere, shard 0 decides the round: the decision names
   each member's staged push, and it is applied and logged on shard 0 before any worker hears
   of it.
3. **apply** -- the workers deliver the decision to the other shards (``ApplyRound``,
   idempotent), which apply only what shard 0 signed (``DecisionSigner``).
4. **abandon** -- a round not complete ``sync_timeout`` seconds after a worker asked to commit
   is abandoned: nothing is applied on any shard.

A one-shot ``Push`` in sync mode is stage + commit on a single shard.

Shard 0 alone decides; workers carry the decision to the other shards, so those must be able
to tell a decision of shard 0 from one a worker made up: shard 0 signs it with HMAC-SHA256
under a key that only the job's servers hold (``--server-key-file``), and the others apply
only what verifies.

Light to import (no TensorFlow): the CLI reads the server key from here before the slow imports.
"""

from __future__ import annotations

import collections
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import (TYPE_CHECKING, Callable, Collection, Dict, FrozenSet, Iterable, Iterator, List,
                    NamedTuple, Optional, Sequence, Tuple)

from radam_dist.ps.errors import PSError, name_list
from radam_dist.ps.pushes import Gradient, PushResult, average

if TYPE_CHECKING:  # (types only: the shard's module imports TensorFlow)
    from radam_dist.ps.metrics import PSMetrics
    from radam_dist.ps.options import ServeOptions
    from radam_dist.ps.shard import Shard
    from radam_dist.ps.tensors import ByteBudget, TensorAssembler

log = logging.getLogger(__name__)
# The coordinator's lines keep the logger they always had (jsonlog's "logger" field).
service_log = logging.getLogger("radam_dist.ps.service")

DECISIONS_KEPT = 10_000  # outcomes of this many past rounds can be queried (and are checkpointed)
STAGINGS_PER_WORKER = 8  # staged pushes one worker may hold in one round

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


@dataclass
class Staged:
    """A push held for its round."""

    request_id: str
    grads: Optional[Dict[str, Gradient]]  # None: skipped (non-finite)
    charged: int = 0  # bytes held in the in-flight budget until the push is applied or dropped


@dataclass
class Ready:
    """Shard 0: a worker that staged everywhere and asked to commit, this round."""

    request_id: str
    context: object  # the waiting CommitRound call (None: restored, no caller)
    skipped: bool = False  # the worker's push was not finite on some shard


class Outcome(NamedTuple):
    """A round as shard 0 answers CommitRound: committed (with the signed decision) or pending
    (with the workers ready so far)."""

    committed: bool
    round: int
    members: Dict[str, str]
    skipped: FrozenSet[str]
    version: int
    step: int
    mac: bytes = b""


class RoundCoordinator:
    """One shard's side of the sync rounds: stage, commit (shard 0), apply (the others),
    abandon. Owns the staged pushes, the workers ready on shard 0, the decisions kept for
    queries and the job's worker ids.

    Takes the shard's Condition (``shard.cond``), not a lock of its own: applying a round
    changes the store, the log and the request-id table together with the staged pushes; a
    commit waits on that Condition until the round is decided or abandoned; and a checkpoint
    copies the staged pushes into its new log segment at the instant it exports the store.
    """

    def __init__(self, options: "ServeOptions", shard: "Shard", budget: "ByteBudget",
                 metrics: "PSMetrics"):
        self.options = options
        self.shard = shard
        self.cond = shard.cond
        self.budget = budget
        self.metrics = metrics
        self.signer = DecisionSigner(options.server_key if options.num_shards > 1 else None)
        self.workers = SyncWorkers(options.num_workers, options.sync_timeout)
        self._staged: Dict[Tuple[str, str], Staged] = {}  # (worker, request id) -> push
        self._ready: Dict[str, Ready] = {}  # shard 0: workers staged everywhere, this round
        self._decisions: "collections.OrderedDict[int, Decision]" = collections.OrderedDict()
        self._generation = 0  # bumped when a round is decided or abandoned
        self._abandoned: Dict[int, str] = {}  # generation -> why the round was abandoned

    # -- checks ---------------------------------------------------------------------------------
    def check_push_header(self, job_id: str, worker: str) -> None:
        """Refusals a push's header alone decides, before any tensor is read: another job's
        push, and in sync mode a stage from a worker that is not one of the job's K."""
        with self.cond:
            self.shard.check_job(job_id)
            if self.options.mode == "sync" and worker:
                self.workers.check(worker, self._ready)

    def _check_round_locked(self, round_: int) -> None:
        version = self.shard.store.version
        if round_ < version:
            raise PSError("ABORTED",
                          f"sync round {round_} is already applied (server at version {version}); "
                          "pull and recompute")
        if round_ > version and self.options.shard_index == 0:
            # Rounds are numbered by shard 0's version, so only a coordinator that lost
            # acknowledged rounds can see one from its future.
            raise self.shard.data_loss(f"sync round {round_} named, but the coordinator (shard 0) "
                                       f"is at round {version}")
        if round_ > version:
            raise PSError("FAILED_PRECONDITION",
                          f"shard behind: gradients for round {round_}, but shard "
                          f"{self.options.shard_index} is at round {version} (the outcome of round "
                          f"{version} has not reached it yet; PSClient delivers it and retries)")

    def _only_coordinator(self) -> None:
        if self.options.mode != "sync":
            raise PSError("FAILED_PRECONDITION", "sync rounds on an async server")
        if self.options.shard_index != 0:
            raise PSError("FAILED_PRECONDITION",
                          f"shard 0 coordinates sync rounds; this is shard {self.options.shard_index}")

    # -- phase 1: stage ---------------------------------------------------------------------------
    def stage(self, worker: str, round_: int, request_id: str,
              grads: Optional[Dict[str, Gradient]],
              assembler: Optional["TensorAssembler"] = None) -> PushResult:
        """Hold a push for its round (durably with --wal); nothing is applied. Only the job's K
        workers may (SyncWorkers); the push's bytes stay in the in-flight budget."""
        if not worker:
            raise PSError("INVALID_ARGUMENT", "sync mode needs a worker_id in every push")
        if not request_id:
            raise PSError("INVALID_ARGUMENT", "sync mode needs a request_id in every push")
        with self.cond:
            self._check_round_locked(round_)
            self.workers.check(worker, self._ready)
            key = (worker, request_id)
            if key not in self._staged:
                if self.shard.wal is not None:  # first: a failed write changes nothing
                    self.shard.wal_append(round_, [request_id], grads or {}, kind="stage",
                                          worker=worker, skipped=grads is None)
                # A worker re-stages after each abandoned attempt; keep its newest few. (The one
                # shard 0 holds as ready for a decision is never dropped there; a worker's older
                # push can only be in a decision until its newer one is committed.)
                ready = self._ready.get(worker)
                mine = [k for k in self._staged if k[0] == worker
                        and (ready is None or k[1] != ready.request_id)]
                while len(mine) >= STAGINGS_PER_WORKER:
                    dropped = mine.pop(0)
                    self._drop_staged(dropped)
                    service_log.info("round %d: dropped worker %s's older staged push %s", round_,
                                     worker, dropped[1])
                self.workers.admit(worker, self._ready)
                staged = Staged(request_id, grads)
                if grads is not None and assembler is not None:  # its reservation goes with it
                    staged.charged, assembler.reserved = assembler.reserved, 0
                self._hold_staged(key, staged)
            else:
                self.workers.admit(worker, self._ready)  # a retry: still active
            return PushResult(self.shard.store.version, self.shard.store.step,
                              skipped=grads is None, staged=True)

    def push_one_shot(self, worker: str, round_: int, request_id: str,
                      grads: Optional[Dict[str, Gradient]], context,
                      assembler: Optional["TensorAssembler"] = None) -> PushResult:
        """A sync ``Push`` without ``stage``: stage and commit on the only shard."""
        if self.options.num_shards > 1:
            raise PSError(
                "FAILED_PRECONDITION",
                f"sync mode over {self.options.num_shards} shards needs the two-phase protocol "
                "(stage on every shard, CommitRound on shard 0, ApplyRound on the others; "
                "PSClient does this): a one-shot push could be applied on some shards only")
        request_id = request_id or f"anonymous-{uuid.uuid4().hex}"
        self.stage(worker, round_, request_id, grads, assembler)
        outcome = self.commit(round_, worker, request_id, context)
        return PushResult(outcome.version, outcome.step, skipped=grads is None)

    # -- phase 2: commit (shard 0) ----------------------------------------------------------------
    def commit(self, round_: int, worker: str, request_id: str, context,
               skipped: bool = False) -> Outcome:
        """Wait until round_ is decided (this worker in it: COMMITTED) or abandoned (ABORTED,
        DEADLINE_EXCEEDED); the ``num_workers``-th ready worker decides it."""
        opts = self.options
        with self.cond:
            self._only_coordinator()
            if not worker or not request_id:
                raise PSError("INVALID_ARGUMENT", "CommitRound needs worker_id and request_id")
            if round_ < self.shard.store.version:
                return self._committed_or_not(round_, worker, request_id)
            self._check_round_locked(round_)
            if (worker, request_id) not in self._staged:
                raise PSError("FAILED_PRECONDITION",
                              f"push {request_id!r} of worker {worker!r} is not staged on shard 0 for "
                              f"round {round_} (lost in a restart without --wal?); stage it again")
            earlier = self._ready.get(worker)
            if earlier is not None and earlier.request_id != request_id:
                alive = earlier.context is not None and earlier.context.is_active()
                if alive:
                    raise PSError(
                        "ALREADY_EXISTS",
                        f"worker id {worker!r} is already in round {round_} with push "
                        f"{earlier.request_id!r} from a call that is still waiting; two processes "
                        "share this worker id (worker ids must be unique per process)")
                service_log.info("round %d: worker %s replaced (push %s instead of %s from a call "
                                 "that went away)", round_, worker, request_id, earlier.request_id)
            self._ready[worker] = Ready(request_id, context, skipped)
            generation = self._generation
            if len(self._ready) >= opts.num_workers:
                self._decide_locked(round_)
            deadline = time.monotonic() + opts.sync_timeout
            while self._generation == generation:
                left = deadline - time.monotonic()
                if left <= 0:
                    have = sorted(self._ready)
                    reason = (f"sync round {round_} timed out after {opts.sync_timeout:g}s: "
                              f"{len(have)} of {opts.num_workers} workers pushed ({', '.join(have[:10])}"
                              f"{', ...' if len(have) > 10 else ''}); the others never came. Nothing "
                              "was applied on any shard; pull and push again")
                    self._abandon_locked(reason)
                    self.metrics.sync_round_timeouts.inc()
                    raise PSError("DEADLINE_EXCEEDED", reason)
                self.cond.wait(left)
            if self.shard.store.version > round_:
                return self._committed_or_not(round_, worker, request_id)
            raise PSError("ABORTED", self._abandoned.get(generation + 1, "the sync round was abandoned"))

    def outcome(self, round_: int) -> Outcome:
        """CommitRound with query_only: the decision of a past round (signed), or PENDING."""
        with self.cond:
            self._only_coordinator()
            store = self.shard.store
            if round_ >= store.version:
                return Outcome(False, round_, {w: r.request_id for w, r in self._ready.items()},
                               frozenset(), store.version, store.step)
            decision = self._decisions.get(round_)
            if decision is None:
                raise PSError("FAILED_PRECONDITION",
                              f"the outcome of round {round_} is no longer kept (the last "
                              f"{DECISIONS_KEPT} rounds are)")
            mac = self.signer.sign(store.job_id, self.options.num_shards, round_, decision)
            return Outcome(True, round_, decision.members, decision.skipped, store.version,
                           store.step, mac)

    def _committed_or_not(self, round_: int, worker: str, request_id: str) -> Outcome:
        """After round_ is decided: COMMITTED for a member, ABORTED (precisely) for others."""
        outcome = self.outcome(round_)
        members = outcome.members
        if members.get(worker) == request_id:
            return outcome
        if worker in members:
            raise PSError("ABORTED",
                          f"round {round_} was committed with another push of worker {worker!r} "
                          f"(request {members[worker]!r}, not {request_id!r}); pull and recompute")
        raise PSError("ABORTED", f"round {round_} was committed without worker {worker!r} (members "
                                 f"{name_list(sorted(members))}); pull and recompute")

    def _decide_locked(self, round_: int) -> None:
        """Decide round_ with the ready workers: one non-finite decision for every shard (a
        member skipped here or, by its own word, on another shard is left out everywhere)."""
        members = {w: r.request_id for w, r in sorted(self._ready.items())}
        skipped = frozenset(w for w, r in self._ready.items()
                            if r.skipped or ((w, r.request_id) in self._staged
                                             and self._staged[(w, r.request_id)].grads is None))
        try:
            self._apply_locked(round_, Decision(members, skipped))
            self.metrics.round_members_skipped.inc(len(skipped))
        except PSError as err:  # e.g. the log write failed: nothing applied, tell every waiter
            self._abandon_locked(f"sync round {round_} could not be applied: {err.message}")
            raise

    # -- phase 3: apply (shards other than 0) ------------------------------------------------------
    def apply(self, job_id: str, round_: int, members: Sequence[Tuple[str, str, bool]],
              mac: bytes) -> PushResult:
        """ApplyRound: apply the round shard 0 decided (``members``: (worker, request id,
        skipped)) once its signature verifies; a round already applied is a duplicate."""
        decision = Decision({w: r for w, r, _ in members},
                            frozenset(w for w, _, skipped in members if skipped))
        with self.cond:
            if self.options.mode != "sync":
                raise PSError("FAILED_PRECONDITION", "sync rounds on an async server")
            self.shard.check_job(job_id)
            if self.options.shard_index == 0:
                raise PSError("FAILED_PRECONDITION",
                              "shard 0 decides rounds itself (CommitRound); ApplyRound is for the others")
            if len(decision.members) != len(members) or len(members) != self.options.num_workers:
                raise PSError("INVALID_ARGUMENT",
                              f"a round has {self.options.num_workers} distinct members, got "
                              f"{len(members)}")
            store = self.shard.store
            self.signer.check(mac, store.job_id, self.options.num_shards, round_, decision)
            version = store.version
            if round_ < version:
                known = self._decisions.get(round_)
                if known is not None and known != decision:
                    raise PSError("FAILED_PRECONDITION",
                                  f"round {round_} was applied here with other members")
                return PushResult(version, store.step, duplicate=True)
            if round_ > version:
                raise PSError("FAILED_PRECONDITION",
                              f"shard behind: round {round_}, but this shard is at round "
                              f"{version}; deliver the rounds in between first")
            self._apply_locked(round_, decision)
            return PushResult(self.shard.store.version, self.shard.store.step)

    def _apply_locked(self, round_: int, decision: Decision) -> None:
        """Apply the mean of the decided members' staged pushes, log it, start the next round."""
        members = decision.members
        missing = sorted(w for w, rid in members.items() if (w, rid) not in self._staged)
        if missing:
            raise self.shard.data_loss(
                f"round {round_}: shard {self.options.shard_index} does not hold the staged pushes "
                f"of {name_list(missing)}, which it acknowledged (lost in a restart without "
                "--wal?), so it cannot apply the round")
        staged = {w: self._staged[(w, members[w])] for w in sorted(members)}
        disagree = sorted(w for w, st in staged.items() if st.grads is None and w not in decision.skipped)
        if disagree:  # only a client that hid its skip can cause this; the mean stays finite
            service_log.error("round %d: the decision keeps %s, whose push here was not finite; "
                              "left out on this shard only", round_, name_list(disagree))
        contributions = [st for w, st in staged.items()
                         if st.grads is not None and w not in decision.skipped]
        merged = average(c.grads for c in contributions)
        request_ids = [members[w] for w in sorted(members)]
        self.shard.apply_locked(merged, request_ids, members=members, skipped=sorted(decision.skipped))
        self.shard.counted(len(contributions), len(staged) - len(contributions))
        self.record_decision(round_, decision)
        self._clear_staged()
        self._ready.clear()
        self._generation += 1
        self.cond.notify_all()

    # -- phase 4: abandon -------------------------------------------------------------------------
    def _abandon_locked(self, reason: str) -> None:
        """Nothing of the round is applied anywhere; every waiting commit hears ``reason``."""
        self._ready.clear()
        self._generation += 1
        self._abandoned[self._generation] = reason
        for old in [g for g in self._abandoned if g < self._generation - 100]:
            del self._abandoned[old]
        self.cond.notify_all()

    # -- staged pushes ----------------------------------------------------------------------------
    def _hold_staged(self, key: Tuple[str, str], staged: Staged) -> None:
        """Keep a staged push; its bytes stay in the in-flight budget until it goes."""
        if not staged.charged and staged.grads:
            staged.charged = sum(g.nbytes for g in staged.grads.values())
            self.budget.hold(staged.charged)
        self._staged[key] = staged

    def _drop_staged(self, key: Tuple[str, str]) -> None:
        staged = self._staged.pop(key)
        self.budget.release(staged.charged)

    def _clear_staged(self) -> None:
        for key in list(self._staged):
            self._drop_staged(key)

    def ready_workers(self) -> List[str]:
        """Shard 0: the workers waiting in the current round."""
        with self.cond:
            return sorted(self._ready)

    # -- durable state: checkpoints and recovery --------------------------------------------------
    def record_decision(self, round_: int, decision: Decision) -> None:
        """Keep round_'s decision for queries and re-deliveries (the newest DECISIONS_KEPT)."""
        self._decisions[round_] = decision
        while len(self._decisions) > DECISIONS_KEPT:
            self._decisions.popitem(last=False)

    def checkpoint_facts(self) -> dict:
        """What a checkpoint keeps of the rounds (cond held)."""
        return dict(decisions=[[r, *d.to_json()] for r, d in
                               list(self._decisions.items())[-DECISIONS_KEPT:]],
                    workers=self.workers.ids())

    def staged_pushes(self) -> Iterator[Tuple[str, str, Optional[Dict[str, Gradient]]]]:
        """(worker, request id, gradients or None) of each staged push (cond held): a new log
        segment starts with them, so that they outlive the segment they were logged in."""
        for (worker, rid), staged in self._staged.items():
            yield worker, rid, staged.grads

    def restore_checkpoint(self, meta: dict) -> None:
        """The decisions and worker ids of a checkpoint (at start, before any call)."""
        for round_, *decision in meta.get("decisions", []):
            self.record_decision(int(round_), Decision.from_json(
                decision[0] if len(decision) == 1 else decision))
        self.workers.restore(meta.get("workers", []))

    def restore_stage(self, worker: str, request_id: str,
                      grads: Optional[Dict[str, Gradient]]) -> None:
        """A stage record replayed from the log: held again, as ``stage`` keeps them."""
        self._hold_staged((worker, request_id), Staged(request_id, grads))
        self.workers.restore([worker])
        mine = [k for k in self._staged if k[0] == worker]
        for dropped in mine[:-STAGINGS_PER_WORKER]:
            self._drop_staged(dropped)

    def restore_round(self, round_: int, decision: Decision) -> None:
        """A round's update replayed from the log: decided, and its staged pushes gone."""
        self.record_decision(round_, decision)
        self._clear_staged()
