"""The ParameterServer gRPC service of one shard: sync rounds, async pushes, durability.

One lock (a Condition) guards the store; every request is validated completely before it
takes the lock to change anything, so a refused request leaves the state exactly as it was.

Sync mode runs rounds in two phases so that every shard applies the same rounds from the
same workers or none does (docs/PS.md, "Sync rounds across shards"): a worker *stages* its
push for round r on every shard (nothing is applied), then asks shard 0, the coordinator, to
*commit*. Shard 0 commits the round once ``num_workers`` distinct workers have staged
everywhere -- the decision, naming each member's staged push, is applied and logged on shard 0
before any worker hears of it -- and the workers deliver it to the other shards
(``ApplyRound``, idempotent), which apply only what shard 0 signed (``rounds.DecisionSigner``). A round not complete ``sync_timeout`` seconds after a worker
asked to commit is abandoned: nothing is applied on any shard. A one-shot ``Push`` in sync
mode is the same protocol on a single shard.

Async mode: each push is applied on arrival unless its gradients were computed from a version
more than ``max_staleness`` updates old (ABORTED: pull and recompute).
"""

from __future__ import annotations

import collections
import json
import logging
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import grpc
import numpy as np

from radam_dist._files import remove_quietly
from radam_dist.ps import durability
from radam_dist.ps.admission import IdleStreams
from radam_dist.ps.errors import PSError
from radam_dist.ps.metrics import PSMetrics
from radam_dist.ps.proto import pb, pb_grpc
from radam_dist.ps.rounds import Decision, DecisionSigner, SyncWorkers
from radam_dist.ps.store import Gradient, ParameterStore, VariableSpec, name_list
from radam_dist.ps.tensors import (DEFAULT_CHUNK_BYTES, BufferPool, ByteBudget, TensorAssembler,
                                   TimedStream, WireError, reuse_freed_memory, serialized_chunks,
                                   split_message)

log = logging.getLogger(__name__)

_DEDUP_CAPACITY = 100_000
_DECISIONS_KEPT = 10_000  # sync: outcomes of this many past rounds can be queried
_STAGINGS_PER_WORKER = 8  # sync: staged pushes one worker may hold in one round
MAX_MESSAGE_CHARS = 2000  # longest status message sent (names are listed with a count)


@dataclass
class ServeOptions:
    mode: str = "async"  # "sync" | "async"
    num_workers: int = 1  # sync: gradients per round
    sync_timeout: float = 60.0
    max_staleness: int = 16  # async; -1: unlimited
    shard_index: int = 0
    num_shards: int = 1
    nonfinite: str = "reject"  # "reject" | "skip"
    max_request_bytes: int = 1 << 31
    max_inflight_bytes: int = 4 << 30  # all calls together (RESOURCE_EXHAUSTED beyond)
    checkpoint_dir: Optional[Path] = None
    checkpoint_interval: float = 0.0  # seconds; 0: only on request / SIGTERM
    keep_checkpoints: int = 2
    wal: bool = False
    discard_damaged_state: bool = False
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    # gradient receive buffers kept for reuse once idle (tensors.BufferPool); 0: fresh each push
    receive_buffer_bytes: int = 1 << 30
    # sync over several shards: the key the job's servers share (rounds.DecisionSigner)
    server_key: Optional[bytes] = None
    stream_idle_timeout: float = 30.0  # seconds a client stream may send nothing; 0: no limit
    wal_mark_interval: float = 1.0  # seconds between wal.mark writes (the server's timer)


@dataclass
class _Staged:
    request_id: str
    grads: Optional[Dict[str, Gradient]]  # None: skipped (non-finite)
    charged: int = 0  # bytes held in the in-flight budget until the push is applied or dropped


@dataclass
class _Ready:
    request_id: str
    context: object  # the waiting CommitRound call (None: restored, no caller)
    skipped: bool = False  # the worker's push was not finite on some shard


@dataclass
class _Counters:
    pushes_applied: int = 0
    pushes_refused: int = 0
    pushes_skipped: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    last_checkpoint_version: int = -1
    started: float = field(default_factory=time.monotonic)


def _bounded(message: str) -> str:
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return message[:MAX_MESSAGE_CHARS] + f"... ({len(message)} characters in all)"


def _who(err: PSError, header) -> PSError:
    """The refusal with the caller's worker and request id appended: the metrics interceptor
    logs every refused call once with its method, code, peer and this message (never a token)."""
    if header is None or not (header.worker_id or header.request_id):
        return err
    return PSError(err.code, f"{_bounded(err.message)} [worker {header.worker_id[:100]!r}, "
                             f"request {header.request_id[:100]!r}]")


def _abort(context, err: PSError):
    context.abort(getattr(grpc.StatusCode, err.code), _bounded(err.message))


def _unavailable_on_disk_error(err: OSError, what: str) -> PSError:
    return PSError("UNAVAILABLE", f"{what} failed ({err.strerror or err}); nothing changed, "
                                  "retry once the checkpoint directory has room")


