"""radam_dist under tf.distribute: MirroredStrategy, MultiWorkerMirroredStrategy (MWMS) and
ParameterServerStrategy (PSS).

* ``enable_multi_worker_fit()``: corrects Keras 3's ``model.fit`` under MWMS (see
  ``keras_fit``).
* ``serve_if_pss_worker_or_ps()``, ``strategy_from_environment()``: one train script for a
  local ``radam-dist launch`` cluster and for a platform that sets TF_CONFIG.
* ``LocalCluster`` / ``launch``: the process manager behind ``radam-dist launch``.

See docs/DISTRIBUTE.md.
"""

from radam_dist.distribute.cluster import (
    current_task,
    free_loopback_ports,
    local_cluster_spec,
    serve_if_pss_worker_or_ps,
    strategy_from_environment,
    tf_config,
)
from radam_dist.distribute.keras_fit import enable_multi_worker_fit
from radam_dist.distribute.launcher import LocalCluster, launch
from radam_dist.distribute.pss import describe_placement, expand_sharded, is_sharded

__all__ = [
    "LocalCluster",
    "current_task",
    "describe_placement",
    "enable_multi_worker_fit",
    "expand_sharded",
    "free_loopback_ports",
    "is_sharded",
    "launch",
    "local_cluster_spec",
    "serve_if_pss_worker_or_ps",
    "strategy_from_environment",
    "tf_config",
]
