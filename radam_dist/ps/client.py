"""``PSClient``: the worker side -- register, pull, push, across any number of shards.

Each variable is routed by ``placement`` (whole on one shard, or split by rows); calls to
several shards run in parallel. Calls that fail because a server is (re)starting are retried
with backoff for up to ``retry_timeout`` seconds; a push keeps its request id across retries,
so the server applies it once even if the first attempt was applied before the connection
broke.
"""

from __future__ import annotations

import json
import logging
import random
import socket
import ssl
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import grpc
import numpy as np

from radam_dist.ps import placement as placement_mod
from radam_dist.ps.proto import pb, pb_grpc
from radam_dist.ps.transport import KEEPALIVE_TIME_S, KEEPALIVE_TIMEOUT_S, keepalive_options
from radam_dist.ps.tensors import (DEFAULT_CHUNK_BYTES, BufferPool, TensorAssembler, TimedStream,
                                   WireError, chunk_tensor, parse_chunk_message,
                                   reuse_freed_memory, serialized_chunks)

log = logging.getLogger(__name__)

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})
MAX_MESSAGE_BYTES = 8 << 20


class RoundIncompleteError(RuntimeError):
    """A sync round was committed on shard 0 but could not be delivered to every shard yet.

    The outcome is decided and durable; the next pull or push of any worker delivers it."""


class DataLossError(RuntimeError):
    """A server no longer has updates it acknowledged (it answered DATA_LOSS, or a pull showed
    a version below one this client already saw): it was restored from an older state. Never
    "pull and continue": the job's parameters went back in time; stop and restore the job."""


class StaleGradientError(RuntimeError):
    """The server refused gradients computed from an old version (ABORTED): pull and recompute.

    Raised for async pushes beyond ``--max-staleness`` and sync pushes for a round that was
    already applied or abandoned. (A push based on a version the server no longer has raises
    ``DataLossError``.)
    """


class PSConfigError(grpc.RpcError):
    """A call no retry can fix: the token, or TLS on one side only. ``str()`` is one line naming
    the ``PSClient`` argument to fix; ``cli_message`` names the ``radam-ps`` flag instead. Still a
    ``grpc.RpcError``: ``code()`` and ``details()`` are the gRPC status."""

    def __init__(self, problem: str, fix: str, cli_fix: str, code, details: str):
        super().__init__(f"{problem}: {fix}")
        self.problem, self.fix, self.cli_fix = problem, fix, cli_fix
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self) -> str:
        return self._details

    @property
    def cli_message(self) -> str:
        return f"{self.problem}: {self.cli_fix}"

    def __str__(self) -> str:
        return self.args[0]


class AuthenticationError(PSConfigError):
    """The shard refused the bearer token (UNAUTHENTICATED): missing or wrong ``token``."""


class TLSMismatchError(PSConfigError):
    """The TLS handshake cannot succeed: TLS on one side only, or certificates that do not fit."""


class OptimizerConfigError(PSConfigError, ValueError):
    """``register`` refused the optimizer config before sending anything (the check the servers
    make): a ValueError, and a ``grpc.RpcError`` with ``INVALID_ARGUMENT`` as the server's
    refusal would be."""


def _speaks_tls(target: str, timeout: float = 2.0) -> bool:
    """Whether ``host:port`` answers a TLS ClientHello (certificates not checked)."""
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or "/" in host:
        return False
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as raw:
            with context.wrap_socket(raw, server_hostname=None, do_handshake_on_connect=False) as s:
                s.do_handshake()
                return True
    except ssl.SSLError as err:  # a TLS server that wants a client certificate is still TLS
        return "ALERT" in str(err).upper() or "CERTIFICATE" in str(err).upper()
    except OSError:
        return False


def _message_to_dict(message) -> dict:
    """``MessageToDict`` with zeros and empty lists kept, on every protobuf the [ps] extra
    takes: 5.26 renamed the switch (``including_default_value_fields``, which 4.x and 5.x
    before 5.26 know, became ``always_print_fields_with_no_presence``)."""
    from google.protobuf.json_format import MessageToDict

    try:
        return MessageToDict(message, preserving_proto_field_name=True,
                             always_print_fields_with_no_presence=True)
    except TypeError:  # protobuf < 5.26
        return MessageToDict(message, preserving_proto_field_name=True,
                             including_default_value_fields=True)


def _read(path_or_bytes) -> Optional[bytes]:
    if path_or_bytes is None:
        return None
    if isinstance(path_or_bytes, bytes):
        return path_or_bytes
    return Path(path_or_bytes).read_bytes()


