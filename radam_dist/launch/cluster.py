"""TF_CONFIG for local clusters, the role a process plays in one, and waiting for its peers.

``tf.distribute`` reads the cluster layout from the ``TF_CONFIG`` environment variable. On
Kubernetes (deploy/k8s/) or another platform it is set for you; ``radam-dist launch`` sets it
for processes on this machine. Training scripts read it through the helpers here, so the same
script runs unchanged in both places. Standard library only (no TensorFlow): the strategy
TF_CONFIG calls for is ``radam_dist.distribute.strategy_from_environment``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from typing import Dict, List, Optional, Tuple

from radam_dist import _env

# The logger keeps the name it had before the module moved here: log filters and the lines
# tasks print stay the same.
log = logging.getLogger("radam_dist.distribute.cluster")


def free_loopback_ports(count: int, host: str = "127.0.0.1") -> List[int]:
    """``count`` distinct ports the kernel says are free now (bind port 0, keep all open
    until every port is chosen so none is handed out twice)."""
    with contextlib.ExitStack() as stack:
        sockets = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]


def task_names(workers: int, ps: int = 0) -> List[str]:
    """``chief:0`` (PSS only), ``worker:0``..., ``ps:0``...: the tasks of a local cluster."""
    return ((["chief:0"] if ps else []) + [f"worker:{i}" for i in range(workers)]
            + [f"ps:{i}" for i in range(ps)])


def local_cluster_spec(workers: int, ps: int = 0, host: str = "127.0.0.1",
                       placements: Optional[Dict[str, Tuple[str, str]]] = None
                       ) -> Dict[str, List[str]]:
    """A cluster of ``workers`` workers on free ports of ``host``, plus, when ``ps`` > 0, that
    many parameter servers and the one chief (the ClusterCoordinator) that PSS needs.

    ``placements`` maps a task (``"worker:1"``) to ``(network namespace, address)``: that
    task's port is chosen free on that address inside that namespace (see ``netns``).
    """
    if workers < 1:
        raise ValueError(f"a cluster needs at least one worker, got workers={workers}")
    if ps < 0:
        raise ValueError(f"ps must be >= 0, got {ps}")
    names = task_names(workers, ps)
    placements = dict(placements or {})
    unknown = sorted(set(placements) - set(names))
    if unknown:
        raise ValueError(f"no task {', '.join(unknown)} in this cluster "
                         f"(tasks: {', '.join(names)})")
    local = [n for n in names if n not in placements]
    ports = iter(free_loopback_ports(len(local), host))
    address = {n: f"{host}:{next(ports)}" for n in local}
    if placements:
        from radam_dist.launch import netns

        # One request per (namespace, address): ports asked for one at a time could repeat.
        hosts: Dict[tuple, List[str]] = {}
        for name, where in placements.items():
            hosts.setdefault(tuple(where), []).append(name)
        for (namespace, addr), tasks in hosts.items():
            for name, port in zip(tasks, netns.free_ports_in(namespace, addr, len(tasks))):
                address[name] = f"{addr}:{port}"
    spec: Dict[str, List[str]] = {}
    for name in names:
        task_type = name.split(":")[0]
        spec.setdefault(task_type, []).append(address[name])
    return spec


def tf_config(cluster: Dict[str, List[str]], task_type: str, task_index: int) -> str:
    """The TF_CONFIG JSON for one task of ``cluster``."""
    if task_type not in cluster or not 0 <= task_index < len(cluster[task_type]):
        raise ValueError(f"no task {task_type}:{task_index} in cluster {cluster}")
    return json.dumps({"cluster": cluster, "task": {"type": task_type, "index": task_index}})


PEER_TIMEOUT_ENV = "RADAM_DIST_PEER_TIMEOUT"
DEFAULT_PEER_TIMEOUT = 600.0


def read_tf_config() -> Optional[Dict]:
    """TF_CONFIG, parsed and checked (ValueError naming what to fix), or None when unset."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except ValueError as err:
        raise ValueError(f"TF_CONFIG is not JSON ({err}): set it to "
                         '{"cluster": {"worker": ["host:port", ...]}, '
                         '"task": {"type": "worker", "index": 0}}') from None
    if not isinstance(config, dict) or not isinstance(config.get("cluster", {}), dict):
        raise ValueError("TF_CONFIG must be a JSON object with \"cluster\" (job -> [host:port]) "
                         "and \"task\" ({\"type\", \"index\"})")
    cluster, task = config.get("cluster", {}), config.get("task")
    if cluster and task is not None:
        kind, index = (task or {}).get("type"), (task or {}).get("index", 0)
        if kind not in cluster or not isinstance(index, int) or not 0 <= index < len(cluster[kind]):
            raise ValueError(f"TF_CONFIG's task {kind}:{index} is not in its cluster "
                             f"({', '.join(f'{k}: {len(v)}' for k, v in cluster.items())}): fix "
                             '"task" in TF_CONFIG')
    return config


def current_task() -> Optional[Dict]:
    """``{"type": ..., "index": ...}`` from TF_CONFIG, or None when it is not set."""
    config = read_tf_config()
    return None if config is None else config.get("task")


