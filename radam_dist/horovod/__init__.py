"""RectifiedAdam and Lookahead under Horovod (``horovodrun``), on Keras 3.

Horovod 0.28.1's own Keras wrappers do not work with Keras 3 (its DistributedOptimizer trains
without averaging; its broadcasts raise on ``keras.Variable``). Use these instead::

    import horovod.tensorflow as hvd
    from radam_dist import RectifiedAdam
    from radam_dist.horovod import DistributedOptimizer, standard_callbacks

    hvd.init()
    model.compile(optimizer=DistributedOptimizer(RectifiedAdam(1e-3)), loss=..., jit_compile=False)
    model.fit(shard, callbacks=standard_callbacks([keras.callbacks.ModelCheckpoint(...)]),
              verbose=1 if hvd.rank() == 0 else 0)

Importing this package imports TensorFlow but not Horovod; Horovod is imported on first use.
Elastic Horovod (workers that die or join): ``from radam_dist.horovod import elastic``
(``KerasState``, ``run``, ``function``, ``CommitState``; see docs/HOROVOD.md).
"""

from radam_dist.horovod.broadcast import broadcast_state
from radam_dist.horovod.callbacks import (
    BroadcastState,
    LearningRateScaleWarmup,
    MetricAverage,
    RootRankOnly,
    standard_callbacks,
)
from radam_dist.horovod.optimizer import DistributedOptimizer, unwrap

__all__ = [
    "BroadcastState",
    "DistributedOptimizer",
    "LearningRateScaleWarmup",
    "MetricAverage",
    "RootRankOnly",
    "broadcast_state",
    "standard_callbacks",
    "unwrap",
]
