"""Prometheus metrics of one parameter-server shard (``radam-ps serve --metrics-port``).

Every shard owns a private ``CollectorRegistry``: several shards (or tests) in one process
never share or double-count series, and nothing lands in prometheus_client's global registry.

Where each number comes from:

* ``radam_ps_requests_total{method,code}``, ``radam_ps_bytes_{received,sent}_total`` and
  ``radam_ps_push_seconds{method}``: a gRPC server interceptor (:meth:`PSMetrics.interceptor`) that sits
  in front of authentication, so refused calls (UNAUTHENTICATED, ABORTED, ...) are counted and
  logged too. Bytes are the serialized protobuf messages of each call (no HTTP/2 framing),
  counted in the (de)serializers, so the megabyte chunks are not encoded a second time.
* ``radam_ps_apply_seconds``, ``radam_ps_wal_fsync_seconds``, ``radam_ps_checkpoint_seconds``,
  ``radam_ps_staleness`` and ``radam_ps_sync_round_timeouts_total``: one-line calls in the
  service where the work happens.
* ``radam_ps_version`` / ``radam_ps_step``: read from the store at scrape time.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional, Tuple

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector
from prometheus_client.exposition import start_http_server

from radam_dist.ps.admission import rewrap_handler

log = logging.getLogger(__name__)

_OWN_SERVICE = "/radam_dist.ps.v1.ParameterServer/"
# The calls of one push: async Push/PushPull apply; sync ones stage, and the worker then waits
# in CommitRound (shard 0) and delivers the outcome with ApplyRound (other shards).
PUSH_METHODS = ("Push", "PushPull", "CommitRound", "ApplyRound")

# Seconds: a push in sync mode includes the wait for the round's other workers (up to
# --sync-timeout), so the buckets reach minutes.
_CALL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                 30.0, 60.0, 120.0, 300.0)
_APPLY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                  0.5, 1.0, 2.5, 5.0)
_FSYNC_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                  0.5, 1.0)
_CHECKPOINT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128)
LOG_WINDOW_S = 10.0  # refusals of one method and code: at most LOG_PER_WINDOW log lines per window
LOG_PER_WINDOW = 20


def method_label(full_method: str) -> str:
    """``/radam_dist.ps.v1.ParameterServer/Push`` -> ``Push``; other services keep their name."""
    if full_method.startswith(_OWN_SERVICE):
        return full_method[len(_OWN_SERVICE):]
    return full_method.lstrip("/") or "unknown"


class PSMetrics:
    """The metric objects of one shard, in a registry of their own."""

    def __init__(self, state: Optional[Callable[[], Tuple[int, int]]] = None, options=None):
        """``state()`` -> (version, step), read at each scrape; ``options``: ServeOptions."""
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("radam_ps_requests", "gRPC calls answered, by method and status code",
                                ["method", "code"], registry=r)
        self.bytes_received = Counter("radam_ps_bytes_received",
                                      "serialized request messages received (bytes)", registry=r)
        self.bytes_sent = Counter("radam_ps_bytes_sent", "serialized response messages sent (bytes)",
                                  registry=r)
        self.push_seconds = Histogram(
            "radam_ps_push_seconds",
            "wall time of push calls answered OK, by method (sync: CommitRound holds the wait "
            "for the round's other workers)", ["method"], buckets=_CALL_BUCKETS, registry=r)
        self.apply_seconds = Histogram("radam_ps_apply_seconds", "time to apply one optimizer step",
                                       buckets=_APPLY_BUCKETS, registry=r)
        self.wal_fsync_seconds = Histogram(
            "radam_ps_wal_fsync_seconds", "time to append and fsync one write-ahead log record",
            buckets=_FSYNC_BUCKETS, registry=r)
        self.checkpoint_seconds = Histogram(
            "radam_ps_checkpoint_seconds", "time to write (and fsync) one checkpoint",
            buckets=_CHECKPOINT_BUCKETS, registry=r)
        self.staleness = Histogram(
            "radam_ps_staleness",
            "async mode: versions between a push's base version and the server's (refused ones too)",
            buckets=_STALENESS_BUCKETS, registry=r)
        self.sync_round_timeouts = Counter(
            "radam_ps_sync_round_timeouts", "sync rounds abandoned because workers did not come",
            registry=r)
        self.round_members_skipped = Counter(
            "radam_ps_round_members_skipped",
            "sync: round members left out of the mean on every shard (non-finite gradient on some "
            "shard, --nonfinite skip); counted by the coordinator", registry=r)
        self.data_loss = Counter(
            "radam_ps_data_loss", "calls that showed this server lost acknowledged updates "
            "(answered DATA_LOSS)", registry=r)
        self.streams_idle_cancelled = Counter(
            "radam_ps_streams_idle_cancelled",
            "client streams cancelled after --stream-idle-timeout without a message", registry=r)
        self.calls_over_limit = Counter(
            "radam_ps_calls_over_limit",
            "calls refused RESOURCE_EXHAUSTED because --max-threads minus --reserved-threads were "
            "running", registry=r)
        self.inflight_bytes = Gauge(
            "radam_ps_inflight_bytes", "tensor bytes held by calls in flight and staged sync pushes "
            "(bounded by --max-inflight-bytes)", registry=r)
        self.version = Gauge("radam_ps_version", "updates applied to this shard's state", registry=r)
        self.step = Gauge("radam_ps_step", "optimizer step of this shard", registry=r)
        self.info = Info("radam_ps_shard", "static facts about this shard", registry=r)
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
        self._http = None
        self._log_lock = threading.Lock()
        self._log_windows: dict = {}  # (method, code) -> (window start, lines logged, skipped)
        if options is not None:
            self.info.info({"mode": str(options.mode), "shard_index": str(options.shard_index),
                            "num_shards": str(options.num_shards)})
        if state is not None:
            self.version.set_function(lambda: float(state()[0]))
            self.step.set_function(lambda: float(state()[1]))

    # -- HTTP endpoint ----------------------------------------------------------------------
    def serve_http(self, host: str, port: int) -> int:
        """Serve ``/metrics`` (Prometheus text format) on ``host:port``; returns the bound port."""
        httpd, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = httpd
        return httpd.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    # -- gRPC -------------------------------------------------------------------------------
    def interceptor(self) -> grpc.ServerInterceptor:
        return _MetricsInterceptor(self)

    def _record(self, method: str, code: str, started: float, context) -> None:
        self.requests.labels(method, code).inc()
        if code == "OK":
            if method in PUSH_METHODS:
                self.push_seconds.labels(method).observe(time.perf_counter() - started)
            return
        details = ""
        try:
            details = context.details() or ""
            details = details.decode(errors="replace") if isinstance(details, bytes) else details
        except Exception:  # noqa: BLE001 - a context without details() must not break the call
            pass
        suppressed = self._log_budget(method, code)
        if suppressed is None:
            return
        level = logging.INFO if code == "CANCELLED" else logging.WARNING
        peer = _peer(context)
        more = f" ({suppressed} more like it in the last {LOG_WINDOW_S:g}s not logged)" if suppressed else ""
        log.log(level, "refused %s from %s: %s %s%s", method, peer, code, details, more,
                extra={"method": method, "code": code, "peer": peer, "details": details,
                       "suppressed": suppressed})

    def _log_budget(self, method: str, code: str) -> Optional[int]:
        """None: do not log (a flood of refusals, e.g. a client with a wrong token, logs at
        most LOG_PER_WINDOW lines per method and code per window); else how many were skipped."""
        now = time.monotonic()
        with self._log_lock:
            start, logged, skipped = self._log_windows.get((method, code), (now, 0, 0))
            if now - start >= LOG_WINDOW_S:
                start, logged = now, 0
            if logged >= LOG_PER_WINDOW:
                self._log_windows[(method, code)] = (start, logged, skipped + 1)
                return None
            self._log_windows[(method, code)] = (start, logged + 1, 0)
            return skipped


def _peer(context) -> str:
    try:
        return context.peer()
    except Exception:  # noqa: BLE001
        return "?"


def _code_name(context, default: str) -> str:
    code = None
    try:
        code = context.code()
    except Exception:  # noqa: BLE001 - very old grpcio has no code()
        pass
    if code is None:
        return default
    return code.name if isinstance(code, grpc.StatusCode) else str(code)


class _MetricsInterceptor(grpc.ServerInterceptor):
    """Counts every call by method and final status code, and the bytes each way."""

    def __init__(self, metrics: PSMetrics):
        self._m = metrics

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:  # unknown method: gRPC answers UNIMPLEMENTED itself. One label for
            # all of them: a client must not be able to mint new series by inventing names.
            self._m.requests.labels("unknown", "UNIMPLEMENTED").inc()
            return None
        method = method_label(handler_call_details.method or "")
        m = self._m

        # Bytes are counted where gRPC (de)serializes each message: len() of bytes it already
        # has, no second encoding of megabyte chunks.
        deserialize, serialize = handler.request_deserializer, handler.response_serializer

        def counting_deserializer(raw: bytes):
            m.bytes_received.inc(len(raw))
            return deserialize(raw) if deserialize is not None else raw

        def counting_serializer(message) -> bytes:
            data = serialize(message) if serialize is not None else message
            m.bytes_sent.inc(len(data))
            return data

        def unary_response(behavior):
            def wrapped(request, context):
                started = time.perf_counter()
                try:
                    response = behavior(request, context)
                except BaseException:
                    m._record(method, _code_name(context, "UNKNOWN"), started, context)
                    raise
                m._record(method, _code_name(context, "OK"), started, context)
                return response
            return wrapped

        def stream_response(behavior):
            def wrapped(request, context):
                started = time.perf_counter()
                code = None
                try:
                    yield from behavior(request, context)
                    code = _code_name(context, "OK")
                except GeneratorExit:  # the client went away mid-stream
                    code = "CANCELLED"
                    raise
                except BaseException:
                    code = _code_name(context, "UNKNOWN")
                    raise
                finally:
                    m._record(method, code or "UNKNOWN", started, context)
            return wrapped

        return rewrap_handler(handler, unary_response, stream_response,
                              request_deserializer=counting_deserializer,
                              response_serializer=counting_serializer)
