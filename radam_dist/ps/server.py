"""Start a parameter-server shard: gRPC server, health service, TLS, checkpoint timer."""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import socket
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from radam_dist.ps.auth import BearerTokenInterceptor
from radam_dist.ps.proto import pb_grpc
from radam_dist.ps.service import ServeOptions, ShardService

log = logging.getLogger(__name__)

SERVICE_NAME = "radam_dist.ps.v1.ParameterServer"
MAX_MESSAGE_BYTES = 8 << 20  # chunks are 1 MiB; anything far bigger is refused by gRPC itself


@dataclass
class TLSFiles:
    cert: str
    key: str
    client_ca: Optional[str] = None  # set: mutual TLS (clients must present a cert it signed)


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_transport(host: str, tls: Optional[TLSFiles], insecure: bool) -> None:
    """Plaintext on anything but loopback only with an explicit --insecure."""
    if tls is None and not insecure and not is_loopback(host):
        raise ValueError(
            f"refusing to serve without TLS on {host!r} (not a loopback address): pass "
            "--tls-cert/--tls-key, or --insecure if the network is trusted")


class ParameterServerProcess:
    """A running shard: ``start()`` binds and serves, ``stop()`` checkpoints and shuts down."""

    def __init__(self, options: ServeOptions, host: str = "127.0.0.1", port: int = 0,
                 token: Optional[str] = None, tls: Optional[TLSFiles] = None,
                 insecure: bool = False, max_threads: int = 64):
        check_transport(host, tls, insecure)
        self.options = options
        self.service = ShardService(options)
        self.health = health.HealthServicer()
        interceptors = [BearerTokenInterceptor(token)] if token else []
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="ps"),
            interceptors=interceptors,
            options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                     ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)],
        )
        pb_grpc.add_ParameterServerServicer_to_server(self.service, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if tls is not None:
            credentials = grpc.ssl_server_credentials(
                [(Path(tls.key).read_bytes(), Path(tls.cert).read_bytes())],
                root_certificates=Path(tls.client_ca).read_bytes() if tls.client_ca else None,
                require_client_auth=tls.client_ca is not None,
            )
            self.port = self.server.add_secure_port(address, credentials)
        else:
            self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"could not bind {address}")
        self._stop = threading.Event()
        self._timer: Optional[threading.Thread] = None

    def start(self) -> int:
        self.server.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.options.checkpoint_interval > 0 and self.options.checkpoint_dir is not None:
            self._timer = threading.Thread(target=self._checkpoint_loop, name="checkpointer", daemon=True)
            self._timer.start()
        log.info("shard %d/%d serving on port %d (%s mode)", self.options.shard_index,
                 self.options.num_shards, self.port, self.options.mode)
        return self.port

    def _checkpoint_loop(self) -> None:
        last = None
        while not self._stop.wait(self.options.checkpoint_interval):
            if self.service.store.version != last:
                try:
                    _, last, _ = self.service.save_checkpoint()
                except OSError:
                    log.exception("periodic checkpoint failed")

    def stop(self, grace: float = 5.0) -> None:
        """Stop taking calls, finish the running ones, write a final checkpoint."""
        self._stop.set()
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        self.service.save_checkpoint()
        self.service.close()

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
