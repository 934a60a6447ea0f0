"""The ParameterServer gRPC service of one shard: sync rounds, async pushes, durability.

One lock (a Condition) guards the store; every request is validated completely before it
takes the lock to change anything, so a refused request leaves the state exactly as it was.

Sync mode: the pushes of ``num_workers`` distinct workers for the current version form a
round; the last one to arrive averages the gradients, applies one step and wakes the others.
A round that is not complete ``sync_timeout`` seconds after a worker arrived is abandoned:
every waiting push gets DEADLINE_EXCEEDED / ABORTED naming the workers that never came, and
nothing is applied.

Async mode: each push is applied on arrival unless its gradients were computed from a version
more than ``max_staleness`` updates old (ABORTED: pull and recompute).
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import grpc
import numpy as np

from radam_dist.ps import durability
from radam_dist.ps.errors import PSError
from radam_dist.ps.proto import pb, pb_grpc
from radam_dist.ps.store import Gradient, ParameterStore, VariableSpec
from radam_dist.ps.tensors import DEFAULT_CHUNK_BYTES, TensorAssembler, WireError, chunk_tensor

log = logging.getLogger(__name__)

_DEDUP_CAPACITY = 100_000


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
    checkpoint_dir: Optional[Path] = None
    checkpoint_interval: float = 0.0  # seconds; 0: only on request / SIGTERM
    keep_checkpoints: int = 2
    wal: bool = False
    chunk_bytes: int = DEFAULT_CHUNK_BYTES


@dataclass
class _Pending:
    request_id: str
    grads: Optional[Dict[str, Gradient]]  # None: skipped (non-finite)


@dataclass
class _Counters:
    pushes_applied: int = 0
    pushes_refused: int = 0
    pushes_skipped: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    last_checkpoint_version: int = -1
    started: float = field(default_factory=time.monotonic)


def _abort(context, err: PSError):
    context.abort(getattr(grpc.StatusCode, err.code), err.message)


class ShardService(pb_grpc.ParameterServerServicer):
    """Holds one shard's variables and optimizer state and serves the v1 API."""

    def __init__(self, options: ServeOptions):
        if options.mode not in ("sync", "async"):
            raise ValueError(f"mode must be 'sync' or 'async', got {options.mode!r}")
        if options.wal and options.checkpoint_dir is None:
            raise ValueError("--wal needs --checkpoint-dir (the log is replayed on a checkpoint)")
        self.options = options
        self.store = ParameterStore()
        self.placement: dict = {}
        self._cond = threading.Condition()
        self._checkpoint_lock = threading.Lock()
        self._dedup: "collections.OrderedDict[str, int]" = collections.OrderedDict()
        self._pending: Dict[str, _Pending] = {}  # sync: worker_id -> its gradient this round
        self._generation = 0  # sync: bumped when a round is applied or abandoned
        self._abandoned: Dict[int, str] = {}  # generation -> why the round was abandoned
        self.counters = _Counters()
        self.wal = durability.WriteAheadLog(options.checkpoint_dir) if options.wal else None
        self._recover()

    # -- recovery ---------------------------------------------------------------------------
    def _recover(self) -> None:
        directory = self.options.checkpoint_dir
        if directory is None:
            return
        loaded = durability.load_latest_checkpoint(directory)
        if loaded is not None:
            path, meta, arrays = loaded
            if (meta.get("shard_index"), meta.get("num_shards")) != (
                    self.options.shard_index, self.options.num_shards):
                raise RuntimeError(
                    f"{path} belongs to shard {meta.get('shard_index')} of {meta.get('num_shards')}, "
                    f"this server is shard {self.options.shard_index} of {self.options.num_shards}")
            self.store.import_state(meta, arrays)
            self.placement = meta.get("placement", {})
            for rid, version in meta.get("dedup", []):
                self._remember(rid, version)
            self.counters.last_checkpoint_version = self.store.version
            log.info("resumed from %s at version %d", path.name, self.store.version)
        if self.wal is not None:
            replayed = 0
            for version_before, request_ids, grads in self.wal.records():
                if not self.store.registered or version_before < self.store.version:
                    continue
                if version_before > self.store.version:
                    raise RuntimeError(
                        f"write-ahead log gap: next record is for version {version_before}, "
                        f"state is at {self.store.version}")
                self.store.apply(grads)
                for rid in request_ids:
                    self._remember(rid, self.store.version)
                replayed += 1
            if replayed:
                log.info("replayed %d write-ahead log records, now at version %d",
                         replayed, self.store.version)
            self.wal.start_segment(self.store.version)
            if replayed:
                self.save_checkpoint()

    # -- helpers ----------------------------------------------------------------------------
    def _remember(self, request_id: str, version: int) -> None:
        if not request_id:
            return
        self._dedup[request_id] = version
        self._dedup.move_to_end(request_id)
        while len(self._dedup) > _DEDUP_CAPACITY:
            self._dedup.popitem(last=False)

    def _receive(self, request_iterator, header_field: str, roles: frozenset, context):
        """Read a client stream: (header, {(name, role): array}, bytes). Raises PSError."""
        header = None
        assembler = TensorAssembler(self.options.max_request_bytes, roles)
        received = 0
        try:
            for i, message in enumerate(request_iterator):
                kind = message.WhichOneof("kind")
                if i == 0:
                    if kind != "header":
                        raise PSError("INVALID_ARGUMENT", f"the first message must be the {header_field}")
                    header = getattr(message, "header")
                    continue
                if kind != "chunk":
                    raise PSError("INVALID_ARGUMENT", "only one header per stream")
                received += len(message.chunk.data)
                assembler.add(message.chunk)
            if header is None:
                raise PSError("INVALID_ARGUMENT", f"empty stream: no {header_field}")
            tensors = assembler.finish()
        except WireError as err:
            raise PSError(err.code, str(err)) from err
        except grpc.RpcError as err:  # the client went away mid-stream
            raise PSError("CANCELLED", f"stream interrupted: {err}") from err
        with self._cond:
            self.counters.bytes_received += received
        return header, tensors

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

    def _stream_values(self, header_kwargs: dict, names: List[str], values: Dict[str, np.ndarray]):
        header = pb.PullHeader(**header_kwargs)
        yield pb.PullResponse(header=header)
        sent = 0
        for name in names:
            for message in chunk_tensor(pb, name, pb.VALUE, values[name], self.options.chunk_bytes,
                                        wrap=pb.PullResponse):
                sent += len(message.chunk.data)
                yield message
        with self._cond:
            self.counters.bytes_sent += sent

    # -- Register ---------------------------------------------------------------------------
    def Register(self, request_iterator, context):
        try:
            header, tensors = self._receive(request_iterator, "RegisterHeader",
                                            frozenset({pb.VALUE}), context)
            return self._register(header, tensors)
        except PSError as err:
            _abort(context, err)

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
        values = {name: array for (name, _), array in tensors.items()}
        specs = []
        for name in sorted(values):
            array = values[name]
            where = placement.get(name, {})
            specs.append(VariableSpec(name, array.dtype.name, tuple(array.shape),
                                      int(where.get("row_start", 0)),
                                      int(where.get("total_rows", array.shape[0] if array.ndim else 0))))
            if array.size and array.dtype.kind == "f" and not np.isfinite(array).all():
                raise PSError("INVALID_ARGUMENT", f"initial value of {name!r} holds NaN or Inf")
        with self._cond:
            canonical = self.store.check_registration(header.optimizer_config_json, specs, header.job_id)
            created = not self.store.registered
            if created:
                self.store.create(canonical, specs, values, header.job_id)
                self.placement = placement
                log.info("registered %d variables (%d parameters), optimizer %s",
                         len(specs), self.store.num_parameters, canonical)
                if opts.checkpoint_dir is not None:
                    # The registration must be durable before anyone can push to it; the lock
                    # is still held, so no push slips in before the file exists.
                    meta, arrays = self._export_locked()
                    durability.write_checkpoint(
                        opts.checkpoint_dir, meta, arrays, opts.keep_checkpoints)
                    self.counters.last_checkpoint_version = 0
            return pb.RegisterResponse(created=created, version=self.store.version,
                                       step=self.store.step, names=self.store.names)

    # -- Pull -------------------------------------------------------------------------------
    def Pull(self, request, context):
        try:
            with self._cond:
                names = self.store.check_names(list(request.names))
                version, step = self.store.version, self.store.step
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

    def Push(self, request_iterator, context):
        try:
            header, tensors = self._receive(request_iterator, "PushHeader", self._PUSH_ROLES, context)
            version, step, skipped, duplicate = self._push(header, tensors)
            return pb.PushResponse(version=version, step=step, skipped=skipped, duplicate=duplicate)
        except PSError as err:
            self._refused(context, err)

    def PushPull(self, request_iterator, context):
        try:
            header, tensors = self._receive(request_iterator, "PushHeader", self._PUSH_ROLES, context)
            with self._cond:
                self.store.check_names(list(header.pull_names))
            version, step, skipped, duplicate = self._push(header, tensors)
            with self._cond:
                names = self.store.check_names(list(header.pull_names))
                values = self.store.read(names)
                version, step = self.store.version, self.store.step
        except PSError as err:
            self._refused(context, err)
        yield from self._stream_values(
            dict(version=version, step=step, skipped=skipped, duplicate=duplicate), names, values)

    def _push(self, header, tensors) -> Tuple[int, int, bool, bool]:
        grads = self._gradients(tensors)
        with self._cond:
            if header.request_id and header.request_id in self._dedup:
                return self._dedup[header.request_id], self.store.step, False, True
            finite = self.store.check_gradients(grads, self.options.nonfinite)
        if self.options.mode == "sync":
            return self._push_sync(header, grads if finite else None)
        return self._push_async(header, grads if finite else None)

    def _refused(self, context, err: PSError):
        with self._cond:
            self.counters.pushes_refused += 1
        _abort(context, err)

    def _push_async(self, header, grads) -> Tuple[int, int, bool, bool]:
        with self._cond:
            version = self.store.version
            if header.base_version > version:
                raise PSError("FAILED_PRECONDITION",
                              f"gradients computed at version {header.base_version}, but this server "
                              f"is at version {version} (a restarted server without its state?)")
            staleness = version - header.base_version
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

    def _push_sync(self, header, grads) -> Tuple[int, int, bool, bool]:
        opts = self.options
        worker = header.worker_id
        request_id = header.request_id or f"anonymous-{id(header)}-{time.monotonic_ns()}"
        if not worker:
            raise PSError("INVALID_ARGUMENT", "sync mode needs a worker_id in every push")
        with self._cond:
            round_version = self.store.version
            if header.base_version < round_version:
                raise PSError("ABORTED",
                              f"sync round {header.base_version} is already applied (server at version "
                              f"{round_version}); pull and recompute")
            if header.base_version > round_version:
                raise PSError("FAILED_PRECONDITION",
                              f"gradients for round {header.base_version}, but the server is at round "
                              f"{round_version}")
            self._pending[worker] = _Pending(request_id, grads)
            generation = self._generation
            if len(self._pending) >= opts.num_workers:
                self._finish_round_locked()
            deadline = time.monotonic() + opts.sync_timeout
            while self._generation == generation:
                left = deadline - time.monotonic()
                if left <= 0:
                    have = sorted(self._pending)
                    reason = (f"sync round {round_version} timed out after {opts.sync_timeout:g}s: "
                              f"{len(have)} of {opts.num_workers} workers pushed ({', '.join(have)}); "
                              "the others never came. Nothing was applied; pull and push again")
                    self._abandon_round_locked(reason)
                    raise PSError("DEADLINE_EXCEEDED", reason)
                self._cond.wait(left)
            if request_id in self._dedup:
                return self._dedup[request_id], self.store.step, grads is None, False
            reason = self._abandoned.get(generation + 1, "the sync round was abandoned")
            raise PSError("ABORTED", reason)

    def _abandon_round_locked(self, reason: str) -> None:
        self._pending.clear()
        self._generation += 1
        self._abandoned[self._generation] = reason
        for old in [g for g in self._abandoned if g < self._generation - 100]:
            del self._abandoned[old]
        self._cond.notify_all()

    def _finish_round_locked(self) -> None:
        contributions = [p for _, p in sorted(self._pending.items()) if p.grads is not None]
        request_ids = [p.request_id for p in self._pending.values()]
        skipped = len(self._pending) - len(contributions)
        merged = average(c.grads for c in contributions)
        if merged:
            self._apply_locked(merged, request_ids)
            self.counters.pushes_applied += len(contributions)
        else:  # every gradient was non-finite (or empty): the round passes without a step
            for rid in request_ids:
                self._remember(rid, self.store.version)
        self.counters.pushes_skipped += skipped
        self._pending.clear()
        self._generation += 1
        self._cond.notify_all()

    def _apply_locked(self, grads: Dict[str, Gradient], request_ids: List[str]) -> None:
        if self.wal is not None:
            self.wal.append(self.store.version, request_ids, grads)
        self.store.apply(grads)
        for rid in request_ids:
            self._remember(rid, self.store.version)

    # -- Stats, checkpoints -------------------------------------------------------------------
    def Stats(self, request, context):
        with self._cond:
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
        if self.options.checkpoint_dir is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          "this server runs without --checkpoint-dir")
        if not self.store.registered:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "nothing registered to checkpoint")
        path, version, digest = self.save_checkpoint()
        return pb.SaveCheckpointResponse(path=str(path), version=version, sha256=digest)

    def save_checkpoint(self) -> Tuple[Optional[Path], int, str]:
        """Write a checkpoint of the current state (no-op without a directory / registration)."""
        with self._checkpoint_lock:
            with self._cond:
                if self.options.checkpoint_dir is None or not self.store.registered:
                    return None, self.store.version, ""
                meta, arrays = self._export_locked()
            return self._write_checkpoint(meta, arrays)

    def _export_locked(self) -> Tuple[dict, dict]:
        meta, arrays = self.store.export_state()
        meta.update(shard_index=self.options.shard_index, num_shards=self.options.num_shards,
                    placement=self.placement, dedup=list(self._dedup.items())[-10_000:])
        if self.wal is not None:  # later records go to a segment that starts here
            self.wal.start_segment(self.store.version)
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