def _is_behind(err: grpc.RpcError) -> bool:
    return (err.code() == grpc.StatusCode.FAILED_PRECONDITION
            and (err.details() or "").startswith("shard behind"))


def _to_numpy_gradient(grad) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """(values, indices or None) from an ndarray, a tensor, a tf.IndexedSlices or a pair."""
    if isinstance(grad, tuple) and len(grad) == 2:
        return np.asarray(grad[0]), np.asarray(grad[1])
    if hasattr(grad, "indices") and hasattr(grad, "values"):  # tf.IndexedSlices
        return np.asarray(grad.values), np.asarray(grad.indices)
    return np.asarray(grad), None


def _serialize(message) -> bytes:
    """Request serializer for pushes: gradient chunks come already serialized (one copy of
    the data, tensors.serialized_chunks), the header as a message."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def _stub(channel):
    """The generated stub, with Push and PushPull taking pre-serialized chunks, and Pull and
    PushPull answering raw PullResponse bytes (``_collect`` parses them with one copy)."""
    stub = pb_grpc.ParameterServerStub(channel)
    service = pb.DESCRIPTOR.services_by_name["ParameterServer"].full_name
    stub.Push = channel.stream_unary(f"/{service}/Push", request_serializer=_serialize,
                                     response_deserializer=pb.PushResponse.FromString)
    stub.PushPull = channel.stream_stream(f"/{service}/PushPull", request_serializer=_serialize,
                                          response_deserializer=None)
    stub.Pull = channel.unary_stream(f"/{service}/Pull",
                                     request_serializer=pb.PullRequest.SerializeToString,
                                     response_deserializer=None)
    return stub


class PSClient:
    """Talks to the shards ``targets`` (``host:port``, in shard order).

    Args:
        targets: one address per shard, index i = the server started with --shard-index i.
        token: bearer token (or None when the servers run without one).
        worker_id: stable identity of this worker (sync mode: one gradient per worker per step).
        root_certificates / client_cert / client_key: PEM bytes or file paths; giving
            root_certificates turns TLS on, adding client_cert/client_key makes it mutual TLS.
        split_threshold_bytes: variables at least this large are split by rows across shards.
        retry_timeout: how long a call keeps retrying while a server is unreachable.
        validate: check gradients against the registered shapes before sending anything (so
            a bad push is refused before any shard sees it).
        tune_allocator: opt-in (default False, since it changes the allocator of the whole
            process): let glibc reuse freed chunk buffers instead of returning them to the
            kernel (``tensors.reuse_freed_memory``: ``mallopt`` thresholds, keeps up to 1 GiB of
            freed heap for reuse). Halves the client's encode and decode time on large models.
            The server and the benchmarks turn it on.
        keepalive_time_s / keepalive_timeout_s: ping each shard every ``keepalive_time_s`` and
            drop the connection when no answer comes within ``keepalive_timeout_s``: a call to a
            frozen or vanished shard fails (UNAVAILABLE) within their sum.
        receive_buffer_bytes: pulled values are decoded into buffers of earlier pulls that
            nothing refers to any more (``tensors.BufferPool``: an array, view or tensor of it
            that the caller still holds keeps a buffer out of reuse), up to this many bytes in
            all; fresh memory costs a page fault (zeroing) per page on the first write. 0:
            fresh arrays for every pull.

    ``last_split``: after each push_pull / pull, ``{shard: {"encode", "wire_wait", "decode"}}``
    in seconds spent in this process: serializing the gradients (push_pull only), waiting for
    response messages, and parsing + copying them into the arrays (bench/ps_throughput.py
    prints them).
    """

    def __init__(self, targets: Union[str, Sequence[str]], token: Optional[str] = None, *,
                 worker_id: Optional[str] = None, root_certificates=None, client_cert=None,
                 client_key=None, server_name_override: Optional[str] = None,
                 split_threshold_bytes: int = 64 << 20, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 retry_timeout: float = 60.0, call_timeout: Optional[float] = None,
                 job_id: str = "", validate: bool = True, tune_allocator: bool = False,
                 receive_buffer_bytes: int = 1 << 30, keepalive_time_s: float = KEEPALIVE_TIME_S,
                 keepalive_timeout_s: float = KEEPALIVE_TIMEOUT_S):
        if tune_allocator:
            reuse_freed_memory()
        self.targets = [targets] if isinstance(targets, str) else list(targets)
        if not self.targets:
            raise ValueError("PSClient needs at least one target")
        self.worker_id = worker_id or f"worker-{uuid.uuid4().hex[:12]}"
        self.split_threshold_bytes = split_threshold_bytes
        self.chunk_bytes = chunk_bytes
        self.retry_timeout = retry_timeout
        self.call_timeout = call_timeout
        self.job_id = job_id
        self.validate = validate
        self._receive_pool = BufferPool(receive_buffer_bytes)
        self.last_split: Dict[int, Dict[str, float]] = {}
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)] + keepalive_options(
                       keepalive_time_s, keepalive_timeout_s, server=False)
        if server_name_override:
            options.append(("grpc.ssl_target_name_override", server_name_override))
        self._tls = root_certificates is not None or client_cert is not None
        self._down_since: Dict[int, float] = {}  # shard -> when its outage began
        self._outage_lock = threading.Lock()
        if self._tls:
            credentials = grpc.ssl_channel_credentials(
                _read(root_certificates), _read(client_key), _read(client_cert))
            self._channels = [grpc.secure_channel(t, credentials, options) for t in self.targets]
        else:
            self._channels = [grpc.insecure_channel(t, options) for t in self.targets]
        self._stubs = [_stub(c) for c in self._channels]
        self._pool = ThreadPoolExecutor(max_workers=max(2, len(self.targets)),
                                        thread_name_prefix="psclient")
        self.placement: Dict[str, placement_mod.VariablePlacement] = {}
        self._specs: Dict[str, Tuple[str, Tuple[int, ...]]] = {}  # name -> (dtype, full shape)
        self.versions: List[int] = [0] * len(self.targets)
        self.skipped_pushes = 0  # sync: pushes left out of their round (non-finite on a shard)
        # Tests: called with the protocol point ("staged:<shard>", "committed", "applied:<shard>")
        # so a worker process can die exactly there; stage_sequentially makes the order fixed.
        self._on_phase: Optional[Callable[[str], None]] = None
        self.stage_sequentially = False

    # -- plumbing -------------------------------------------------------------------------------
    @property
    def num_shards(self) -> int:
        return len(self.targets)

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> "PSClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, shard: int, fn: Callable):
        """Run ``fn(stub, kwargs)`` with retries while the shard is unavailable. An outage is
        logged (WARNING) once when it starts and once when it ends, with its length."""
        deadline = time.monotonic() + self.retry_timeout
        delay = 0.05
        probed = False
        while True:
            try:
                result = fn(self._stubs[shard], dict(metadata=self._metadata, timeout=self.call_timeout))
            except grpc.RpcError as err:
                if isinstance(err, PSConfigError):
                    raise
                code = err.code() if hasattr(err, "code") else None
                details = (err.details() if hasattr(err, "details") else None) or ""
                config_error = self._config_error(shard, code, details, probe=not probed)
                probed = probed or code in RETRYABLE
                if config_error is not None:
                    raise config_error from err
                if code not in RETRYABLE or time.monotonic() + delay > deadline:
                    if code in RETRYABLE:
                        self._outage(shard, details, giving_up=True)
                    raise
                self._outage(shard, details)
                log.debug("shard %d (%s) unavailable (%s); retrying in %.2fs", shard,
                          self.targets[shard], details, delay)
                time.sleep(delay * (1 + random.random() * 0.2))
                delay = min(delay * 2, 2.0)
            else:
                self._recovered(shard)
                return result

    def _outage(self, shard: int, details: str, giving_up: bool = False) -> None:
        with self._outage_lock:
            started = self._down_since.get(shard)
            if started is None and giving_up:  # no retries (retry_timeout=0): the error says it
                return
            if started is None:
                self._down_since[shard] = time.monotonic()
                log.warning("shard %d (%s) unreachable (%s); retrying for up to %.0f s "
                            "(PSClient(retry_timeout=...))", shard, self.targets[shard],
                            details.splitlines()[0] if details else "UNAVAILABLE", self.retry_timeout)
            elif giving_up:
                log.error("shard %d (%s) still unreachable after %.1f s: giving up on this call",
                          shard, self.targets[shard], time.monotonic() - started)

    def _recovered(self, shard: int) -> None:
        if shard not in self._down_since:  # no lock on the common path
            return
        with self._outage_lock:
            started = self._down_since.pop(shard, None)
        if started is not None:
            log.warning("shard %d (%s) reachable again after an outage of %.1f s", shard,
                        self.targets[shard], time.monotonic() - started)

    def _config_error(self, shard: int, code, details: str, probe: bool) -> Optional[PSConfigError]:
        """A PSConfigError for a refusal no retry can fix (token, TLS), else None."""
        where = f"shard {shard} ({self.targets[shard]})"
        if code == grpc.StatusCode.UNAUTHENTICATED:
            if self._metadata:
                return AuthenticationError(
                    f"{where} refused the bearer token ({details})",
                    "pass the token the servers were started with as PSClient(token=...)",
                    "give the servers' token with --token-file FILE (or $RADAM_PS_TOKEN)", code, details)
            return AuthenticationError(
                f"{where} needs a bearer token and none was given ({details})",
                "pass the servers' token as PSClient(token=...)",
                "give the servers' token with --token-file FILE (or $RADAM_PS_TOKEN)", code, details)
        if code not in RETRYABLE:
            return None
        text = details.upper()
        if self._tls:
            if "WRONG_VERSION_NUMBER" in text or ("HANDSHAKE" in text and probe
                                                   and not _speaks_tls(self.targets[shard])):
                return TLSMismatchError(
                    f"{where} does not speak TLS (plaintext server), but this client uses TLS",
                    "leave out root_certificates / client_cert, or start the server with "
                    "--tls-cert/--tls-key", "leave out --tls-ca, or start the server with "
                    "--tls-cert/--tls-key", code, details)
            if "CERTIFICATE_REQUIRED" in text or "CERTIFICATE REQUIRED" in text:
                return TLSMismatchError(
                    f"{where} requires a client certificate (mutual TLS) ({details})",
                    "pass client_cert and client_key (PEM bytes or file paths)",
                    "give --tls-cert and --tls-key", code, details)
            if "CERTIFICATE_VERIFY_FAILED" in text or "VERIFY" in text and "HANDSHAKE" in text:
                return TLSMismatchError(
                    f"{where}: TLS handshake failed, the server certificate did not verify "
                    f"({details})", "pass the CA that signed it as root_certificates, and "
                    "server_name_override when the target is a name the certificate does not "
                    "list", "give that CA with --tls-ca, and --tls-server-name when needed",
                    code, details)
            if "HANDSHAKE" in text or "SSL" in text:
                return TLSMismatchError(
                    f"{where}: TLS handshake failed ({details})",
                    "check root_certificates, client_cert / client_key and "
                    "server_name_override", "check --tls-ca, --tls-cert/--tls-key and "
                    "--tls-server-name", code, details)
            return None
        if probe and "REFUSED" not in text and _speaks_tls(self.targets[shard]):
            return TLSMismatchError(
                f"{where} speaks TLS, but this client connects in plaintext",
                "pass root_certificates= (the CA certificate that signed the server's: PEM bytes "
                "or a file path)", "give the CA certificate with --tls-ca FILE", code, details)
        return None

    def _fan_out(self, shards: Iterable[int], fn: Callable[[int], object]) -> Dict[int, object]:
        shards = list(shards)
        if len(shards) == 1:
            return {shards[0]: fn(shards[0])}
        futures = {s: self._pool.submit(fn, s) for s in shards}
        return {s: f.result() for s, f in futures.items()}

    def _collect(self, responses, split: Optional[Dict[str, float]] = None
                 ) -> Tuple[object, Dict[str, np.ndarray]]:
        """(header, values) of a stream of serialized PullResponses (see _stub); ``split``
        gets the seconds spent waiting for messages ("wire_wait") and decoding them."""
        header = None
        assembler = TensorAssembler(1 << 62, frozenset({pb.VALUE}), pool=self._receive_pool)
        messages = TimedStream(responses)
        decoded = 0.0
        for raw in messages:
            start = time.perf_counter()
            message_header, chunk, data = parse_chunk_message(pb, pb.PullResponse, raw)
            if chunk is None:
                header = message_header if message_header is not None else header
            else:
                assembler.add(chunk, data)
            decoded += time.perf_counter() - start
        values = {name: array for (name, _), array in assembler.finish().items()}
        if header is None:
            raise WireError("the server's response stream ended without a PullHeader (damaged "
                            "or cut short); nothing was received")
        if split is not None:
            split["wire_wait"], split["decode"] = messages.waited, decoded
        return header, values

    # -- registration ---------------------------------------------------------------------------
    def register(self, initial_values: Mapping[str, np.ndarray], optimizer_config) -> int:
        """Register the variables and the optimizer on every shard; returns the version.

        Idempotent: a restarted worker registering the same variables and config re-attaches
        (the servers keep their current values); a different config is refused
        (FAILED_PRECONDITION). ``optimizer_config``: an optimizer, its Keras serialization or
        RectifiedAdam keyword arguments.
        """
        from radam_dist.ps.errors import PSError  # keras / TensorFlow: only to register
        from radam_dist.ps.optimizer_config import build_optimizer, to_config

        try:  # a bad learning rate is named here, before any shard or placement question
            build_optimizer(optimizer_config)
        except PSError as err:
            raise OptimizerConfigError(f"register: {err.message}", "fix the optimizer passed to "
                                       "register", "fix the optimizer config", grpc.StatusCode.
                                       INVALID_ARGUMENT, err.message) from None
        config_json = json.dumps(to_config(optimizer_config), sort_keys=True)
        values = {name: np.asarray(v) for name, v in initial_values.items()}
        self.placement = {
            name: placement_mod.place(name, v.shape, v.nbytes, self.num_shards, self.split_threshold_bytes)
            for name, v in values.items()}
        self._specs = {name: (v.dtype.name, tuple(v.shape)) for name, v in values.items()}
        per_shard: Dict[int, Dict[str, np.ndarray]] = {s: {} for s in range(self.num_shards)}
        where: Dict[int, dict] = {s: {} for s in range(self.num_shards)}
        for name, value in values.items():
            p = self.placement[name]
            for shard, part in placement_mod.split_dense(p, value).items():
                per_shard[shard][name] = part
                piece = next(x for x in p.pieces if x.shard == shard)
                where[shard][name] = {"row_start": piece.row_start,
                                      "total_rows": p.shape[0] if p.shape else 0}
        empty = [s for s, v in per_shard.items() if not v]
        if empty:
            raise ValueError(f"shards {empty} would hold no variable ({len(values)} variable(s) "
                             f"over {self.num_shards} shards): give PSClient fewer targets")

        def one(shard: int) -> int:
            def requests():
                yield pb.RegisterRequest(header=pb.RegisterHeader(
                    optimizer_config_json=config_json, job_id=self.job_id,
                    num_shards=self.num_shards, shard_index=shard,
                    placement_json=json.dumps(where[shard])))
                for name, value in sorted(per_shard[shard].items()):
                    yield from chunk_tensor(pb, name, pb.VALUE, value, self.chunk_bytes,
                                            wrap=pb.RegisterRequest)

            response = self._call(shard, lambda stub, kw: stub.Register(requests(), **kw))
            self._saw_version(shard, response.version)
            return response.version

        return min(self._fan_out(range(self.num_shards), one).values())

    def attach(self) -> None:
        """Learn the placement from the servers (for a worker that did not register)."""
        self.placement = placement_mod.placement_from_stats(self.stats())
        if not self.placement:
            raise RuntimeError("nothing is registered on the parameter servers yet")
        self._specs = {}
        for s in self.stats():
            for v in s["variables"]:
                self._specs[v["name"]] = (v["dtype"], self.placement[v["name"]].shape)

    # -- pull -----------------------------------------------------------------------------------
    def pull(self, names: Optional[Sequence[str]] = None,
             if_newer_than: Optional[int] = None) -> Dict[str, np.ndarray]:
        """Current values of ``names`` (all when None). With ``if_newer_than``, only shards whose
        version is newer send values; variables without news are left out."""
        if not self.placement:
            self.attach()
        wanted = list(names) if names is not None else sorted(self.placement)
        unknown = [n for n in wanted if n not in self.placement]
        if unknown:
            raise KeyError(f"unknown variable(s) {unknown}")
        by_shard: Dict[int, List[str]] = {}
        for name in wanted:
            for piece in self.placement[name].pieces:
                by_shard.setdefault(piece.shard, []).append(name)

        def one(shard: int):
            request = pb.PullRequest(names=by_shard[shard], job_id=self.job_id,
                                     if_newer_than=-1 if if_newer_than is None else if_newer_than)
            split = self.last_split[shard] = {}
            try:
                header, values = self._call(shard, lambda stub, kw: self._collect(
                    stub.Pull(request, **kw), split))
            except grpc.RpcError as err:
                raise self._translate(err) from err
            self._saw_version(shard, header.version)
            return values

        parts = self._fan_out(by_shard, one)
        if self.num_shards > 1 and len({self.versions[s] for s in by_shard}) > 1 and self._sync_everywhere():
            # A round committed on shard 0 has not reached every shard (its workers died
            # before delivering it): deliver it, then read again.
            self._catch_up()
            parts = self._fan_out(by_shard, one)
        return self._join(wanted, parts)

    def _saw_version(self, shard: int, version: int) -> None:
        """Versions only grow: a shard answering below one this client saw lost updates."""
        if version < self.versions[shard]:
            raise DataLossError(
                f"shard {shard} ({self.targets[shard]}) is at version {version}, but this client "
                f"already saw version {self.versions[shard]} there: the server lost acknowledged "
                "updates (restored from an older state); stop the job and restore it")
        self.versions[shard] = version

    def _join(self, names, parts: Dict[int, Dict[str, np.ndarray]]) -> Dict[str, np.ndarray]:
        out = {}
        for name in names:
            p = self.placement[name]
            value = placement_mod.join(p, {s: v[name] for s, v in parts.items() if name in v})
            if value is not None:
                out[name] = value
        return out

    # -- push -----------------------------------------------------------------------------------
    def _route(self, gradients: Mapping) -> Dict[int, Dict[str, Tuple[np.ndarray, Optional[np.ndarray]]]]:
        if not self.placement:
            self.attach()
        routed: Dict[int, Dict[str, tuple]] = {s: {} for s in range(self.num_shards)}
        for name, grad in gradients.items():
            if grad is None:
                continue
            values, indices = _to_numpy_gradient(grad)
            if name not in self.placement:
                if self.validate:
                    raise KeyError(f"gradient for unknown variable {name!r}")
                routed[placement_mod.shard_of(name, self.num_shards)][name] = (values, indices)
                continue
            p = self.placement[name]
            if self.validate:
                self._check(name, values, indices)
            if indices is None:
                for shard, part in placement_mod.split_dense(p, values).items():
                    routed[shard][name] = (part, None)
            else:
                for shard, (v, i) in placement_mod.split_sparse(p, values, indices).items():
                    routed[shard][name] = (v, i)
        return routed

    def _check(self, name, values, indices) -> None:
        dtype, shape = self._specs[name]
        if values.dtype.name != dtype:
            raise ValueError(f"gradient of {name!r} has dtype {values.dtype.name}, variable is {dtype}")
        if indices is None:
            if tuple(values.shape) != shape:
                raise ValueError(f"gradient of {name!r} has shape {values.shape}, variable {shape}")
            return
        if indices.ndim != 1 or values.shape != (indices.shape[0],) + shape[1:]:
            raise ValueError(f"sparse gradient of {name!r}: values {values.shape} / indices "
                             f"{indices.shape} do not fit a variable of shape {shape}")
        if indices.size and (indices.min() < 0 or indices.max() >= shape[0]):
            raise ValueError(f"sparse gradient of {name!r}: indices out of range [0, {shape[0]})")

    def _push_requests(self, shard: int, grads: Dict[str, tuple], request_id: str,
                       pull_names: Sequence[str] = (), stage_round: Optional[int] = None,
                       split: Optional[Dict[str, float]] = None):
        """The PushRequests of one shard: the header, then each gradient's serialized chunks
        (``split["encode"]``: seconds spent serializing them)."""
        messages = self._push_messages(shard, grads, request_id, pull_names, stage_round)
        if split is None:
            yield from messages
            return
        split["encode"] = 0.0
        while True:
            t = time.perf_counter()
            message = next(messages, None)
            split["encode"] += time.perf_counter() - t
            if message is None:
                return
            yield message

    def _push_messages(self, shard, grads, request_id, pull_names, stage_round):
        yield pb.PushRequest(header=pb.PushHeader(
            worker_id=self.worker_id,
            base_version=self.versions[shard] if stage_round is None else stage_round,
            request_id=request_id, pull_names=list(pull_names), stage=stage_round is not None,
            job_id=self.job_id))
        for i, (name, (values, indices)) in enumerate(sorted(grads.items())):
            if i == 1 and self._on_phase is not None:
                self._on_phase(f"mid-stream:{shard}")
            if indices is None:
                yield from serialized_chunks(pb, name, pb.GRADIENT, values, pb.PushRequest, self.chunk_bytes)
            else:
                yield from serialized_chunks(pb, name, pb.SPARSE_VALUES, values, pb.PushRequest,
                                             self.chunk_bytes)
                yield from serialized_chunks(pb, name, pb.SPARSE_INDICES, indices, pb.PushRequest,
                                             self.chunk_bytes)

    @staticmethod
    def _translate(err: grpc.RpcError) -> Exception:
        code = err.code()
        details = err.details() or ""
        if code == grpc.StatusCode.DATA_LOSS:
            return DataLossError(details)
        if code == grpc.StatusCode.ABORTED or (
                code == grpc.StatusCode.FAILED_PRECONDITION
                and ("gradients computed at version" in details or "gradients for round" in details)):
            return StaleGradientError(err.details())
        return err

    def push(self, gradients: Mapping) -> int:
        """Push gradients (ndarrays, tf tensors, tf.IndexedSlices or (values, indices) pairs);
        returns the new version (the lowest over the shards). Raises StaleGradientError when
        the server refuses them as stale (pull and recompute) and grpc.RpcError otherwise."""
        routed = self._route(gradients)
        if self._sync_everywhere():
            return self._push_sync(routed)
        request_id = uuid.uuid4().hex
        shards = [s for s, g in routed.items() if g]

        def one(shard: int) -> int:
            try:
                response = self._call(shard, lambda stub, kw: stub.Push(
                    self._push_requests(shard, routed[shard], f"{request_id}-{shard}"), **kw))
            except grpc.RpcError as err:
                raise self._translate(err) from err
            self._saw_version(shard, response.version)
            return response.version

        results = self._fan_out(shards, one)
        return min(results.values()) if results else min(self.versions)

    def push_pull(self, gradients: Mapping, names: Optional[Sequence[str]] = None
                  ) -> Tuple[int, Dict[str, np.ndarray]]:
        """Push, then receive the parameters after the update, in one round trip per shard."""
        if self._sync_everywhere():  # a round is three steps across the shards; then read
            version = self.push(gradients)
            return version, self.pull(names)
        routed = self._route(gradients)
        request_id = uuid.uuid4().hex
        wanted = list(names) if names is not None else sorted(self.placement)
        by_shard: Dict[int, List[str]] = {s: [] for s in range(self.num_shards)}
        for name in wanted:
            for piece in self.placement[name].pieces:
                by_shard[piece.shard].append(name)

        def one(shard: int):
            if not by_shard[shard] and not routed[shard] and not self._sync_everywhere():
                return None
            rid = f"{request_id}-{shard}"

            def call(stub, kw):
                if not by_shard[shard]:  # nothing to pull from this shard: a plain push
                    response = stub.Push(self._push_requests(shard, routed[shard], rid), **kw)
                    return response.version, {}
                split = self.last_split[shard] = {}
                header, values = self._collect(stub.PushPull(
                    self._push_requests(shard, routed[shard], rid, by_shard[shard], split=split), **kw),
                    split)
                return header.version, values

            try:
                version, values = self._call(shard, call)
            except grpc.RpcError as err:
                raise self._translate(err) from err
            self._saw_version(shard, version)
            return values

        parts = {s: v for s, v in self._fan_out(range(self.num_shards), one).items() if v is not None}
        return min(self.versions), self._join(wanted, parts)

    # -- sync rounds (two-phase, docs/PS.md "Sync rounds across shards") -----------------------
    def _phase(self, name: str) -> None:
        if self._on_phase is not None:
            self._on_phase(name)

    def _push_sync(self, routed) -> int:
        """One sync round: ``SyncRound`` stages, commits and applies it."""
        return SyncRound(self, routed).run()

    def _deliver(self, round_: int, members, mac: bytes, shards) -> None:
        """ApplyRound of shard 0's decision on ``shards`` (a round's last phase, or catching
        up a shard a worker that died after the commit left behind)."""
        request = pb.ApplyRoundRequest(round=round_, members=members, decision_mac=mac,
                                       job_id=self.job_id)

        def one(shard: int):
            try:
                response = self._call(shard, lambda stub, kw: stub.ApplyRound(request, **kw))
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.DATA_LOSS:
                    raise DataLossError(f"shard {shard} ({self.targets[shard]}): {err.details()}") from err
                raise RoundIncompleteError(
                    f"round {round_} is committed (shard 0), but shard {shard} "
                    f"({self.targets[shard]}) did not take it: {err.code().name}: {err.details()}; "
                    "the next pull or push delivers it") from err
            self.versions[shard] = max(self.versions[shard], round_ + 1)
            self._phase(f"applied:{shard}")
            return response

        shards = list(shards)
        if shards:
            self._fan_out(shards, one)

    def _catch_up(self, shards: Optional[Sequence[int]] = None, upto: Optional[int] = None) -> None:
        """Deliver to lagging shards the rounds shard 0 committed (a worker that died after the
        commit may have left them behind); asks shard 0 for each round's outcome."""
        stats = self.stats()
        head = stats[0]["version"] if upto is None else min(upto, stats[0]["version"])
        for shard in (range(1, self.num_shards) if shards is None else shards):
            if shard == 0:
                continue
            for round_ in range(stats[shard]["version"], head):
                outcome = self._call(0, lambda stub, kw: stub.CommitRound(pb.CommitRoundRequest(
                    round=round_, query_only=True, job_id=self.job_id), **kw))
                if outcome.outcome != pb.CommitRoundResponse.COMMITTED:
                    break
                log.info("delivering round %d to shard %d (committed on shard 0)", round_, shard)
                self._deliver(round_, list(outcome.members), outcome.decision_mac, [shard])

    def round_outcome(self, round_: int) -> Tuple[str, List[Tuple[str, str]]]:
        """("COMMITTED" | "PENDING", [(worker id, request id)]) of a sync round, from shard 0."""
        r = self._call(0, lambda stub, kw: stub.CommitRound(pb.CommitRoundRequest(
            round=round_, query_only=True, job_id=self.job_id), **kw))
        return (pb.CommitRoundResponse.Outcome.Name(r.outcome),
                [(m.worker_id, m.request_id) for m in r.members])

    def _sync_everywhere(self) -> bool:
        """Sync servers count one push per worker per round, so every shard gets one."""
        if not hasattr(self, "_modes"):
            self._modes = [s["mode"] for s in self.stats()]
        return "sync" in self._modes

    # -- stats, checkpoints -------------------------------------------------------------------
    def stats(self) -> List[dict]:
        def one(shard: int) -> dict:
            response = self._call(shard, lambda stub, kw: stub.Stats(
                pb.StatsRequest(job_id=self.job_id), **kw))
            d = _message_to_dict(response)
            for key, value in list(d.items()):  # int64 arrive as strings in JSON mapping
                if isinstance(value, str) and value.lstrip("-").isdigit() and key != "mode":
                    d[key] = int(value)
            for v in d.get("variables", []):
                v["shape"] = [int(x) for x in v.get("shape", [])]
                v["row_start"] = int(v.get("row_start", 0))
                v["total_rows"] = int(v.get("total_rows", 0))
            return d

        results = self._fan_out(range(self.num_shards), one)
        return [results[s] for s in range(self.num_shards)]

    def save_checkpoint(self) -> List[Tuple[str, int]]:
        def one(shard: int):
            r = self._call(shard, lambda stub, kw: stub.SaveCheckpoint(
                pb.SaveCheckpointRequest(job_id=self.job_id), **kw))
            return r.path, r.version

        results = self._fan_out(range(self.num_shards), one)
        return [results[s] for s in range(self.num_shards)]


