"""Process management for ``radam-dist launch``: a local cluster of one process per task.

* ``cluster``: TF_CONFIG: free ports, the cluster spec of a local cluster, the JSON each task
  gets, reading and checking it in a task, ``wait_for_peers`` (the rendezvous before
  TensorFlow's own, which has no limit).
* ``local_cluster``: ``LocalCluster`` / ``launch``: start, relay, stop and restart the tasks.
* ``supervisor``: the tiny parent of every task (run by file path, not imported).
* ``netns``: Linux network namespaces for ``--netns`` (a task placed on a "host").

Standard library only: nothing here imports TensorFlow or Keras, so the launcher starts in
milliseconds and never exits through TensorFlow (tests/test_distribute_launcher.py checks it).
The strategy a task then creates from its TF_CONFIG is ``radam_dist.distribute``'s
``strategy_from_environment``. ``radam_dist.distribute`` re-exports what is here, as before.
"""

from radam_dist.launch.cluster import (
    PeersMissingError,
    current_task,
    free_loopback_ports,
    local_cluster_spec,
    tf_config,
    wait_for_peers,
)
from radam_dist.launch.local_cluster import LocalCluster, launch

__all__ = [
    "LocalCluster",
    "PeersMissingError",
    "current_task",
    "free_loopback_ports",
    "launch",
    "local_cluster_spec",
    "tf_config",
    "wait_for_peers",
]
