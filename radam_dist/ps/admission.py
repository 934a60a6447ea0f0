"""What keeps one client from starving the others: a cap on concurrent calls that leaves
threads for health checks and Stats, and an idle deadline on client streams.

gRPC's synchronous server runs every call on a thread of one pool and a client stream that
stops sending holds its thread for as long as the connection lives. Without these, 64 streams
that send a header and stall take every thread, and health probes and Stats time out.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Dict, Optional

import grpc

log = logging.getLogger(__name__)

HEALTH_PREFIX = "/grpc.health.v1.Health/"
LIGHT_METHODS = frozenset({"/radam_dist.ps.v1.ParameterServer/Stats"})


def rewrap_handler(handler, unary: Callable, stream: Callable, **kwargs):
    """``handler`` with its behaviour wrapped: ``unary(behavior)`` for calls with one response,
    ``stream(behavior)`` for streamed responses; ``kwargs`` override the (de)serializers."""
    kwargs.setdefault("request_deserializer", handler.request_deserializer)
    kwargs.setdefault("response_serializer", handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(stream(handler.stream_stream), **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(stream(handler.unary_stream), **kwargs)
    return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), **kwargs)


def refusing_handler(handler, code: grpc.StatusCode, message: str):
    """A handler of ``handler``'s shape that answers ``code`` at once (its behaviour never runs)."""
    def deny(request, context):
        context.abort(code, message)

    def deny_stream(request, context):
        context.abort(code, message)
        yield  # pragma: no cover - abort raises

    return rewrap_handler(handler, lambda _: deny, lambda _: deny_stream)


class CallLimiter(grpc.ServerInterceptor):
    """At most ``limit`` calls other than health checks and Stats at once; more get
    RESOURCE_EXHAUSTED before they take a thread for longer than it takes to say so.

    The pool has ``limit + reserved`` threads, so health probes and Stats always find one."""

    def __init__(self, limit: int, reserved: int, refusals=None):
        """``refusals``: a counter (``inc()``) of the calls refused, e.g. a Prometheus one."""
        self.limit, self.reserved, self._refusals = limit, reserved, refusals
        self.active = 0
        self.refused = 0
        self._lock = threading.Lock()

    def _leave(self) -> None:
        with self._lock:
            self.active -= 1

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None or method.startswith(HEALTH_PREFIX) or method in LIGHT_METHODS:
            return handler
        with self._lock:
            if self.active >= self.limit:
                self.refused += 1
                full = True
            else:
                self.active += 1
                full = False
        if full:
            if self._refusals is not None:
                self._refusals.inc()
            return refusing_handler(
                handler, grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this server is running {self.limit} calls at once (--max-threads minus the "
                f"{self.reserved} --reserved-threads kept for health checks and Stats); retry later")

        def unary(behavior):
            def wrapped(request, context):
                try:
                    return behavior(request, context)
                finally:
                    self._leave()
            return wrapped

        def stream(behavior):
            def wrapped(request, context):
                try:
                    yield from behavior(request, context)
                finally:
                    self._leave()
            return wrapped

        return rewrap_handler(handler, unary, stream)


class _Watched:
    """A request stream whose waits for the next message the watchdog can see."""

    __slots__ = ("_messages", "_owner", "context", "method", "waiting_since")

    def __init__(self, messages, owner: "IdleStreams", context, method: str):
        self._messages, self._owner, self.context, self.method = iter(messages), owner, context, method
        self.waiting_since: Optional[float] = None

    def __iter__(self) -> "_Watched":
        return self

    def __next__(self):
        self.waiting_since = time.monotonic()
        try:
            return next(self._messages)
        except StopIteration:
            self.close()
            raise
        finally:
            self.waiting_since = None

    def close(self) -> None:
        self._owner._forget(self)


class IdleStreams:
    """Cancels client streams that have waited more than ``timeout`` seconds for their next
    message: a stalled (or frozen, or malicious) client gives its thread and its share of the
    in-flight budget back. One daemon thread, started with the first stream."""

    def __init__(self, timeout: float, cancellations=None):
        """``cancellations``: a counter (``inc()``) of the streams cancelled."""
        self.timeout, self._cancellations = timeout, cancellations
        self.cancelled = 0
        self._streams: Dict[int, _Watched] = {}
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None

    def watch(self, messages, context, method: str):
        """``messages`` as an iterator the watchdog oversees (close() it when the call ends)."""
        watched = _Watched(messages, self, context, method)
        if self.timeout <= 0 or context is None:
            return watched
        with self._lock:
            self._streams[id(watched)] = watched
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="idle-streams", daemon=True)
                self._thread.start()
        return watched

    def _forget(self, watched: _Watched) -> None:
        with self._lock:
            self._streams.pop(id(watched), None)

    def _run(self) -> None:
        period = min(1.0, self.timeout / 4)
        while True:
            time.sleep(period)
            now = time.monotonic()
            with self._lock:
                idle = [w for w in self._streams.values()
                        if w.waiting_since is not None and now - w.waiting_since > self.timeout]
                for w in idle:
                    self._streams.pop(id(w), None)
            for w in idle:
                self.cancelled += 1
                if self._cancellations is not None:
                    self._cancellations.inc()
                try:
                    peer = w.context.peer()
                except Exception:  # noqa: BLE001
                    peer = "?"
                log.warning("%s stream from %s sent nothing for %.0fs (--stream-idle-timeout "
                            "%gs): cancelled, its thread and budget freed", w.method, peer,
                            now - w.waiting_since if w.waiting_since else self.timeout, self.timeout)
                w.context.cancel()