class SyncRound:
    """A worker's side of one sync round, in the phases ``rounds.RoundCoordinator`` names on
    the servers (docs/PS.md, "Sync rounds across shards"):

    * ``stage`` -- push to every shard with ``stage=true`` (nothing is applied); a shard behind
      gets the rounds it missed first;
    * ``commit`` -- ask shard 0 to commit; it answers once the round is decided with this
      worker in it, or refuses (ABORTED, DEADLINE_EXCEEDED: abandoned, nothing applied);
    * ``apply`` -- deliver the signed decision to the other shards (``ApplyRound``).

    ``PSClient._on_phase`` hears "staged:<shard>", "committed" and "applied:<shard>" as each
    step completes (tests kill a worker exactly there).
    """

    def __init__(self, client: PSClient, routed: Dict[int, Dict[str, tuple]]):
        self.client = client
        self.routed = routed
        self.round = client.versions[0]
        self.request_id = uuid.uuid4().hex
        self.skipped: Dict[int, bool] = {}  # shard -> this worker's push was not finite there
        self.decision = None  # shard 0's CommitRoundResponse

    def run(self) -> int:
        """Stage, commit, apply; returns the version after the round."""
        self.stage()
        self.commit()
        self.apply()
        return self.round + 1

    def _stage_on(self, shard: int) -> bool:
        client = self.client
        for attempt in range(2):
            try:
                response = client._call(shard, lambda stub, kw: stub.Push(
                    client._push_requests(shard, self.routed[shard], self.request_id,
                                          stage_round=self.round), **kw))
                break
            except grpc.RpcError as err:
                if attempt == 0 and _is_behind(err):  # deliver the rounds it missed, retry
                    client._catch_up([shard], upto=self.round)
                    continue
                raise client._translate(err) from err
        client._phase(f"staged:{shard}")
        return response.skipped

    def stage(self) -> None:
        client = self.client
        if client.stage_sequentially:
            self.skipped = {shard: self._stage_on(shard) for shard in range(client.num_shards)}
        else:
            self.skipped = client._fan_out(range(client.num_shards), self._stage_on)

    def commit(self) -> None:
        client = self.client
        try:
            self.decision = client._call(0, lambda stub, kw: stub.CommitRound(pb.CommitRoundRequest(
                round=self.round, worker_id=client.worker_id, request_id=self.request_id,
                job_id=client.job_id, skipped=any(self.skipped.values())), **kw))
        except grpc.RpcError as err:
            raise client._translate(err) from err
        client._phase("committed")
        client._saw_version(0, self.decision.version)
        if any(m.worker_id == client.worker_id and m.skipped for m in self.decision.members):
            client.skipped_pushes += 1
            log.warning("round %d: this worker's gradient held NaN or Inf on shard(s) %s; it was "
                        "left out of the round on every shard (%d such pushes so far)", self.round,
                        sorted(s for s, v in self.skipped.items() if v), client.skipped_pushes)

    def apply(self) -> None:
        self.client._deliver(self.round, list(self.decision.members), self.decision.decision_mac,
                             range(1, self.client.num_shards))
