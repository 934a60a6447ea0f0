"""The ParameterServer gRPC service of one shard: decode, delegate, encode.

The work is done by the parts it wires together, each in its own module:

* ``wire.Wire`` reads and checks every request before anything changes, and writes the
  tensor streams of the answers;
* ``shard.Shard`` holds the variables, the optimizer and the request-id table, and serves
  Register, Pull and async pushes (applied on arrival unless more than ``max_staleness``
  updates old: ABORTED, pull and recompute);
* ``rounds.RoundCoordinator`` runs the sync rounds: stage on every shard, commit on shard 0,
  apply on the others, all or nothing and signed (docs/PS.md, "Sync rounds across shards");
* ``checkpointer.Checkpointer`` writes checkpoints and ``wal.mark``;
* ``recovery.Recovery`` restores all of it from the checkpoint directory at start.

The shard, the coordinator and the checkpointer share the shard's one Condition
(shard.py says why); this class holds no lock of its own.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import grpc

from radam_dist.ps.checkpointer import Checkpointer
from radam_dist.ps.errors import PSError
from radam_dist.ps.metrics import PSMetrics
from radam_dist.ps.options import ServeOptions
from radam_dist.ps.proto import pb, pb_grpc
from radam_dist.ps.pushes import PushResult
from radam_dist.ps.recovery import Recovery
from radam_dist.ps.rounds import Outcome, RoundCoordinator
from radam_dist.ps.shard import Shard
from radam_dist.ps.storage import DirectoryLock, WriteAheadLog
from radam_dist.ps.store import ParameterStore
from radam_dist.ps.tensors import ByteBudget, TensorAssembler, reuse_freed_memory
from radam_dist.ps.wire import Wire

log = logging.getLogger(__name__)

MAX_MESSAGE_CHARS = 2000  # longest status message sent (names are listed with a count)


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


def _push_response(result: PushResult) -> "pb.PushResponse":
    return pb.PushResponse(version=result.version, step=result.step, skipped=result.skipped,
                           duplicate=result.duplicate, staged=result.staged)


def _commit_response(outcome: Outcome) -> "pb.CommitRoundResponse":
    state = pb.CommitRoundResponse.COMMITTED if outcome.committed else pb.CommitRoundResponse.PENDING
    members = [pb.RoundMember(worker_id=w, request_id=r, skipped=w in outcome.skipped)
               for w, r in sorted(outcome.members.items())]
    extra = dict(decision_mac=outcome.mac) if outcome.committed else {}
    return pb.CommitRoundResponse(outcome=state, round=outcome.round, members=members,
                                  version=outcome.version, step=outcome.step, **extra)


class ShardService(pb_grpc.ParameterServerServicer):
    """Serves one shard's variables and optimizer state over the v1 API."""

    SPLIT = ("wire_in", "decode", "validate", "apply", "snapshot", "encode", "wire_out")

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
        self.budget = ByteBudget(options.max_inflight_bytes)
        self.metrics = PSMetrics(lambda: (self.shard.store.version, self.shard.store.step), options)
        self.metrics.inflight_bytes.set_function(lambda: float(self.budget.used))
        self.lock = (DirectoryLock(options.checkpoint_dir)
                     if options.checkpoint_dir is not None else None)
        wal = WriteAheadLog(options.checkpoint_dir) if options.wal else None
        self.shard = Shard(options, self.metrics, wal)
        self.rounds = RoundCoordinator(options, self.shard, self.budget, self.metrics)
        self.wire = Wire(options, self.shard, self.budget, self.metrics)
        self.checkpointer = Checkpointer(options, self.shard, self.rounds, self.metrics)
        self.started = time.monotonic()
        try:
            self.checkpointer.resume(*Recovery(options, self.shard, self.rounds).run())
            if wal is not None and self.shard.store.registered:
                self.save_checkpoint()  # starts a new segment that this checkpoint names
                self.write_wal_mark()
            # (Unregistered: no segment yet; Register's checkpoint starts the one it names, so
            # restarts before registration leave nothing that could look like lost state.)
        except BaseException:
            self.close()
            raise

    # -- what the server process uses ------------------------------------------------------------
    @property
    def store(self) -> ParameterStore:
        return self.shard.store

    @property
    def wal(self) -> Optional[WriteAheadLog]:
        return self.shard.wal

    @property
    def on_fail_stop(self):
        return self.shard.on_fail_stop

    @on_fail_stop.setter
    def on_fail_stop(self, callback) -> None:
        self.shard.on_fail_stop = callback

    def save_checkpoint(self) -> Tuple[Optional[Path], int, str]:
        """Write a checkpoint of the current state (no-op without a directory / registration)."""
        return self.checkpointer.save()

    def write_wal_mark(self) -> bool:
        """Record in ``wal.mark`` how far the log reached (the server's --wal-mark-interval)."""
        return self.checkpointer.write_mark()

    def close(self) -> None:
        with self.shard.cond:
            if self.shard.wal is not None:
                self.shard.wal.close()
            if self.lock is not None:
                self.lock.release()
                self.lock = None

    # -- Register, Pull --------------------------------------------------------------------------
    def Register(self, request_iterator, context):
        assembler = None
        try:
            header, tensors, assembler = self.wire.receive_register(request_iterator, context)
            r = self.wire.registration(header, tensors)
            created, version, step, names = self.shard.register(
                r.config_json, r.specs, r.values, r.job_id, r.placement,
                persist=self.checkpointer.write_registration)
            return pb.RegisterResponse(created=created, version=version, step=step, names=names)
        except PSError as err:
            _abort(context, err)
        finally:
            if assembler is not None:
                assembler.release()

    def Pull(self, request, context):
        try:
            header, names, values = self.shard.pull(request.job_id, request.names,
                                                    request.if_newer_than)
        except PSError as err:
            _abort(context, err)
        yield from self.wire.stream_values(header, names, values)

    # -- Push, PushPull --------------------------------------------------------------------------
    def _check_push_header(self, header) -> None:
        self.rounds.check_push_header(header.job_id, header.worker_id)

    def _receive_push(self, request_iterator, context, split=None, method: str = "Push"):
        return self.wire.receive_push(request_iterator, context, self._check_push_header, split,
                                      method)

    def Push(self, request_iterator, context):
        assembler = header = None
        try:
            header, tensors, assembler = self._receive_push(request_iterator, context)
            return _push_response(self._push(header, tensors, context, finite=assembler.finite(),
                                             assembler=assembler))
        except PSError as err:
            self._refused(context, err, header)
        finally:
            if assembler is not None:
                assembler.release()

    def PushPull(self, request_iterator, context):
        assembler = header = None
        split: Dict[str, float] = {}
        try:
            header, tensors, assembler = self._receive_push(request_iterator, context, split,
                                                            "PushPull")
            self.shard.check_names(header.pull_names)
            result = self._push(header, tensors, context, split, assembler.finite(), assembler)
            t = time.perf_counter()
            names, values, version, step = self.shard.snapshot(header.pull_names)
            split["snapshot"] = time.perf_counter() - t
            del tensors  # the gradients are applied: free them before streaming the values
        except PSError as err:
            self._refused(context, err, header)
        finally:
            if assembler is not None:
                assembler.release()
        yield from self.wire.stream_values(
            dict(version=version, step=step, skipped=result.skipped, duplicate=result.duplicate),
            names, values, split)
        # Where a call's time went (bench/ps_throughput.py reads these with --log-level DEBUG):
        # wire_in = waiting for the upload, wire_out = streaming the values minus encoding them;
        # apply includes the write-ahead log (and, in sync mode, waiting for the round).
        log.debug("PushPull split ms: " + " ".join(f"{k} {1e3 * split.get(k, 0.0):.1f}"
                                                   for k in self.SPLIT))

    def _push(self, header, tensors, context, split: Optional[dict] = None,
              finite: Optional[dict] = None, assembler: Optional[TensorAssembler] = None
              ) -> PushResult:
        """Check, then apply (async) or stage / stage and commit (sync). ``finite``:
        TensorAssembler.finite() of ``tensors``; ``split`` gets the seconds of "validate" and
        "apply"; a staged push takes over ``assembler``'s reservation in the in-flight budget."""
        t0 = time.perf_counter()
        grads = self.wire.gradients(tensors)
        duplicate, all_finite = self.shard.check_push(header.request_id, grads,
                                                      self.wire.known_finite(finite))
        if duplicate is not None:
            return duplicate
        grads = grads if all_finite else None
        t1 = time.perf_counter()
        try:
            if self.options.mode == "async":
                if header.stage:
                    raise PSError("FAILED_PRECONDITION",
                                  "stage=true is for sync mode; this server is async")
                return self.shard.push_async(header.base_version, header.request_id, grads)
            if header.stage:
                return self.rounds.stage(header.worker_id, header.base_version, header.request_id,
                                         grads, assembler)
            return self.rounds.push_one_shot(header.worker_id, header.base_version,
                                             header.request_id, grads, context, assembler)
        finally:
            if split is not None:
                split["validate"], split["apply"] = t1 - t0, time.perf_counter() - t1

    def _refused(self, context, err: PSError, header=None):
        self.shard.count_refused()
        _abort(context, _who(err, header if header is not None else getattr(err, "header", None)))

    # -- sync rounds: CommitRound (shard 0), ApplyRound (the others) ---------------------------------
    def CommitRound(self, request, context):
        try:
            with self.shard.cond:
                self.shard.check_job(request.job_id)
            if request.query_only:
                return _commit_response(self.rounds.outcome(request.round))
            return _commit_response(self.rounds.commit(request.round, request.worker_id,
                                                       request.request_id, context, request.skipped))
        except PSError as err:
            _abort(context, _who(err, request))

    def ApplyRound(self, request, context):
        try:
            members = [(m.worker_id, m.request_id, m.skipped) for m in request.members]
            return _push_response(self.rounds.apply(request.job_id, request.round, members,
                                                    request.decision_mac))
        except PSError as err:
            _abort(context, err)

    # -- Stats, SaveCheckpoint -------------------------------------------------------------------
    def Stats(self, request, context):
        try:
            facts = self.shard.stats(request.job_id)
        except PSError as err:
            _abort(context, err)
        variables = [pb.VariableInfo(name=v.name, dtype=v.dtype, shape=list(v.shape),
                                     row_start=v.row_start, total_rows=v.total_rows)
                     for v in facts.pop("variables")]
        return pb.StatsResponse(variables=variables, uptime_s=time.monotonic() - self.started,
                                last_checkpoint_version=self.checkpointer.last_version,
                                **self.wire.byte_counts(), **facts)

    def SaveCheckpoint(self, request, context):
        try:
            path, version, digest = self.checkpointer.save_on_request(request.job_id)
        except PSError as err:
            _abort(context, err)
        return pb.SaveCheckpointResponse(path=str(path), version=version, sha256=digest)


_RAW_REQUESTS = frozenset({"Register", "Push", "PushPull"})  # bytes in: wire.Wire.receive
_RAW_RESPONSES = frozenset({"Pull", "PushPull"})  # bytes out: wire.Wire.stream_values
_HANDLER_KINDS = {(False, False): grpc.unary_unary_rpc_method_handler,
                  (True, False): grpc.stream_unary_rpc_method_handler,
                  (False, True): grpc.unary_stream_rpc_method_handler,
                  (True, True): grpc.stream_stream_rpc_method_handler}


def add_to_server(service: ShardService, server) -> None:
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
