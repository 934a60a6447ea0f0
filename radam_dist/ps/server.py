"""Start a parameter-server shard: gRPC server, health service, TLS, checkpoint timer."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from concurrent import futures
from pathlib import Path
from typing import Optional

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from radam_dist.ps.admission import CallLimiter
from radam_dist.ps.auth import BearerTokenInterceptor
# TLSFiles / check_transport / check_tls_files live in transport.py (no grpc, no TensorFlow) so
# that the CLI can check its arguments and files before the slow imports; re-exported here for
# existing callers.
from radam_dist.ps.transport import (  # noqa: F401
    KEEPALIVE_TIME_S, KEEPALIVE_TIMEOUT_S, TLSFiles, check_tls_files,
    check_transport, is_loopback, keepalive_options)
from radam_dist.ps.options import ServeOptions
from radam_dist.ps.service import ShardService, add_to_server

log = logging.getLogger(__name__)

SERVICE_NAME = "radam_dist.ps.v1.ParameterServer"
MAX_MESSAGE_BYTES = 8 << 20  # chunks are 1 MiB; anything far bigger is refused by gRPC itself
class PortBindError(OSError):
    """The gRPC port could not be bound (taken, or an address this host does not have)."""


class ParameterServerProcess:
    """A running shard: ``start()`` binds and serves, ``stop()`` checkpoints and shuts down."""

    def __init__(self, options: ServeOptions, host: str = "127.0.0.1", port: int = 0,
                 token: Optional[str] = None, tls: Optional[TLSFiles] = None,
                 insecure: bool = False, max_threads: int = 64, metrics_port: Optional[int] = None,
                 reserved_threads: int = 4, keepalive_time: float = KEEPALIVE_TIME_S,
                 keepalive_timeout: float = KEEPALIVE_TIMEOUT_S):
        check_transport(host, tls, insecure)
        if not 0 <= reserved_threads < max_threads:
            raise ValueError(f"reserved_threads must be in [0, max_threads {max_threads}), got "
                             f"{reserved_threads}")
        if token is not None and options.server_key is not None and token.encode() == options.server_key:
            raise ValueError("--server-key-file holds the workers' bearer token: the server key "
                             "must be a secret no worker has, or a worker could sign round decisions")
        self.keepalive = (keepalive_time, keepalive_timeout)
        check_tls_files(tls)
        self.options = options
        self.host, self.metrics_port = host, metrics_port  # metrics_port 0: pick a free one
        self.service = ShardService(options)
        try:
            self._setup(host, port, token, tls, max_threads, reserved_threads)
        except BaseException:
            # Whatever fails after the service exists (grpcio >= 1.85 raises RuntimeError from
            # add_*_port for a taken port instead of returning 0) must release the directory
            # lock and the log, so a second attempt in this process can start.
            self.service.close()
            self.service.metrics.close()
            raise

    def _setup(self, host, port, token, tls, max_threads, reserved_threads) -> None:
        self.health = health.HealthServicer()
        self.service.on_fail_stop = self._not_serving
        # Metrics first: it sees (and counts) the calls that authentication refuses. The limiter
        # comes after authentication, so unauthenticated calls cannot take its places.
        interceptors = [self.service.metrics.interceptor()]
        interceptors += [BearerTokenInterceptor(token)] if token else []
        self.limiter = CallLimiter(max_threads - reserved_threads, reserved_threads,
                                   self.service.metrics.calls_over_limit)
        interceptors.append(self.limiter)
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="ps"),
            interceptors=interceptors,
            # No SO_REUSEPORT: a second server on a taken port must fail, not share it.
            options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                     ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                     ("grpc.so_reuseport", 0)] + keepalive_options(*self.keepalive),
        )
        add_to_server(self.service, self.server)  # tensor streams without protobuf copies
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if tls is not None:
            credentials = grpc.ssl_server_credentials(
                [(Path(tls.key).read_bytes(), Path(tls.cert).read_bytes())],
                root_certificates=Path(tls.client_ca).read_bytes() if tls.client_ca else None,
                require_client_auth=tls.client_ca is not None,
            )
            add_port = lambda: self.server.add_secure_port(address, credentials)  # noqa: E731
        else:
            add_port = lambda: self.server.add_insecure_port(address)  # noqa: E731
        try:
            self.port = add_port()
        except RuntimeError as err:  # grpcio >= 1.85
            raise PortBindError(f"cannot listen on {address}: {err} (is the port in use?)") from err
        if self.port == 0:  # older grpcio
            raise PortBindError(f"cannot listen on {address} (is the port in use?)")
        if self.service.lock is not None:  # name the holder completely
            self.service.lock.update(port=self.port, address=address)
        self._stop = threading.Event()
        self._threads: list = []

    def start(self) -> int:
        if self.metrics_port is not None:  # first: a taken port fails before any call is served
            try:
                self.metrics_port = self.service.metrics.serve_http(self.host.strip("[]"), self.metrics_port)
            except OSError as err:
                self.service.close()
                raise PortBindError(
                    f"cannot serve metrics on {self.host}:{self.metrics_port}: {err}") from err
            log.info("metrics on http://%s:%d/metrics", self.host, self.metrics_port)
        self.server.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.options.checkpoint_interval > 0 and self.options.checkpoint_dir is not None:
            self._threads.append(threading.Thread(target=self._checkpoint_loop, name="checkpointer",
                                                  daemon=True))
        if self.options.wal and self.options.wal_mark_interval > 0:
            self._threads.append(threading.Thread(target=self._mark_loop, name="wal-mark", daemon=True))
        for thread in self._threads:
            thread.start()
        log.info("shard %d/%d serving on port %d (%s mode)", self.options.shard_index,
                 self.options.num_shards, self.port, self.options.mode)
        return self.port

    def _checkpoint_loop(self) -> None:
        last = None
        while not self._stop.wait(self.options.checkpoint_interval):
            if self.service.store.version != last:
                try:
                    _, last, _ = self.service.save_checkpoint()
                except OSError as err:  # (a full disk) its temporary file is gone; try next time
                    log.error("periodic checkpoint failed: %s; the next one is tried in %gs",
                              err, self.options.checkpoint_interval)

    def _mark_loop(self) -> None:
        """wal.mark every --wal-mark-interval (storage.WalMark says why)."""
        failing = False
        while not self._stop.wait(self.options.wal_mark_interval):
            try:
                self.service.write_wal_mark()
                failing = False
            except OSError as err:
                if not failing:
                    log.error("writing wal.mark failed: %s (retried every %gs)", err,
                              self.options.wal_mark_interval)
                failing = True

    def _not_serving(self, reason: str) -> None:
        """Fail-stop (the write-ahead log broke): probes see NOT_SERVING, a restart recovers."""
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    def stop(self, grace: float = 5.0) -> None:
        """Stop taking calls, finish the running ones, write a final checkpoint."""
        self._stop.set()
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        for thread in self._threads:  # a periodic checkpoint in progress finishes first
            thread.join()
        self._threads = []
        self.service.save_checkpoint()  # (not after a fail-stop: the directory stays as it is)
        self.service.write_wal_mark()
        self.service.close()
        self.service.metrics.close()

    def wait(self) -> None:
        self.server.wait_for_termination()


def serve_forever(process: ParameterServerProcess, port_file: Optional[str] = None) -> None:
    """Run until SIGTERM / SIGINT, then checkpoint and exit."""
    port = process.start()
    if port_file:
        tmp = f"{port_file}.tmp"
        Path(tmp).write_text(f"{port}\n")
        os.replace(tmp, port_file)
    done = threading.Event()

    def on_signal(signum, frame):
        log.info("signal %d: checkpointing and shutting down", signum)
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not done.wait(0.5):
        pass
    process.stop()
    log.info("stopped")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