def peer_timeout_seconds(value: Optional[float] = None) -> float:
    """Seconds to wait for the cluster's other tasks: ``value``, else $RADAM_DIST_PEER_TIMEOUT,
    else 600 (0: wait forever)."""
    if value is None:
        return _env.seconds(PEER_TIMEOUT_ENV, DEFAULT_PEER_TIMEOUT, zero_means="wait forever")
    if not value >= 0:
        raise ValueError(f"peer timeout must be >= 0 seconds (0: wait forever), got {value}")
    return float(value)


class PeersMissingError(TimeoutError):
    """The cluster's other tasks did not all answer within the peer timeout."""


def _accepting(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=0.5):
            return True
    except (OSError, ValueError):
        return False


def wait_for_peers(timeout: Optional[float] = None, poll_seconds: float = 0.2) -> None:
    """Wait until every other task of TF_CONFIG answers, before TensorFlow's own wait.

    Creating MWMS blocks inside TensorFlow's C++ until every peer has joined, with no limit,
    and TensorFlow's preemption notifier swallows SIGTERM meanwhile. This rendezvous happens in
    Python first: a task that takes part in MWMS's collectives (chief, worker) listens on its
    own TF_CONFIG port and connects to every peer's, until all answered; a PSS chief only
    connects to the workers and parameter servers (their ``serve_if_pss_worker_or_ps`` servers).
    SIGTERM ends the wait at once. After ``timeout`` seconds (``peer_timeout_seconds``:
    $RADAM_DIST_PEER_TIMEOUT, default 600; 0: forever) it raises ``PeersMissingError`` naming
    the tasks that never answered. Nothing to do outside a multi-task TF_CONFIG, and for PSS
    workers and parameter servers. ``strategy_from_environment`` calls it; call it yourself
    before ``tf.distribute.MultiWorkerMirroredStrategy()``.
    """
    seconds = peer_timeout_seconds(timeout)
    config = read_tf_config()
    if not config or not config.get("task"):
        return
    cluster, task = config.get("cluster") or {}, config["task"]
    me_type, me_index = task.get("type"), task.get("index", 0)
    pss = bool(cluster.get("ps"))
    if pss and me_type != "chief":
        return
    if not pss and me_type not in ("chief", "worker"):
        return  # an evaluator joins no collective
    peers = {f"{kind}:{i}": address for kind, addresses in cluster.items()
             if (kind in ("chief", "worker") if not pss else kind in ("worker", "ps"))
             for i, address in enumerate(addresses) if (kind, i) != (me_type, me_index)}
    if not peers:
        return
    listener = None
    if not pss:  # the peers look for this task at its TF_CONFIG port (TensorFlow binds it later)
        port = int(cluster[me_type][me_index].rpartition(":")[2])
        dual = socket.has_dualstack_ipv6()  # peers may name this task by IPv4 or IPv6
        try:  # all interfaces, as TensorFlow's server binds; SO_REUSEADDR: it binds right after
            listener = socket.create_server(("", port), family=socket.AF_INET6 if dual
                                            else socket.AF_INET, backlog=64, dualstack_ipv6=dual)
        except OSError as err:
            raise OSError(err.errno, f"{me_type}:{me_index}: cannot listen on port {port} of "
                                     f"TF_CONFIG ({err.strerror}): another process holds it") from None
        listener.setblocking(False)
    me = f"{me_type}:{me_index}"
    start = time.monotonic()
    waiting = dict(peers)
    reported = start
    try:
        while True:
            if listener is not None:
                while True:  # answer peers' probes
                    try:
                        conn, _ = listener.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    conn.close()
            for name, address in list(waiting.items()):
                if _accepting(address):
                    del waiting[name]
            if not waiting:
                if listener is not None:  # let late peers see this task once more
                    deadline = time.monotonic() + 2 * poll_seconds
                    while time.monotonic() < deadline:
                        try:
                            listener.accept()[0].close()
                        except (BlockingIOError, InterruptedError):
                            time.sleep(0.02)
                log.info("%s: all %d peer task(s) answered after %.1f s", me, len(peers),
                         time.monotonic() - start)
                return
            now = time.monotonic()
            if seconds and now - start >= seconds:
                missing = ", ".join(f"{n} ({a})" for n, a in sorted(waiting.items()))
                raise PeersMissingError(
                    f"{me} gave up after {seconds:g} s waiting for the cluster's other tasks; "
                    f"never answered: {missing}: start them or fix TF_CONFIG; to wait longer set "
                    f"${PEER_TIMEOUT_ENV} (seconds, 0: forever) or "
                    "strategy_from_environment(peer_timeout=...)")
            if now - reported >= 30:
                reported = now
                log.warning("%s: still waiting for %s (%.0f s of %s)", me,
                            ", ".join(sorted(waiting)), now - start,
                            f"{seconds:g} s" if seconds else "no limit")
            time.sleep(poll_seconds)
    finally:
        if listener is not None:
            listener.close()


def is_parameter_server_cluster() -> bool:
    """True when TF_CONFIG describes a cluster with parameter servers."""
    config = read_tf_config()
    return bool(config) and bool(config.get("cluster", {}).get("ps"))
