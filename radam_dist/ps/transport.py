"""TLS settings, the plaintext rule, keepalive and port checks, shared by ``radam-ps serve``,
``radam-ps health`` and ``PSClient``.

Free of grpc and TensorFlow imports, so the CLI checks its arguments, TLS files and ports (and
refuses bad ones within a fraction of a second) before anything slow is imported.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


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


def check_tls_files(tls: Optional[TLSFiles]) -> None:
    """ValueError naming the file and what is wrong with it, before gRPC sees it (gRPC would
    only say "Failed to bind to address")."""
    if tls is None:
        return
    for label, path in (("--tls-cert", tls.cert), ("--tls-key", tls.key),
                        ("--tls-client-ca", tls.client_ca)):
        if path is None:
            continue
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"{label} {path}: no such file")
        try:
            text = p.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"{label} {path}: cannot read it as PEM text ({err})") from err
        key = label == "--tls-key"
        wanted = "PRIVATE KEY-----" if key else "-----BEGIN CERTIFICATE-----"
        if wanted not in text:
            raise ValueError(f"{label} {path}: not a PEM {'private key' if key else 'certificate'} "
                             f"(no '{wanted}' block; a placeholder?)")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(tls.cert, tls.key)
    except ssl.SSLError as err:
        raise ValueError(f"--tls-cert {tls.cert} / --tls-key {tls.key}: the certificate and key do "
                         f"not load or do not belong together ({err.reason or err})") from err
    if tls.client_ca:
        try:
            context.load_verify_locations(tls.client_ca)
        except ssl.SSLError as err:
            raise ValueError(f"--tls-client-ca {tls.client_ca}: not a usable CA certificate "
                             f"({err.reason or err})") from err


KEEPALIVE_TIME_S, KEEPALIVE_TIMEOUT_S = 30.0, 10.0


def keepalive_options(time_s: float = KEEPALIVE_TIME_S, timeout_s: float = KEEPALIVE_TIMEOUT_S,
                      server: bool = True) -> list:
    """Keepalive (docs/PS.md): ping each connection every ``time_s``, drop it when no answer
    comes within ``timeout_s``, so calls of a vanished or frozen peer end within
    ``time_s + timeout_s``. gRPC waits ``grpc.http2.ping_timeout_ms`` (60 s by default) for a
    ping's answer whatever ``grpc.keepalive_timeout_ms`` says, so both are set."""
    options = [("grpc.keepalive_time_ms", int(time_s * 1000)),
               ("grpc.keepalive_timeout_ms", int(timeout_s * 1000)),
               ("grpc.http2.ping_timeout_ms", int(timeout_s * 1000)),
               ("grpc.keepalive_permit_without_calls", 1)]
    if server:  # accept the clients' pings (they ping every keepalive_time_s too)
        options += [("grpc.http2.min_recv_ping_interval_without_data_ms",
                     int(min(time_s, 10.0) * 1000 / 2)),
                    ("grpc.http2.max_ping_strikes", 0)]
    else:
        options += [("grpc.http2.max_pings_without_data", 0)]
    return options


def check_port_free(host: str, port: int, flag: str) -> None:
    """ValueError naming ``flag`` when ``host:port`` is taken (bound without SO_REUSEPORT, as the
    server binds it: a port another process holds is refused, never shared). Port 0: nothing
    to check."""
    if port == 0:
        return
    bare = host.strip("[]")
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not "taken"
        try:
            probe.bind((bare, port))
        except OSError as err:
            raise ValueError(f"{flag} {port}: cannot listen on {host}:{port}: {err.strerror or err} "
                             "(another process holds the port; pick another or stop it)") from None
