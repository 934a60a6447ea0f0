"""The tf.distribute side of TF_CONFIG: the server a PSS worker or parameter server runs, and the
strategy a train script should create.

TF_CONFIG itself (parsing, checking, waiting for the peers) is ``radam_dist.launch.cluster``,
which imports no TensorFlow; TensorFlow loads here only when a function is called, so
``import radam_dist.distribute`` stays cheap.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Optional

from radam_dist.launch.cluster import (
    current_task,
    is_parameter_server_cluster,
    read_tf_config,
    wait_for_peers,
)

if TYPE_CHECKING:
    import tensorflow as tf

# The name of the module these functions came from: log filters and task output stay the same.
log = logging.getLogger("radam_dist.distribute.cluster")


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
    variable_partitioner=None, peer_timeout: Optional[float] = None,
) -> "tf.distribute.Strategy":
    """The strategy TF_CONFIG calls for: PSS (with ``variable_partitioner``) when the cluster
    has parameter servers, MWMS when it has workers, else MirroredStrategy on local devices.

    A bad TF_CONFIG is refused (ValueError) before TensorFlow loads. Before a multi-worker
    strategy is created, ``wait_for_peers`` waits for the other tasks: at most ``peer_timeout``
    seconds (default $RADAM_DIST_PEER_TIMEOUT, else 600; 0: forever), then
    ``PeersMissingError`` names the tasks that never answered; SIGTERM ends the wait."""
    config = read_tf_config()
    wait_for_peers(peer_timeout)  # before TensorFlow's own wait, which has no limit
    import tensorflow as tf

    if config and is_parameter_server_cluster():
        resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
        return tf.distribute.experimental.ParameterServerStrategy(
            resolver, variable_partitioner=variable_partitioner
        )
    if config:
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.MirroredStrategy()
