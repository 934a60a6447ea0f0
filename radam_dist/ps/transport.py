"""TLS settings and the plaintext rule, shared by ``radam-ps serve`` and ``radam-ps health``.

Free of grpc and TensorFlow imports, so the CLI checks its arguments and TLS files (and refuses
bad ones within a fraction of a second) before anything slow is imported.
"""

from __future__ import annotations

import ipaddress
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