class ShardService(pb_grpc.ParameterServerServicer):
    """Holds one shard's variables and optimizer state and serves the v1 API."""

    def __init__(self, options: ServeOptions):
        if options.mode not in ("sync", "async"):
            raise ValueError(f"mode must be 'sync' or 'async', got {options.mode!r}")
        if options.wal and options.checkpoint_dir is None:
            raise ValueError("--wal needs --checkpoint-dir (the log is replayed on a checkpoint)")
        if options.mode == "sync" and options.num_shards > 1 and not options.server_key:
            raise ValueError(
                f"sync mode over {options.num_shards} shards needs --server-key-file (or "
                "$RADAM_PS_SERVER_KEY): a secret all shards of the job share and no worker holds, "
                "with which shard 0 signs its round decisions; generate one with python -c "
                "'import secrets; print(secrets.token_urlsafe(32))'")
        self.options = options
        reuse_freed_memory()  # chunk buffers: no page fault per 4 KiB (tensors.py says why)
        self.store = ParameterStore()
        self.placement: dict = {}
        self._cond = threading.Condition()
        self._checkpoint_lock = threading.Lock()
        self._dedup: "collections.OrderedDict[str, int]" = collections.OrderedDict()
        # sync: the current round's staged pushes, (worker, request id) -> gradients
        self._staged: Dict[Tuple[str, str], _Staged] = {}
        self._ready: Dict[str, _Ready] = {}  # shard 0: workers staged everywhere, this round
        self._decisions: "collections.OrderedDict[int, Decision]" = collections.OrderedDict()
        self.signer = DecisionSigner(options.server_key if options.num_shards > 1 else None)
        self.workers = SyncWorkers(options.num_workers, options.sync_timeout)
        self._generation = 0  # sync: bumped when a round is committed or abandoned
        self._abandoned: Dict[int, str] = {}  # generation -> why the round was abandoned
        self.counters = _Counters()
        self.failed: Optional[str] = None  # why the server stopped taking updates (fail-stop)
        self.on_fail_stop = None  # called with the reason (the server sets health NOT_SERVING)
        self.budget = ByteBudget(options.max_inflight_bytes)
        # Pushes decode into buffers of earlier pushes that nothing refers to any more (no page
        # faults on 400 MB of fresh memory per push); Register keeps fresh memory (its arrays
        # become the variables).
        self.receive_pool = BufferPool(options.receive_buffer_bytes)
        self.metrics = PSMetrics(lambda: (self.store.version, self.store.step), options)
        self.metrics.inflight_bytes.set_function(lambda: float(self.budget.used))
        self.idle_streams = IdleStreams(options.stream_idle_timeout,
                                        self.metrics.streams_idle_cancelled)
        self.lock = (durability.DirectoryLock(options.checkpoint_dir)
                     if options.checkpoint_dir is not None else None)
        self.wal = durability.WriteAheadLog(options.checkpoint_dir) if options.wal else None
        self.mark: Optional[durability.WalMark] = None
        try:
            self._recover()
        except BaseException:
            self.close()
            raise

    # -- recovery ---------------------------------------------------------------------------
    def _aside(self, paths: Iterable[Path], why: str) -> None:
        """--discard-damaged-state: move ``paths`` into ``discarded-<time>/`` and log it."""
        paths = [p for p in paths if p.exists()]
        if not paths:
            return
        target = self.options.checkpoint_dir / time.strftime("discarded-%Y%m%dT%H%M%SZ", time.gmtime())
        target.mkdir(exist_ok=True)
        for p in paths:
            shutil.move(str(p), str(target / p.name))
            log.warning("DISCARDED %s (%d bytes) to %s: %s", p.name, (target / p.name).stat().st_size,
                        target, why)

    def _recover(self) -> None:
        directory = self.options.checkpoint_dir
        if directory is None:
            return
        discard = self.options.discard_damaged_state
        durability.sweep_temp_files(directory)  # ours: we hold the directory lock
        loaded, damaged = durability.load_checkpoints(directory)
        segments = self.wal.segments() if self.wal is not None else []
        try:
            head = self.wal.head() if self.wal is not None else None
        except durability.RecoveryError:
            if not discard:
                raise
            self._aside([directory / durability.WAL_HEAD], "does not parse")
            head = None
        if damaged and (loaded is None or self.wal is None):
            what = "; ".join(why for _, why in damaged[:3])
            if loaded is None:
                consequence = (f"none of the {len(damaged)} checkpoint(s) verifies, so the "
                               "registration, parameters and optimizer state are lost")
            else:
                consequence = (f"falling back to {loaded[0].name} would lose the updates after it "
                               "(no --wal to replay them)")
            message = f"{what}: {consequence}. {durability.DISCARD_HINT}"
            if not discard:
                raise durability.RecoveryError(message)
            self._aside([p for p, _ in damaged], "does not verify")
            if loaded is None:
                self._aside(segments + [directory / durability.WAL_HEAD,
                                        directory / durability.WAL_MARK_NAME],
                            "continues a checkpoint that does not verify")
                segments, head = [], None
        if loaded is None and self.wal is not None and (head is not None or segments) and not damaged:
            # Fresh: every segment empty and the head among them, written before registration
            # (by earlier versions, which opened a segment at every start). A segment with
            # records, a head naming a segment that is gone, or a head written at a checkpoint
            # means the checkpoint they continue (with the registration) was deleted.
            nonempty = [p for p in segments if p.stat().st_size]
            present = {self.wal.seq_of(p) for p in segments}
            if nonempty or (head is not None and (head["seq"] not in present
                                                  or head["checkpointed"])):
                message = (f"{directory} holds a write-ahead log ({len(segments)} segment(s), "
                           f"{sum(p.stat().st_size for p in segments)} bytes) but no checkpoint: the "
                           "checkpoint it continues (with the registration) was deleted. "
                           f"{durability.DISCARD_HINT}")
                if not discard:
                    raise durability.RecoveryError(message)
                self._aside(segments + [directory / durability.WAL_HEAD,
                                        directory / durability.WAL_MARK_NAME],
                            "no checkpoint to replay onto")
        if loaded is not None:
            path, meta, arrays = loaded
            if (meta.get("shard_index"), meta.get("num_shards")) != (
                    self.options.shard_index, self.options.num_shards):
                raise durability.RecoveryError(
                    f"{path} belongs to shard {meta.get('shard_index')} of {meta.get('num_shards')}, "
                    f"this server is shard {self.options.shard_index} of {self.options.num_shards}")
            self.store.import_state(meta, arrays)
            self.placement = meta.get("placement", {})
            for rid, version in meta.get("dedup", []):
                self._remember(rid, version)
            for round_, *decision in meta.get("decisions", []):
                self._decide(int(round_), Decision.from_json(
                    decision[0] if len(decision) == 1 else decision))
            self.workers.restore(meta.get("workers", []))
            self.counters.last_checkpoint_version = self.store.version
            log.info("resumed from %s at version %d", path.name, self.store.version)
            if self.wal is None:
                self._refuse_unread_log(meta)
            if self.wal is not None:
                self._replay(meta)
                self._check_mark()
                if damaged:  # every update they held is back from the log
                    for p, why in damaged:
                        log.warning("checkpoint %s does not verify (%s); its updates were replayed "
                                    "from the write-ahead log instead", p.name, why)
                    self._aside([p for p, _ in damaged], "does not verify (replaced by the log)")
        if self.wal is not None and self.mark is None:
            self.mark = self._load_mark()
        if self.wal is not None and self.store.registered:
            self.save_checkpoint()  # starts a new segment that this checkpoint names
            self.write_wal_mark()
        # (Unregistered: no segment yet; Register's checkpoint starts the one it names, so
        # restarts before registration leave nothing that could look like lost state.)

    def _load_mark(self) -> "durability.WalMark":
        directory = self.options.checkpoint_dir
        try:
            return durability.WalMark(directory)
        except durability.RecoveryError:
            if not self.options.discard_damaged_state:
                raise
            self._aside([directory / durability.WAL_MARK_NAME], "does not verify")
            return durability.WalMark(directory)

    def _check_mark(self) -> None:
        """Refuse a log that ends before what ``wal.mark`` says it once held: records cut off at
        a record boundary (which no checksum can see) were acknowledged."""
        self.mark = self._load_mark()
        mark = self.mark.read()
        if mark is None:
            return
        present = {self.wal.seq_of(p): p for p in self.wal.segments()}
        segment = present.get(mark["seq"])
        size = segment.stat().st_size if segment is not None else None
        short = segment is not None and size < mark["end"]
        gone = segment is None and mark["seq"] > max(present, default=-1)
        if not (short or gone or self.store.version < mark["version"]):
            return
        where = (f"{segment.name} has {size} bytes, the mark {mark['end']}" if segment is not None
                 else f"segment {mark['seq']} is missing")
        message = (f"the write-ahead log ends at version {self.store.version} but "
                   f"{self.mark.path} recorded version {mark['version']} ({where}): acknowledged "
                   f"records were removed from the end of the log. {durability.DISCARD_HINT}")
        if not self.options.discard_damaged_state:
            raise durability.RecoveryError(message)
        log.warning("DISCARDING: %s", message)

    def write_wal_mark(self) -> bool:
        """fsync (segment, end, version) of the newest acknowledged record into ``wal.mark``
        (the server calls this every --wal-mark-interval). Only what is durable is recorded."""
        if self.mark is None or self.wal is None or self.failed is not None:
            return False
        with self._cond:
            if self.wal.path is None:
                return False
            seq, end, version = self.wal.seq, self.wal.end, self.store.version
        return self.mark.write(seq, end, version)

    def _refuse_unread_log(self, meta: dict) -> None:
        """A server restarted without --wal over a log that holds updates after the checkpoint
        would silently drop them."""
        directory = self.options.checkpoint_dir
        start = int(meta.get("wal_segment", 0))
        pending = [p for p in directory.iterdir() if durability.WAL_RE.match(p.name)
                   and durability.WriteAheadLog.seq_of(p) >= start and p.stat().st_size]
        if not pending:
            return
        message = (f"{directory} holds a write-ahead log with updates after the checkpoint "
                   f"({', '.join(sorted(p.name for p in pending)[:3])}) but this server runs without "
                   "--wal, which would drop them: restart with --wal, or with "
                   "--discard-damaged-state to discard them")
        if not self.options.discard_damaged_state:
            raise durability.RecoveryError(message)
        self._aside(pending, "write-ahead log ignored (no --wal)")

    def _replay(self, meta: dict) -> None:
        wal, discard = self.wal, self.options.discard_damaged_state
        segments = wal.segments()
        start = meta.get("wal_segment")
        if start is None:  # written without --wal: replay whatever continues it
            later = [p for p in segments if wal.first_version_of(p) >= self.store.version]
            if not later:
                return
            start = wal.seq_of(later[0])
        try:
            chain = wal.chain(int(start))
        except durability.RecoveryError as err:
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
                    if record.version_before == self.store.version:
                        worker = record.meta.get("worker", "")
                        grads = None if record.meta.get("skipped") else record.grads
                        self._hold_staged((worker, record.request_ids[0]),
                                          _Staged(record.request_ids[0], grads))
                        self.workers.restore([worker])
                        mine = [k for k in self._staged if k[0] == worker]
                        for dropped in mine[:-_STAGINGS_PER_WORKER]:  # as _stage keeps them
                            self._drop_staged(dropped)
                    continue
                if record.version_before != self.store.version:
                    raise durability.RecoveryError(
                        f"write-ahead log {path}: the next update is for version "
                        f"{record.version_before}, the state is at version {self.store.version}: the "
                        f"updates in between are missing. {durability.DISCARD_HINT}")
                round_ = self.store.version
                self.store.apply(record.grads)
                for rid in record.request_ids:
                    self._remember(rid, self.store.version)
                if "members" in record.meta:
                    self._decide(round_, Decision(dict(record.meta["members"]),
                                                  frozenset(record.meta.get("skipped", ()))))
                    self._clear_staged()
                replayed += 1
        except durability.RecoveryError as err:
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
                     replayed, self.store.version)

    # -- helpers ----------------------------------------------------------------------------
    def _remember(self, request_id: str, version: int) -> None:
        if not request_id:
            return
        self._dedup[request_id] = version
        self._dedup.move_to_end(request_id)
        while len(self._dedup) > _DEDUP_CAPACITY:
            self._dedup.popitem(last=False)

    def _decide(self, round_: int, decision: Decision) -> None:
        self._decisions[round_] = decision
        while len(self._decisions) > _DECISIONS_KEPT:
            self._decisions.popitem(last=False)

    def _hold_staged(self, key: Tuple[str, str], staged: _Staged) -> None:
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

    def _check_job(self, job_id: str) -> None:
        """Every call names its job: one registered under another id is refused."""
        if self.store.registered and job_id != self.store.job_id:
            raise PSError("FAILED_PRECONDITION",
                          f"this server holds job {self.store.job_id[:100]!r}; the call names job "
                          f"{job_id[:100]!r} (PSClient(job_id=...) must be the job's id); nothing "
                          "changed")

    def _data_loss(self, message: str) -> PSError:
        """The caller saw updates this server no longer has: never stale-and-continue."""
        log.error("DATA LOSS: %s", message)
        self.metrics.data_loss.inc()
        return PSError("DATA_LOSS", message + ": this server lost acknowledged updates (restored "
                                              "from an older state); stop the job and restore it")

    def _expect_push(self, name: str, role: int, dtype: str, shape: Tuple[int, ...]) -> None:
        """Refuse a declared gradient that does not fit the registered variable (before any
        buffer is allocated for it)."""
        spec = self.store.specs.get(name)
        if spec is None:
            raise WireError(f"gradient for unknown variable(s) {name_list([name])}", code="NOT_FOUND")
        if role == pb.SPARSE_INDICES:
            if dtype not in ("int32", "int64") or len(shape) != 1:
                raise WireError(f"sparse gradient of {name!r}: indices must be a 1-d int32/int64 "
                                f"array, got {dtype} of shape {shape}")
            return
        if dtype != spec.dtype:
            raise WireError(f"gradient of {name!r} has dtype {dtype}, the variable is {spec.dtype}")
        if role == pb.GRADIENT and tuple(shape) != tuple(spec.shape):
            raise WireError(f"gradient of {name!r} has shape {tuple(shape)}, the variable has "
                            f"{tuple(spec.shape)}")
        if role == pb.SPARSE_VALUES and (not spec.shape or tuple(shape[1:]) != tuple(spec.shape[1:])):
            raise WireError(f"sparse gradient of {name!r}: values have shape {tuple(shape)}, rows of "
                            f"the variable have shape {tuple(spec.shape[1:])}")

    def _expect_register(self, name: str, role: int, dtype: str, shape: Tuple[int, ...]) -> None:
        if not self.store.registered:
            return  # the first registration defines the variables (bounded by the budget)
        spec = self.store.specs.get(name)
        if spec is None or spec.dtype != dtype or tuple(spec.shape) != tuple(shape):
            raise WireError(
                f"the variables differ from the registered ones: {name!r} {dtype}{list(shape)} is "
                "not registered" + ("" if spec is None else f" (registered: {spec.dtype}{list(spec.shape)})"),
                code="FAILED_PRECONDITION")

    def _receive(self, request_iterator, header_field: str, roles: frozenset, context, expect=None,
                 split: Optional[dict] = None, pool: Optional[BufferPool] = None,
                 on_header=None, method: str = ""):
        """Read a client stream: (header, {(name, role): array}, assembler). Raises PSError;
        the caller releases ``assembler`` (its reservation in the in-flight budget).

        The messages are the raw bytes gRPC received (``add_to_server`` registers no
        deserializer for the tensor streams): ``split_message`` cuts out the data, which is
        copied once, straight into the tensor. (Messages already parsed work too.) ``split``
        collects seconds spent waiting for the wire ("wire_in") and decoding ("decode");
        ``pool``: where the tensors' buffers come from (fresh memory without); ``on_header``
        checks the header before any tensor is read (a refusal then costs nothing). A stream
        that sends nothing for --stream-idle-timeout is cancelled (admission.IdleStreams)."""
        header = None
        assembler = TensorAssembler(self.options.max_request_bytes, roles, expect, self.budget,
                                    check_finite=True, pool=pool)
        wrap = pb.RegisterRequest if header_field == "RegisterHeader" else pb.PushRequest
        received = 0
        decoded = 0.0
        watched = self.idle_streams.watch(request_iterator, context, method or header_field)
        messages = TimedStream(watched)
        try:
            first = True
            for message in messages:
                start = time.perf_counter()
                if isinstance(message, (bytes, bytearray, memoryview)):
                    kind, message_header, chunk, data = split_message(pb, wrap, message)
                else:
                    kind = message.WhichOneof("kind")
                    message_header = message.header if kind == "header" else None
                    chunk, data = (message.chunk, None) if kind == "chunk" else (None, None)
                if first:
                    first = False
                    if kind != "header":
                        raise PSError("INVALID_ARGUMENT", f"the first message must be the {header_field}")
                    header = message_header
                    if on_header is not None:
                        on_header(header)
                    continue
                if kind != "chunk":
                    raise PSError("INVALID_ARGUMENT", "only one header per stream")
                received += assembler.add(chunk, data)
                decoded += time.perf_counter() - start
            if split is not None:
                split["wire_in"], split["decode"] = messages.waited, decoded
            if header is None:
                raise PSError("INVALID_ARGUMENT", f"empty stream: no {header_field}")
            tensors = assembler.finish()
        except WireError as err:
            assembler.release()
            refusal = PSError(err.code, str(err))
            refusal.header = header  # who sent it, for the log line
            raise refusal from err
        except grpc.RpcError as err:  # the client went away mid-stream (or was cut off idle)
            assembler.release()
            refusal = PSError("CANCELLED", f"stream interrupted: {err}")
            refusal.header = header  # who it was, for the log line
            raise refusal from err
        except PSError as err:
            assembler.release()
            err.header = header
            raise
        except BaseException:
            assembler.release()
            raise
        finally:
            watched.close()
        with self._cond:
            self.counters.bytes_received += received
        return header, tensors, assembler

    @staticmethod
    def _gradients(tensors) -> Dict[str, Gradient]:
        grads: Dict[str, Gradient] = {}
        names = {name for name, _ in tensors}
        for name in sorted(names):
            dense = tensors.get((name, pb.GRADIENT))
            values = tensors.get((name, pb.SPARSE_VALUES))
            indices = tensors.get((name, pb.SPARSE_INDICES))
            if dense is not None and (values is not None or indices is not None):
                raise PSError("INVALID_ARGUMENT", f"variable {name!r}: both a dense and a sparse gradient")
            if dense is not None:
                grads[name] = Gradient(dense)
            elif values is None or indices is None:
                raise PSError("INVALID_ARGUMENT",
                              f"variable {name!r}: a sparse gradient needs both values and indices")
            else:
                grads[name] = Gradient(values, indices)
        return grads

    def _stream_values(self, header_kwargs: dict, names: List[str], values: Dict[str, np.ndarray],
                       split: Optional[dict] = None):
        """Serialized PullResponses: the header, then the chunks of each value, built by
        ``serialized_chunks`` (one copy of the data; gRPC sends bytes as they are, see
        ``add_to_server``). ``split`` gets the seconds spent encoding ("encode")."""
        clock = time.perf_counter
        t0 = clock()
        encode = 0.0
        yield pb.PullResponse(header=pb.PullHeader(**header_kwargs)).SerializeToString()
        sent = 0
        for name in names:
            chunks = serialized_chunks(pb, name, pb.VALUE, values[name], pb.PullResponse,
                                       self.options.chunk_bytes)
            while True:
                t = clock()
                raw = next(chunks, None)
                encode += clock() - t
                if raw is None:
                    break
                yield raw
            sent += values[name].nbytes
        # Let go of the snapshot now: while a view of a variable lives, the next step must copy
        # the variable's buffer before updating it (copy-on-write).
        values.clear()
        with self._cond:
            self.counters.bytes_sent += sent
        if split is not None:
            split["encode"], split["wire_out"] = encode, clock() - t0 - encode

    # -- Register ---------------------------------------------------------------------------
    def Register(self, request_iterator, context):
        assembler = None
        try:
            header, tensors, assembler = self._receive(request_iterator, "RegisterHeader",
                                                       frozenset({pb.VALUE}), context,
                                                       self._expect_register)
            return self._register(header, tensors)
        except PSError as err:
            _abort(context, err)
        finally:
            if assembler is not None:
                assembler.release()

    def _register(self, header, tensors) -> "pb.RegisterResponse":
        opts = self.options
        if (header.num_shards or 1, header.shard_index) != (opts.num_shards, opts.shard_index):
            raise PSError(
                "FAILED_PRECONDITION",
                f"the client believes this is shard {header.shard_index} of {header.num_shards or 1}; "
                f"it is shard {opts.shard_index} of {opts.num_shards} (check the order of the targets)")
        try:
            placement = json.loads(header.placement_json) if header.placement_json else {}
        except json.JSONDecodeError as err:
            raise PSError("INVALID_ARGUMENT", f"placement_json is not JSON: {err}") from err
        if not isinstance(placement, dict):
            raise PSError("INVALID_ARGUMENT", "placement_json must be a JSON object")
        values = {name: array for (name, _), array in tensors.items()}
        specs = []
        for name in sorted(values):
            array = values[name]
            where = placement.get(name, {})
            try:
                specs.append(VariableSpec(name, array.dtype.name, tuple(array.shape),
                                          int(where.get("row_start", 0)),
                                          int(where.get("total_rows", array.shape[0] if array.ndim else 0))))
            except (TypeError, ValueError, AttributeError) as err:
                raise PSError("INVALID_ARGUMENT", f"placement of {name!r} is malformed: {err}") from err
            if array.size and array.dtype.kind == "f" and not np.isfinite(array).all():
                raise PSError("INVALID_ARGUMENT", f"initial value of {name!r} holds NaN or Inf")
        with self._cond:
            canonical = self.store.check_registration(header.optimizer_config_json, specs, header.job_id)
            created = not self.store.registered
            if created:
                store = ParameterStore()
                store.create(canonical, specs, values, header.job_id)
                if opts.checkpoint_dir is not None:
                    # Durable before visible: the registration becomes this server's state only
                    # once its checkpoint (and the log segment that continues it) is on disk; the
                    # lock is held, so no call sees it before.
                    self._write_registration(store, placement)
                    self.counters.last_checkpoint_version = 0
                self.store, self.placement = store, placement
                log.info("registered %d variables (%d parameters), optimizer %s",
                         len(specs), self.store.num_parameters, canonical)
            return pb.RegisterResponse(created=created, version=self.store.version,
                                       step=self.store.step, names=self.store.names)

    def _write_registration(self, store: ParameterStore, placement: dict) -> None:
        """The first checkpoint, then the first log segment; on a write error nothing of either
        stays on disk and the registration is refused with UNAVAILABLE."""
        opts = self.options
        meta, arrays = store.export_state()
        meta.update(self._checkpoint_facts(placement))
        if self.wal is not None:
            meta["wal_segment"] = self.wal.next_seq()
        try:
            path, _ = durability.write_checkpoint(opts.checkpoint_dir, meta, arrays,
                                                  opts.keep_checkpoints)
        except OSError as err:
            raise _unavailable_on_disk_error(err, "writing the registration's checkpoint") from err
        if self.wal is None:
            return
        try:
            self.wal.start_segment(store.version)
        except OSError as err:
            remove_quietly(path)  # a checkpoint naming a segment that does not exist would be refused
            raise _unavailable_on_disk_error(err, "starting the write-ahead log") from err
        assert self.wal.seq == meta["wal_segment"]

    # -- Pull -------------------------------------------------------------------------------
    def Pull(self, request, context):
        try:
            with self._cond:
                self._check_job(request.job_id)
                names = self.store.check_names(list(request.names))
                version, step = self.store.version, self.store.step
                if request.if_newer_than > version:
                    raise self._data_loss(f"a pull for values newer than version "
                                          f"{request.if_newer_than}, but this server is at "
                                          f"version {version}")
                if request.if_newer_than >= 0 and version <= request.if_newer_than:
                    values, names = {}, []
                    header = dict(version=version, step=step, not_modified=True)
                else:
                    values = self.store.read(names)
                    header = dict(version=version, step=step)
        except PSError as err:
            _abort(context, err)
        yield from self._stream_values(header, names, values)

    # -- Push -------------------------------------------------------------------------------
    _PUSH_ROLES = frozenset({pb.GRADIENT, pb.SPARSE_VALUES, pb.SPARSE_INDICES})

    def _receive_push(self, request_iterator, context, split: Optional[dict] = None,
                      method: str = "Push"):
        with self._cond:
            if not self.store.registered:
                raise PSError("FAILED_PRECONDITION", "push before registration: call Register first")
        return self._receive(request_iterator, "PushHeader", self._PUSH_ROLES, context,
                             self._expect_push, split, self.receive_pool, self._check_push_header,
                             method)

    def _check_push_header(self, header) -> None:
        """Refusals a header alone decides, before any tensor is read: another job's push, and
        in sync mode a stage from a worker that is not one of the job's K."""
        with self._cond:
            self._check_job(header.job_id)
            if self.options.mode == "sync" and header.worker_id:
                self.workers.check(header.worker_id, self._ready)

    def Push(self, request_iterator, context):
        assembler = header = None
        try:
            header, tensors, assembler = self._receive_push(request_iterator, context)
            version, step, skipped, duplicate, staged = self._push(header, tensors, context,
                                                                   finite=assembler.finite(),
                                                                   assembler=assembler)
            return pb.PushResponse(version=version, step=step, skipped=skipped, duplicate=duplicate,
                                   staged=staged)
        except PSError as err:
            self._refused(context, err, header)
        finally:
            if assembler is not None:
                assembler.release()

    SPLIT = ("wire_in", "decode", "validate", "apply", "snapshot", "encode", "wire_out")

    def PushPull(self, request_iterator, context):
        assembler = header = None
        split: Dict[str, float] = {}
        try:
            header, tensors, assembler = self._receive_push(request_iterator, context, split,
                                                            "PushPull")
            with self._cond:
                self.store.check_names(list(header.pull_names))
            version, step, skipped, duplicate, _ = self._push(header, tensors, context, split,
                                                              assembler.finite(), assembler)
            t = time.perf_counter()
            with self._cond:
                names = self.store.check_names(list(header.pull_names))
                values = self.store.read(names)
                version, step = self.store.version, self.store.step
            split["snapshot"] = time.perf_counter() - t
            del tensors  # the gradients are applied: free them before streaming the values
        except PSError as err:
            self._refused(context, err, header)
        finally:
            if assembler is not None:
                assembler.release()
        yield from self._stream_values(
            dict(version=version, step=step, skipped=skipped, duplicate=duplicate), names, values,
            split)
        # Where a call's time went (bench/ps_throughput.py reads these with --log-level DEBUG):
        # wire_in = waiting for the upload, wire_out = streaming the values minus encoding them;
        # apply includes the write-ahead log (and, in sync mode, waiting for the round).
        log.debug("PushPull split ms: " + " ".join(f"{k} {1e3 * split.get(k, 0.0):.1f}"
                                                   for k in self.SPLIT))

    def _push(self, header, tensors, context, split: Optional[dict] = None,
              finite: Optional[dict] = None, assembler: Optional[TensorAssembler] = None
              ) -> Tuple[int, int, bool, bool, bool]:
        """Validate, then apply / stage. ``finite``: TensorAssembler.finite() of ``tensors``
        (checked on arrival); ``split`` gets the seconds of "validate" and "apply"; a staged
        push takes over ``assembler``'s reservation in the in-flight budget."""
        t0 = time.perf_counter()
        grads = self._gradients(tensors)
        known = {name: ok for (name, role), ok in (finite or {}).items()
                 if role in (pb.GRADIENT, pb.SPARSE_VALUES)}
        with self._cond:
            if header.request_id and header.request_id in self._dedup:
                return self._dedup[header.request_id], self.store.step, False, True, False
            finite = self.store.check_gradients(grads, self.options.nonfinite, known)
        grads = grads if finite else None
        t1 = time.perf_counter()
        try:
            return self._push_validated(header, grads, context, assembler)
        finally:
            if split is not None:
                split["validate"], split["apply"] = t1 - t0, time.perf_counter() - t1

    def _push_validated(self, header, grads, context, assembler=None
                        ) -> Tuple[int, int, bool, bool, bool]:
        if self.options.mode == "async":
            if header.stage:
                raise PSError("FAILED_PRECONDITION", "stage=true is for sync mode; this server is async")
            return self._push_async(header, grads) + (False,)
        if header.stage:
            return self._stage(header.worker_id, header.base_version, header.request_id,
                               grads, assembler) + (True,)
        if self.options.num_shards > 1:
            raise PSError(
                "FAILED_PRECONDITION",
                f"sync mode over {self.options.num_shards} shards needs the two-phase protocol "
                "(stage on every shard, CommitRound on shard 0, ApplyRound on the others; "
                "PSClient does this): a one-shot push could be applied on some shards only")
        request_id = header.request_id or f"anonymous-{uuid.uuid4().hex}"
        self._stage(header.worker_id, header.base_version, request_id, grads, assembler)
        response = self._commit(header.base_version, header.worker_id, request_id, context)
        with self._cond:
            return response.version, response.step, grads is None, False, False

    def _refused(self, context, err: PSError, header=None):
        with self._cond:
            self.counters.pushes_refused += 1
        _abort(context, _who(err, header if header is not None else getattr(err, "header", None)))

    def _push_async(self, header, grads) -> Tuple[int, int, bool, bool]:
        with self._cond:
            version = self.store.version
            if header.base_version > version:
                raise self._data_loss(f"gradients computed at version {header.base_version}, but "
                                      f"this server is at version {version}")
            staleness = version - header.base_version
            self.metrics.staleness.observe(staleness)
            limit = self.options.max_staleness
            if 0 <= limit < staleness:
                raise PSError("ABORTED",
                              f"stale gradients: computed at version {header.base_version}, server at "
                              f"{version}, staleness {staleness} > --max-staleness {limit}; pull and "
                              "recompute")
            if grads is None:
                self.counters.pushes_skipped += 1
                return version, self.store.step, True, False
            if not grads:
                return version, self.store.step, False, False
            self._apply_locked(grads, [header.request_id])
            self.counters.pushes_applied += 1
            return self.store.version, self.store.step, False, False

    # -- sync rounds: stage, commit (shard 0), apply -------------------------------------------
    def _check_round_locked(self, round_: int) -> None:
        version = self.store.version
        if round_ < version:
            raise PSError("ABORTED",
                          f"sync round {round_} is already applied (server at version {version}); "
                          "pull and recompute")
        if round_ > version and self.options.shard_index == 0:
            # Rounds are numbered by shard 0's version, so only a coordinator that lost
            # acknowledged rounds can see one from its future.
            raise self._data_loss(f"sync round {round_} named, but the coordinator (shard 0) is "
                                  f"at round {version}")
        if round_ > version:
            raise PSError("FAILED_PRECONDITION",
                          f"shard behind: gradients for round {round_}, but shard "
                          f"{self.options.shard_index} is at round {version} (the outcome of round "
                          f"{version} has not reached it yet; PSClient delivers it and retries)")

    def _stage(self, worker: str, round_: int, request_id: str, grads,
               assembler: Optional[TensorAssembler] = None) -> Tuple[int, int, bool, bool]:
        """Hold a push for its round (durably with --wal); nothing is applied. Only the job's K
        workers may (rounds.SyncWorkers); the push's bytes stay in the in-flight budget."""
        if not worker:
            raise PSError("INVALID_ARGUMENT", "sync mode needs a worker_id in every push")
        if not request_id:
            raise PSError("INVALID_ARGUMENT", "sync mode needs a request_id in every push")
        with self._cond:
            self._check_round_locked(round_)
            self.workers.check(worker, self._ready)
            key = (worker, request_id)
            if key not in self._staged:
                if self.wal is not None:  # first: a failed write changes nothing
                    self._wal_append(round_, [request_id], grads or {}, kind="stage",
                                     worker=worker, skipped=grads is None)
                # A worker re-stages after each abandoned attempt; keep its newest few. (The one
                # shard 0 holds as ready for a decision is never dropped there; a worker's older
                # push can only be in a decision until its newer one is committed.)
                ready = self._ready.get(worker)
                mine = [k for k in self._staged if k[0] == worker
                        and (ready is None or k[1] != ready.request_id)]
                while len(mine) >= _STAGINGS_PER_WORKER:
                    dropped = mine.pop(0)
                    self._drop_staged(dropped)
                    log.info("round %d: dropped worker %s's older staged push %s", round_, worker,
                             dropped[1])
                self.workers.admit(worker, self._ready)
                staged = _Staged(request_id, grads)
                if grads is not None and assembler is not None:  # its reservation goes with it
                    staged.charged, assembler.reserved = assembler.reserved, 0
                self._hold_staged(key, staged)
            else:
                self.workers.admit(worker, self._ready)  # a retry: still active
            return self.store.version, self.store.step, grads is None, False

    def CommitRound(self, request, context):
        try:
            with self._cond:
                self._check_job(request.job_id)
            if request.query_only:
                return self._outcome(request.round)
            return self._commit(request.round, request.worker_id, request.request_id, context,
                                request.skipped)
        except PSError as err:
            _abort(context, _who(err, request))

    def _members_pb(self, members: Dict[str, str], skipped=frozenset()):
        return [pb.RoundMember(worker_id=w, request_id=r, skipped=w in skipped)
                for w, r in sorted(members.items())]

    def _outcome(self, round_: int):
        with self._cond:
            self._only_coordinator()
            if round_ >= self.store.version:
                return pb.CommitRoundResponse(
                    outcome=pb.CommitRoundResponse.PENDING, round=round_,
                    members=self._members_pb({w: r.request_id for w, r in self._ready.items()}),
                    version=self.store.version, step=self.store.step)
            decision = self._decisions.get(round_)
            if decision is None:
                raise PSError("FAILED_PRECONDITION",
                              f"the outcome of round {round_} is no longer kept (the last "
                              f"{_DECISIONS_KEPT} rounds are)")
            mac = self.signer.sign(self.store.job_id, self.options.num_shards, round_, decision)
            return pb.CommitRoundResponse(outcome=pb.CommitRoundResponse.COMMITTED, round=round_,
                                          members=self._members_pb(decision.members, decision.skipped),
                                          version=self.store.version, step=self.store.step,
                                          decision_mac=mac)

    def _only_coordinator(self) -> None:
        if self.options.mode != "sync":
            raise PSError("FAILED_PRECONDITION", "sync rounds on an async server")
        if self.options.shard_index != 0:
            raise PSError("FAILED_PRECONDITION",
                          f"shard 0 coordinates sync rounds; this is shard {self.options.shard_index}")

    def _committed_or_not(self, round_: int, worker: str, request_id: str):
        """After round_ is decided: COMMITTED for a member, ABORTED (precisely) for others."""
        response = self._outcome(round_)
        members = {m.worker_id: m.request_id for m in response.members}
        if members.get(worker) == request_id:
            return response
        if worker in members:
            raise PSError("ABORTED",
                          f"round {round_} was committed with another push of worker {worker!r} "
                          f"(request {members[worker]!r}, not {request_id!r}); pull and recompute")
        raise PSError("ABORTED", f"round {round_} was committed without worker {worker!r} (members "
                                 f"{name_list(sorted(members))}); pull and recompute")

    def _commit(self, round_: int, worker: str, request_id: str, context, skipped: bool = False):
        opts = self.options
        with self._cond:
            self._only_coordinator()
            if not worker or not request_id:
                raise PSError("INVALID_ARGUMENT", "CommitRound needs worker_id and request_id")
            if round_ < self.store.version:
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
                log.info("round %d: worker %s replaced (push %s instead of %s from a call that "
                         "went away)", round_, worker, request_id, earlier.request_id)
            self._ready[worker] = _Ready(request_id, context, skipped)
            generation = self._generation
            if len(self._ready) >= opts.num_workers:
                self._commit_locked(round_)
            deadline = time.monotonic() + opts.sync_timeout
            while self._generation == generation:
                left = deadline - time.monotonic()
                if left <= 0:
                    have = sorted(self._ready)
                    reason = (f"sync round {round_} timed out after {opts.sync_timeout:g}s: "
                              f"{len(have)} of {opts.num_workers} workers pushed ({', '.join(have[:10])}"
                              f"{', ...' if len(have) > 10 else ''}); the others never came. Nothing "
                              "was applied on any shard; pull and push again")
                    self._abandon_round_locked(reason)
                    self.metrics.sync_round_timeouts.inc()
                    raise PSError("DEADLINE_EXCEEDED", reason)
                self._cond.wait(left)
            if self.store.version > round_:
                return self._committed_or_not(round_, worker, request_id)
            reason = self._abandoned.get(generation + 1, "the sync round was abandoned")
            raise PSError("ABORTED", reason)

    def _abandon_round_locked(self, reason: str) -> None:
        self._ready.clear()
        self._generation += 1
        self._abandoned[self._generation] = reason
        for old in [g for g in self._abandoned if g < self._generation - 100]:
            del self._abandoned[old]
        self._cond.notify_all()

    def _commit_locked(self, round_: int) -> None:
        """Decide round_ with the ready workers: one non-finite decision for every shard (a
        member skipped here or, by its own word, on another shard is left out everywhere)."""
        members = {w: r.request_id for w, r in sorted(self._ready.items())}
        skipped = frozenset(w for w, r in self._ready.items()
                            if r.skipped or ((w, r.request_id) in self._staged
                                             and self._staged[(w, r.request_id)].grads is None))
        try:
            self._apply_round_locked(round_, Decision(members, skipped))
            self.metrics.round_members_skipped.inc(len(skipped))
        except PSError as err:  # e.g. the log write failed: nothing applied, tell every waiter
            self._abandon_round_locked(f"sync round {round_} could not be applied: {err.message}")
            raise

    def _apply_round_locked(self, round_: int, decision: Decision) -> None:
        members = decision.members
        missing = sorted(w for w, rid in members.items() if (w, rid) not in self._staged)
        if missing:
            raise self._data_loss(
                f"round {round_}: shard {self.options.shard_index} does not hold the staged pushes "
                f"of {name_list(missing)}, which it acknowledged (lost in a restart without "
                "--wal?), so it cannot apply the round")
        staged = {w: self._staged[(w, members[w])] for w in sorted(members)}
        disagree = sorted(w for w, st in staged.items() if st.grads is None and w not in decision.skipped)
        if disagree:  # only a client that hid its skip can cause this; the mean stays finite
            log.error("round %d: the decision keeps %s, whose push here was not finite; left out "
                      "on this shard only", round_, name_list(disagree))
        contributions = [st for w, st in staged.items()
                         if st.grads is not None and w not in decision.skipped]
        merged = average(c.grads for c in contributions)
        request_ids = [members[w] for w in sorted(members)]
        self._apply_locked(merged, request_ids, members=members, skipped=sorted(decision.skipped))
        self.counters.pushes_applied += len(contributions)
        self.counters.pushes_skipped += len(staged) - len(contributions)
        self._decide(round_, decision)
        self._clear_staged()
        self._ready.clear()
        self._generation += 1
        self._cond.notify_all()

    def ApplyRound(self, request, context):
        try:
            return self._apply_round(request)
        except PSError as err:
            _abort(context, err)

    def _apply_round(self, request):
        members = {m.worker_id: m.request_id for m in request.members}
        decision = Decision(members, frozenset(m.worker_id for m in request.members if m.skipped))
        with self._cond:
            if self.options.mode != "sync":
                raise PSError("FAILED_PRECONDITION", "sync rounds on an async server")
            self._check_job(request.job_id)
            if self.options.shard_index == 0:
                raise PSError("FAILED_PRECONDITION",
                              "shard 0 decides rounds itself (CommitRound); ApplyRound is for the others")
            if len(members) != len(request.members) or len(members) != self.options.num_workers:
                raise PSError("INVALID_ARGUMENT",
                              f"a round has {self.options.num_workers} distinct members, got "
                              f"{len(request.members)}")
            self.signer.check(request.decision_mac, self.store.job_id, self.options.num_shards,
                              request.round, decision)
            version = self.store.version
            if request.round < version:
                known = self._decisions.get(request.round)
                if known is not None and known != decision:
                    raise PSError("FAILED_PRECONDITION",
                                  f"round {request.round} was applied here with other members")
                return pb.PushResponse(version=version, step=self.store.step, duplicate=True)
            if request.round > version:
                raise PSError("FAILED_PRECONDITION",
                              f"shard behind: round {request.round}, but this shard is at round "
                              f"{version}; deliver the rounds in between first")
            self._apply_round_locked(request.round, decision)
            return pb.PushResponse(version=self.store.version, step=self.store.step)

    def _wal_append(self, version_before: int, request_ids: List[str], grads, **extra) -> None:
        """Append to the log before anything changes; a write error refuses the push (nothing
        applied, nothing acknowledged). A log that could not be brought back to a record
        boundary is broken: the server stops serving (fail-stop) and a restart recovers."""
        try:
            with self.metrics.wal_fsync_seconds.time():
                self.wal.append(version_before, request_ids, grads, **extra)
        except durability.WalBrokenError as err:
            self._fail_stop(str(err))
            raise PSError("INTERNAL", f"write-ahead log broken, this server stopped serving: {err}; "
                                      "restart it (recovery reads the directory)") from err
        except OSError as err:
            raise PSError("UNAVAILABLE",
                          f"write-ahead log write failed ({err.strerror or err}); the update was not "
                          "applied nor acknowledged and the log was truncated back; retry later") from err

    def _fail_stop(self, reason: str) -> None:
        if self.failed is None:
            self.failed = reason
            log.error("FAIL-STOP: %s; health is NOT_SERVING, every update is refused until a "
                      "restart", reason)
            if self.on_fail_stop is not None:
                self.on_fail_stop(reason)

    def _apply_locked(self, grads: Dict[str, Gradient], request_ids: List[str], **extra) -> None:
        if self.wal is not None:
            self._wal_append(self.store.version, request_ids, grads, **extra)
        with self.metrics.apply_seconds.time():
            self.store.apply(grads)
        for rid in request_ids:
            self._remember(rid, self.store.version)

    # -- Stats, checkpoints -------------------------------------------------------------------
    def Stats(self, request, context):
        with self._cond:
            try:
                self._check_job(request.job_id)
            except PSError as err:
                _abort(context, err)
            c, s, o = self.counters, self.store, self.options
            return pb.StatsResponse(
                mode=o.mode, shard_index=o.shard_index, num_shards=o.num_shards,
                version=s.version, step=s.step, num_parameters=s.num_parameters,
                variables=[pb.VariableInfo(name=v.name, dtype=v.dtype, shape=list(v.shape),
                                           row_start=v.row_start, total_rows=v.total_rows)
                           for v in s.specs.values()],
                pushes_applied=c.pushes_applied, pushes_refused=c.pushes_refused,
                pushes_skipped=c.pushes_skipped, bytes_received=c.bytes_received,
                bytes_sent=c.bytes_sent, uptime_s=time.monotonic() - c.started,
                optimizer_config_json=s.config_json or "",
                last_checkpoint_version=c.last_checkpoint_version, wal_enabled=self.wal is not None,
                num_workers=o.num_workers, max_staleness=o.max_staleness)

    def SaveCheckpoint(self, request, context):
        with self._cond:
            try:
                self._check_job(request.job_id)
            except PSError as err:
                _abort(context, err)
        if self.options.checkpoint_dir is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          "this server runs without --checkpoint-dir")
        if not self.store.registered:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "nothing registered to checkpoint")
        if self.failed is not None:
            context.abort(grpc.StatusCode.INTERNAL, _bounded(
                f"this server stopped serving ({self.failed}); restart it"))
        try:
            path, version, digest = self.save_checkpoint()
        except OSError as err:
            _abort(context, _unavailable_on_disk_error(err, "writing the checkpoint"))
        return pb.SaveCheckpointResponse(path=str(path), version=version, sha256=digest)

    def save_checkpoint(self) -> Tuple[Optional[Path], int, str]:
        """Write a checkpoint of the current state (no-op without a directory / registration)."""
        with self._checkpoint_lock:
            with self._cond:
                if self.options.checkpoint_dir is None or not self.store.registered:
                    return None, self.store.version, ""
                if self.failed is not None:  # fail-stop: leave the directory as it is on disk
                    log.warning("no checkpoint written: %s", self.failed)
                    return None, self.store.version, ""
                meta, arrays = self._export_locked()
            with self.metrics.checkpoint_seconds.time():
                return self._write_checkpoint(meta, arrays)

    def _checkpoint_facts(self, placement: dict) -> dict:
        """What a checkpoint holds beside the store's state."""
        return dict(shard_index=self.options.shard_index, num_shards=self.options.num_shards,
                    placement=placement, dedup=list(self._dedup.items())[-10_000:],
                    decisions=[[r, *d.to_json()] for r, d in
                               list(self._decisions.items())[-_DECISIONS_KEPT:]],
                    workers=self.workers.ids())

    def _export_locked(self) -> Tuple[dict, dict]:
        meta, arrays = self.store.export_state()
        meta.update(self._checkpoint_facts(self.placement))
        if self.wal is not None:  # later records go to a segment that starts here
            self.wal.start_segment(self.store.version)
            meta["wal_segment"] = self.wal.seq
            for (worker, rid), staged in self._staged.items():  # they live on in the new segment
                self.wal.append(self.store.version, [rid], staged.grads or {}, kind="stage",
                                worker=worker, skipped=staged.grads is None)
        return meta, arrays

    def _write_checkpoint(self, meta: dict, arrays: dict) -> Tuple[Path, int, str]:
        directory = self.options.checkpoint_dir
        path, digest = durability.write_checkpoint(directory, meta, arrays, self.options.keep_checkpoints)
        if self.wal is not None:
            kept = durability.list_checkpoints(directory)
            oldest = int(durability.CKPT_RE.match(kept[0].name).group(1)) if kept else 0
            with self._cond:
                self.wal.drop_before(oldest)
        with self._cond:
            self.counters.last_checkpoint_version = max(self.counters.last_checkpoint_version,
                                                        meta["version"])
        log.info("checkpoint %s (version %d)", path.name, meta["version"])
        return path, meta["version"], digest

    def close(self) -> None:
        with self._cond:
            if self.wal is not None:
                self.wal.close()
            if self.lock is not None:
                self.lock.release()
                self.lock = None


