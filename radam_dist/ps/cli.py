"""``radam-ps``: run a parameter-server shard, or query one.

    radam-ps serve --port 50051 --mode sync --num-workers 3 --checkpoint-dir /ckpt --wal
    radam-ps stats 127.0.0.1:50051
    radam-ps health 127.0.0.1:50051 --tls-ca ca.pem     # exit 0 when SERVING (probes)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import os
from pathlib import Path
from typing import List, Optional


def _serve_parser(sub) -> None:
    p = sub.add_parser(
        "serve", help="run one shard",
        description="Serve RectifiedAdam / Lookahead parameter updates for one shard.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    net = p.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1", help="address to bind")
    net.add_argument("--port", type=int, default=50051, help="port (0: pick a free one)")
    net.add_argument("--port-file", help="write the bound port here once serving")
    net.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                     help="serve Prometheus metrics at http://HOST:PORT/metrics (plain HTTP, no "
                          "token; 0: pick a free port, logged); unset: no metrics endpoint")
    net.add_argument("--max-threads", type=int, default=64,
                     help="threads serving calls (sync mode: more than --num-workers plus "
                          "--reserved-threads, since each waiting worker holds one)")
    net.add_argument("--reserved-threads", type=int, default=4,
                     help="of --max-threads, kept for health checks and Stats: other calls beyond "
                          "the rest get RESOURCE_EXHAUSTED at once")
    net.add_argument("--stream-idle-timeout", type=float, default=30.0, metavar="SECONDS",
                     help="cancel a client stream (Register, Push, PushPull) that sends nothing "
                          "for this long, freeing its thread and budget; 0: never")
    net.add_argument("--keepalive-time", type=float, default=30.0, metavar="SECONDS",
                     help="ping each connection this often; a frozen or vanished peer's calls end "
                          "within --keepalive-time + --keepalive-timeout")
    net.add_argument("--keepalive-timeout", type=float, default=10.0, metavar="SECONDS",
                     help="drop a connection whose ping is not answered within this")
    training = p.add_argument_group("training")
    training.add_argument("--mode", choices=("sync", "async"), default="async",
                          help="sync: average --num-workers gradients per step; async: apply on arrival")
    training.add_argument("--num-workers", type=int, default=1, help="sync: gradients per step")
    training.add_argument("--sync-timeout", type=float, default=60.0,
                          help="sync: seconds a round waits for missing workers before it is abandoned")
    training.add_argument("--max-staleness", type=int, default=16,
                          help="async: refuse (ABORTED) gradients computed more than this many "
                               "versions ago; -1: no limit")
    training.add_argument("--nonfinite", choices=("reject", "skip"), default="reject",
                          help="NaN/Inf gradients: refuse with INVALID_ARGUMENT, or acknowledge and drop")
    training.add_argument("--max-request-bytes", type=int, default=1 << 31,
                          help="largest tensor payload of one call (RESOURCE_EXHAUSTED beyond)")
    training.add_argument("--max-inflight-bytes", type=int, default=4 << 30,
                          help="tensor bytes all calls in flight may hold together "
                               "(RESOURCE_EXHAUSTED beyond)")
    training.add_argument("--receive-buffer-bytes", type=int, default=1 << 30,
                          help="gradient buffers kept to decode later pushes into once idle "
                               "(saves the page faults of fresh memory); 0: none")
    net.add_argument("--chunk-bytes", type=int, default=1 << 20,
                     help="size of the tensor chunks the server sends (at most 7 MiB)")
    shard = p.add_argument_group("sharding")
    shard.add_argument("--num-shards", type=int, default=1)
    shard.add_argument("--shard-index", type=int, default=0)
    durable = p.add_argument_group("durability")
    durable.add_argument("--checkpoint-dir", help="checkpoints (and the WAL) live here; resume from it")
    durable.add_argument("--checkpoint-interval", type=float, default=300.0,
                         help="seconds between checkpoints (0: only on request and on SIGTERM)")
    durable.add_argument("--keep-checkpoints", type=int, default=2)
    durable.add_argument("--wal", action="store_true",
                         help="write-ahead log: every acknowledged push survives kill -9")
    durable.add_argument("--wal-mark-interval", type=float, default=1.0, metavar="SECONDS",
                         help="with --wal: fsync wal.mark, how far the log reached, this often; a "
                              "log found shorter at a restart is refused (0: only at checkpoints)")
    durable.add_argument("--discard-damaged-state", action="store_true",
                         help="start even if checkpoints or the WAL are damaged or incomplete: move "
                              "the damaged files aside (logged) and continue without their updates; "
                              "without it such a server refuses to start")
    security = p.add_argument_group("security")
    security.add_argument("--token-file", help="bearer token file (default: $RADAM_PS_TOKEN; none: no auth)")
    security.add_argument("--server-key-file",
                          help="secret shared by the job's shards and no worker (default: "
                               "$RADAM_PS_SERVER_KEY): shard 0 signs sync-round decisions with it, "
                               "the others apply only what it signed; required for --mode sync "
                               "with --num-shards > 1")
    security.add_argument("--tls-cert", help="server certificate (PEM)")
    security.add_argument("--tls-key", help="server private key (PEM)")
    security.add_argument("--tls-client-ca", help="CA that signs client certificates: mutual TLS")
    security.add_argument("--insecure", action="store_true",
                          help="allow plaintext on a non-loopback address")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="json: one JSON object per line (ts, level, logger, message, extra fields)")


def _stats_parser(sub) -> None:
    p = sub.add_parser("stats", help="print a shard's statistics as JSON")
    p.add_argument("target", help="host:port")
    p.add_argument("--token-file", help="the servers' bearer token (needed when they run with one)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds (default: %(default)s)")
    p.add_argument("--job-id", default="", help="the job the shard holds (as PSClient(job_id=...))")
    p.add_argument("--tls-ca", help="CA of the server certificate (enables TLS)")
    p.add_argument("--tls-cert", help="client certificate (PEM), for a server with --tls-client-ca")
    p.add_argument("--tls-key", help="client private key (PEM)")
    p.add_argument("--tls-server-name",
                   help="name to verify in the server certificate (when TARGET is an address it does not list)")


def _health_parser(sub) -> None:
    p = sub.add_parser(
        "health", help="one grpc.health.v1 check (exit 0: SERVING), for Docker / Kubernetes probes",
        description="Ask a shard's standard gRPC health service whether it is SERVING; print the "
        "status; exit 0 when SERVING, 1 otherwise. Needs no token. Works as a Kubernetes exec "
        "probe under TLS (the built-in gRPC probe cannot do TLS).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("target", help="host:port")
    p.add_argument("--service", default="",
                   help="health service name ('' is the whole server; radam_dist.ps.v1.ParameterServer)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds")
    p.add_argument("--tls-ca", help="CA of the server certificate (enables TLS)")
    p.add_argument("--tls-cert", help="client certificate (PEM), for a server with --tls-client-ca")
    p.add_argument("--tls-key", help="client private key (PEM)")
    p.add_argument("--tls-server-name",
                   help="name to verify in the server certificate (when TARGET is an address it does not list)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="radam-ps", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _stats_parser(sub)
    _health_parser(sub)
    return parser


def _check_serve_args(parser, args) -> None:
    """Argument errors come before the (slow) grpc and TensorFlow imports."""
    from radam_dist.ps.transport import TLSFiles, check_transport  # no grpc, no TensorFlow

    if not 0 <= args.shard_index < args.num_shards:
        parser.error(f"--shard-index {args.shard_index} is not in [0, --num-shards {args.num_shards})")
    if args.mode == "sync" and args.num_workers < 1:
        parser.error("--num-workers must be >= 1")
    if not 1024 <= args.chunk_bytes <= 7 << 20:
        parser.error("--chunk-bytes must be between 1 KiB and 7 MiB (the message limit is 8 MiB)")
    if args.wal and not args.checkpoint_dir:
        parser.error("--wal needs --checkpoint-dir")
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        parser.error(f"--metrics-port {args.metrics_port} is not a port number (0-65535)")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port {args.port} is not a port number (0-65535)")
    for flag, value, low in (("--max-threads", args.max_threads, 1),
                             ("--max-request-bytes", args.max_request_bytes, 1),
                             ("--max-inflight-bytes", args.max_inflight_bytes, 1),
                             ("--receive-buffer-bytes", args.receive_buffer_bytes, 0),
                             ("--keep-checkpoints", args.keep_checkpoints, 1),
                             ("--max-staleness", args.max_staleness, -1),
                             ("--checkpoint-interval", args.checkpoint_interval, 0)):
        if value < low:
            parser.error(f"{flag} must be >= {low}, got {value}")
    if not 0 <= args.reserved_threads < args.max_threads:
        parser.error(f"--reserved-threads must be in [0, --max-threads {args.max_threads}), got "
                     f"{args.reserved_threads}")
    if args.mode == "sync" and args.max_threads - args.reserved_threads <= args.num_workers:
        parser.error("--max-threads minus --reserved-threads must exceed --num-workers (each "
                     "waiting worker holds a thread)")
    for flag, value in (("--stream-idle-timeout", args.stream_idle_timeout),
                        ("--wal-mark-interval", args.wal_mark_interval)):
        if not value >= 0:
            parser.error(f"{flag} must be >= 0 seconds, got {value}")
    for flag, value in (("--keepalive-time", args.keepalive_time),
                        ("--keepalive-timeout", args.keepalive_timeout)):
        if not value > 0:
            parser.error(f"{flag} must be > 0 seconds, got {value}")
    if not args.sync_timeout > 0:
        parser.error(f"--sync-timeout must be > 0 seconds, got {args.sync_timeout}")
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    if args.tls_client_ca and not args.tls_cert:
        parser.error("--tls-client-ca needs --tls-cert/--tls-key")
    tls = TLSFiles(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    try:
        check_transport(args.host, tls, args.insecure)
    except ValueError as err:
        parser.error(str(err))
    args.tls = tls


def _refuse(err: Exception) -> int:
    logging.getLogger(__name__).error("refusing to start: %s", err)
    print(f"radam-ps serve: refusing to start: {err}", file=sys.stderr)
    return 2


def serve(parser, args) -> int:
    _check_serve_args(parser, args)
    from radam_dist.ps.transport import check_port_free, check_tls_files  # no grpc, no TensorFlow

    try:  # a placeholder or missing TLS file, or a taken port, is named at once, not after the
        check_tls_files(args.tls)  # TensorFlow import
        check_port_free(args.host, args.port, "--port")
        if args.metrics_port:
            check_port_free(args.host, args.metrics_port, "--metrics-port")
    except ValueError as err:
        return _refuse(err)
    if args.checkpoint_dir:  # an unusable directory is named now, not after the TensorFlow import
        try:
            Path(args.checkpoint_dir).mkdir(parents=True, exist_ok=True)
            if not os.access(args.checkpoint_dir, os.W_OK | os.X_OK):
                raise PermissionError(13, "permission denied")
        except OSError as err:
            return _refuse(RuntimeError(f"--checkpoint-dir {args.checkpoint_dir}: cannot create or "
                                        f"write it ({err.strerror or err})"))

    from radam_dist.ps.auth import load_token
    from radam_dist.ps.rounds import load_server_key

    try:
        token = load_token(args.token_file)
    except (OSError, ValueError) as err:
        parser.error(f"cannot read the token: {err}")
    try:
        server_key = load_server_key(args.server_key_file, os.environ)
    except OSError as err:
        parser.error(f"cannot read --server-key-file: {err}")
    except ValueError as err:
        parser.error(str(err))
    if args.mode == "sync" and args.num_shards > 1 and server_key is None:
        return _refuse(ValueError(
            f"sync mode over {args.num_shards} shards needs --server-key-file (or "
            "$RADAM_PS_SERVER_KEY): a secret the job's shards share and no worker holds, with which "
            "shard 0 signs its round decisions; generate one with python -c 'import secrets; "
            "print(secrets.token_urlsafe(32))'"))
    if token is not None and server_key == token.encode():
        return _refuse(ValueError("--server-key-file holds the workers' bearer token: the server "
                                  "key must be a secret no worker has"))
    from radam_dist.ps.server import ParameterServerProcess, PortBindError, serve_forever
    from radam_dist.ps.options import ServeOptions

    options = ServeOptions(
        mode=args.mode, num_workers=args.num_workers, sync_timeout=args.sync_timeout,
        max_staleness=args.max_staleness, shard_index=args.shard_index, num_shards=args.num_shards,
        nonfinite=args.nonfinite, max_request_bytes=args.max_request_bytes,
        max_inflight_bytes=args.max_inflight_bytes, discard_damaged_state=args.discard_damaged_state,
        checkpoint_dir=Path(args.checkpoint_dir) if args.checkpoint_dir else None,
        checkpoint_interval=args.checkpoint_interval, keep_checkpoints=args.keep_checkpoints,
        wal=args.wal, chunk_bytes=args.chunk_bytes, receive_buffer_bytes=args.receive_buffer_bytes,
        server_key=server_key, stream_idle_timeout=args.stream_idle_timeout,
        wal_mark_interval=args.wal_mark_interval)
    if token is None:
        logging.getLogger(__name__).warning("no token configured: calls are not authenticated")
    from radam_dist.ps.storage import DirectoryLockedError, RecoveryError
    from radam_dist import native

    native.library()  # compiled now (once per machine, about 10 s), not in the first push
    try:
        process = ParameterServerProcess(options, host=args.host, port=args.port, token=token,
                                         tls=args.tls, insecure=args.insecure,
                                         max_threads=args.max_threads, metrics_port=args.metrics_port,
                                         reserved_threads=args.reserved_threads,
                                         keepalive_time=args.keepalive_time,
                                         keepalive_timeout=args.keepalive_timeout)
    except (RecoveryError, DirectoryLockedError, ValueError, PortBindError) as err:
        # Never SERVING on damaged state, a directory another server holds, bad TLS files or a
        # port it cannot bind (the directory lock and the log are released by then).
        return _refuse(err)
    except OSError as err:  # the checkpoint directory cannot be written (a full disk, ...)
        return _refuse(_disk_error(err, options.checkpoint_dir))
    try:
        serve_forever(process, args.port_file)
    except PortBindError as err:  # the metrics port
        return _refuse(err)
    return 0


def _disk_error(err: OSError, directory: Optional[Path]) -> Exception:
    """One line for a checkpoint directory that cannot be written at start."""
    import errno
    import shutil

    from radam_dist.ps.storage import space_needed

    if directory is None or err.errno not in (errno.ENOSPC, errno.EDQUOT):
        return RuntimeError(f"{directory}: {err.strerror or err}")
    free = shutil.disk_usage(directory).free
    need = space_needed(directory)
    return RuntimeError(f"{directory}: no space left ({free} bytes free); starting needs about "
                        f"{need} bytes there for a checkpoint of the state (plus the log): free "
                        "space or give --checkpoint-dir a larger volume")


def stats(parser, args) -> int:
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    from radam_dist.ps.auth import load_token

    try:
        token = load_token(args.token_file)  # else $RADAM_PS_TOKEN
    except (OSError, ValueError) as err:
        parser.error(f"--token-file: {err}")
    for flag, path in (("--tls-ca", args.tls_ca), ("--tls-cert", args.tls_cert),
                       ("--tls-key", args.tls_key)):
        if path and not Path(path).is_file():
            parser.error(f"{flag} {path}: no such file")
    import grpc

    from radam_dist.ps.client import PSClient, PSConfigError  # grpc only, no TensorFlow

    client = PSClient([args.target], token=token, job_id=args.job_id, root_certificates=args.tls_ca,
                      client_cert=args.tls_cert, client_key=args.tls_key,
                      server_name_override=args.tls_server_name, retry_timeout=0,
                      call_timeout=args.timeout)
    try:
        print(json.dumps(client.stats()[0], indent=2, sort_keys=True))
    except PSConfigError as err:
        print(f"radam-ps stats: {err.cli_message}", file=sys.stderr)
        return 2
    except grpc.RpcError as err:
        details = (err.details() or "").splitlines()[0] if hasattr(err, "details") else str(err)
        print(f"radam-ps stats: {args.target}: {err.code().name}: {details}", file=sys.stderr)
        return 1
    finally:
        client.close()
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        from radam_dist.ps.jsonlog import configure

        configure(args.log_level, args.log_format)
        return serve(parser, args)
    if args.command == "health":
        if bool(args.tls_cert) != bool(args.tls_key):
            parser.error("--tls-cert and --tls-key go together")
        from radam_dist.ps.health_probe import main as health

        return health(args)
    return stats(parser, args)


if __name__ == "__main__":
    sys.exit(main())
