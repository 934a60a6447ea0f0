"""radam_dist under tf.distribute: MirroredStrategy, MultiWorkerMirroredStrategy (MWMS) and
ParameterServerStrategy (PSS).

* ``enable_multi_worker_fit()``: corrects Keras 3's ``model.fit`` under MWMS (see
  ``keras_fit``).
* ``serve_if_pss_worker_or_ps()``, ``strategy_from_environment()``: one train script for a
  local ``radam-dist launch`` cluster and for a platform that sets TF_CONFIG.
* ``LocalCluster`` / ``launch``: the process manager behind ``radam-dist launch``, re-exported
  from ``radam_dist.launch`` (with its TF_CONFIG helpers), which imports no TensorFlow.

See docs/DISTRIBUTE.md.
"""

from radam_dist.distribute.environment import serve_if_pss_worker_or_ps, strategy_from_environment
from radam_dist.launch.cluster import (
    current_task,
    free_loopback_ports,
    local_cluster_spec,
    tf_config,
    PeersMissingError,
    wait_for_peers,
)
from radam_dist.launch.local_cluster import LocalCluster, launch

# TensorFlow-heavy parts load on first use: importing this package stays as cheap as the
# launcher it re-exports (a train script reads TF_CONFIG before TensorFlow loads).
_LAZY = {
    "enable_multi_worker_fit": "radam_dist.distribute.keras_fit",
    "describe_placement": "radam_dist.distribute.pss",
    "expand_sharded": "radam_dist.distribute.pss",
    "is_sharded": "radam_dist.distribute.pss",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'radam_dist.distribute' has no attribute {name!r}")

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
    "PeersMissingError",
    "wait_for_peers",
]
