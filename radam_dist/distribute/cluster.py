"""TF_CONFIG for local clusters, and the role a process plays in one.

``tf.distribute`` reads the cluster layout from the ``TF_CONFIG`` environment variable. On
Kubernetes (deploy/k8s/) or another platform it is set for you; ``radam-dist launch`` sets it
for processes on this machine. Training scripts read it through the helpers here, so the same
script runs unchanged in both places.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

if TYPE_CHECKING:  # the launcher imports this module and must not pay for TensorFlow
    import tensorflow as tf

log = logging.getLogger(__name__)


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
        from radam_dist.distribute import netns

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


def current_task() -> Optional[Dict]:
    """``{"type": ..., "index": ...}`` from TF_CONFIG, or None when it is not set."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return None
    return json.loads(raw).get("task")


def is_parameter_server_cluster() -> bool:
    """True when TF_CONFIG describes a cluster with parameter servers."""
    raw = os.environ.get("TF_CONFIG")
    return bool(raw) and bool(json.loads(raw).get("cluster", {}).get("ps"))


def serve_if_pss_worker_or_ps() -> None:
    """In a PSS cluster, turn a ``worker`` or ``ps`` task into a tf.distribute.Server that
    serves until it is killed; return immediately on the chief or outside PSS.

    Put it at the top of a train script so one script serves every task.
    """
    import tensorflow as tf

    task = current_task()
    if not is_parameter_server_cluster() or task is None or task["type"] not in ("worker", "ps"):
        return
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    log.info("serving as %s:%s", task["type"], task["index"])
    server = tf.distribute.Server(
        resolver.cluster_spec(),
        job_name=resolver.task_type,
        task_index=resolver.task_id,
        protocol=resolver.rpc_layer or "grpc",
        start=True,
    )
    server.join()
    raise SystemExit(0)  # pragma: no cover - join() only returns when the server dies


def strategy_from_environment(
    variable_partitioner=None,
) -> "tf.distribute.Strategy":
    """The strategy TF_CONFIG calls for: PSS (with ``variable_partitioner``) when the cluster
    has parameter servers, MWMS when it has workers, else MirroredStrategy on local devices."""
    import tensorflow as tf

    raw = os.environ.get("TF_CONFIG")
    if raw and is_parameter_server_cluster():
        resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
        return tf.distribute.experimental.ParameterServerStrategy(
            resolver, variable_partitioner=variable_partitioner
        )
    if raw:
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.MirroredStrategy()