_RAW_REQUESTS = frozenset({"Register", "Push", "PushPull"})  # bytes in: ShardService._receive
_RAW_RESPONSES = frozenset({"Pull", "PushPull"})  # bytes out: ShardService._stream_values
_HANDLER_KINDS = {(False, False): grpc.unary_unary_rpc_method_handler,
                  (True, False): grpc.stream_unary_rpc_method_handler,
                  (False, True): grpc.unary_stream_rpc_method_handler,
                  (True, True): grpc.stream_stream_rpc_method_handler}


def add_to_server(service: "ShardService", server) -> None:
    """Serve ``service`` on ``server`` (instead of the generated ``add_..._to_server``).

    The same methods and wire format, but the tensor streams bypass the generated
    (de)serializers, which would copy every megabyte chunk two or three times: Register, Push
    and PushPull get each request as the bytes gRPC received, and Pull and PushPull answer
    bytes already in the wire format of a PullResponse (``tensors.serialized_chunks``; tests
    check that protobuf parses them to the messages it would have built itself)."""
    name = "radam_dist.ps.v1.ParameterServer"
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["ParameterServer"].methods:
        request, response = getattr(pb, method.input_type.name), getattr(pb, method.output_type.name)
        make = _HANDLER_KINDS[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = make(
            getattr(service, method.name),
            request_deserializer=None if method.name in _RAW_REQUESTS else request.FromString,
            response_serializer=None if method.name in _RAW_RESPONSES else response.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    if hasattr(server, "add_registered_method_handlers"):  # grpcio >= 1.62: faster lookup
        server.add_registered_method_handlers(name, handlers)


def average(pushes: Iterable[Dict[str, Gradient]]) -> Dict[str, Gradient]:
    """The mean gradient of a sync round, per variable over the pushes that carry it.

    Dense gradients are summed in worker order and divided by their count; sparse ones are
    concatenated with values divided by the count (RAdam sums duplicate rows), which is the
    same mean. A variable with both kinds in one round is densified.
    """
    by_name: Dict[str, List[Gradient]] = collections.defaultdict(list)
    for grads in pushes:
        for name, grad in grads.items():
            by_name[name].append(grad)
    out = {}
    for name, grads in by_name.items():
        count = len(grads)
        if all(g.is_sparse for g in grads):
            values = np.concatenate([g.values for g in grads]) / np.asarray(count, grads[0].values.dtype)
            indices = np.concatenate([g.indices.astype(np.int64) for g in grads])
            out[name] = Gradient(values.astype(grads[0].values.dtype, copy=False), indices)
            continue
        dense_shape = next(g.values.shape for g in grads if not g.is_sparse)
        total = np.zeros(dense_shape, grads[0].values.dtype)
        for g in grads:
            if g.is_sparse:
                np.add.at(total, g.indices, g.values)
            else:
                total += g.values
        out[name] = Gradient(total / np.asarray(count, total.dtype))
    return out
