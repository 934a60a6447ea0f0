"""``radam-ps health HOST:PORT``: one grpc.health.v1 Check, for Docker HEALTHCHECK and Kubernetes
exec probes, with or without TLS.

Kubernetes' built-in gRPC probe cannot do TLS; an exec probe running this command can. It
imports grpc and the health stubs only (no TensorFlow), so a probe costs a fraction of a second.
Exit status: 0 SERVING, 1 anything else (NOT_SERVING, UNKNOWN, unreachable, refused TLS, ...).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

SERVICE_NAME = "radam_dist.ps.v1.ParameterServer"  # what a shard reports (server.SERVICE_NAME)


def _read(path: Optional[str]) -> Optional[bytes]:
    return Path(path).read_bytes() if path else None


def check(target: str, service: str = "", timeout: float = 5.0, tls_ca: Optional[str] = None,
          tls_cert: Optional[str] = None, tls_key: Optional[str] = None,
          server_name: Optional[str] = None) -> str:
    """The serving status of ``service`` at ``target`` ("SERVING", "NOT_SERVING", ...).

    ``tls_ca`` turns TLS on (the CA that signed the server's certificate); ``tls_cert`` and
    ``tls_key`` add a client certificate for a server started with ``--tls-client-ca``;
    ``server_name`` is the name to verify in the server's certificate when ``target`` is an
    address the certificate does not list. Raises grpc.RpcError when the call fails.
    """
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    if tls_ca or tls_cert:
        credentials = grpc.ssl_channel_credentials(_read(tls_ca), _read(tls_key), _read(tls_cert))
        channel = grpc.secure_channel(target, credentials, options)
    else:
        channel = grpc.insecure_channel(target, options)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(args) -> int:
    """Run by radam_dist.ps.cli for ``radam-ps health``; prints the status, returns the exit code."""
    from radam_dist._requirements import require_grpc

    require_grpc()
    import grpc

    try:
        status = check(args.target, args.service, args.timeout, args.tls_ca, args.tls_cert,
                       args.tls_key, args.tls_server_name)
    except grpc.RpcError as err:
        print(f"{args.target}: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    print(status)
    return 0 if status == "SERVING" else 1
