"""Make Keras 3's ``model.fit`` work under ``MultiWorkerMirroredStrategy``.

Since Keras 3 (TF 2.16) ``fit`` fails on a multi-worker cluster (keras-team/keras#20585,
tensorflow/tensorflow#72388) for two independent reasons, both in
``keras/src/backend/tensorflow/trainer.py``:

1. ``TensorFlowTrainer._maybe_symbolic_build`` takes the first distributed batch, a tuple
   ``(x, y, sample_weight)`` of ``PerReplica`` values, and passes the whole tuple to
   ``strategy.reduce("MEAN", ...)``. ``Strategy.reduce`` does not accept nested structures
   (it has a TODO saying so). On one worker ``reduce`` short-cuts a non-distributed value and
   returns the tuple unchanged, so Mirrored hides the bug; with two workers the tuple reaches
   ``CollectiveAllReduce.reduce`` which tries ``convert_to_tensor`` on it:
   ``ValueError: Attempt to convert a value (PerReplica:{...})``. The batch is only used for
   its shapes and dtypes, so no cross-worker reduction is needed at all: this module takes
   the local replica's value instead.
2. After each step ``reduce_per_replica(..., reduction="auto")`` reduces the logs (scalar
   loss and metric values) with ``strategy.reduce("MEAN", v, axis=0)`` on multi-worker
   strategies; axis 0 does not exist on a scalar: ``Invalid reduction dimension 0 for input
   with 0 dimensions``. Scalars are reduced here with ``axis=None`` (the logs are the same
   on every replica: they come from synchronised metric variables).

``enable_multi_worker_fit()`` installs both corrections, once, and only on the Keras versions
that have the affected functions. Nothing changes for single-worker strategies: the
corrected code paths are only taken for multi-worker collective strategies.
"""

from __future__ import annotations

import functools
import logging

import tensorflow as tf

log = logging.getLogger(__name__)

_INSTALLED_MARK = "_radam_dist_multi_worker_fit"


def _local_value(strategy, value):
    if isinstance(value, tf.distribute.DistributedValues):
        return strategy.experimental_local_results(value)[0]
    return value


def _is_multi_worker(strategy) -> bool:
    extended = getattr(strategy, "extended", None)
    return bool(getattr(extended, "_in_multi_worker_mode", lambda: False)())


def enable_multi_worker_fit() -> bool:
    """Correct Keras 3's ``fit`` / ``evaluate`` under MultiWorkerMirroredStrategy.

    Call it once, before ``model.fit`` (importing ``radam_dist.distribute`` does not call it
    for you: it patches Keras' trainer class). Idempotent. Returns True when the
    corrections are installed, False when this Keras has no TensorFlow trainer to correct.
    """
    try:
        from keras.src import tree
        from keras.src.backend.tensorflow import trainer as tf_trainer
    except ImportError:  # pragma: no cover - another Keras layout or backend
        log.warning("keras.src.backend.tensorflow.trainer not found; fit left unchanged")
        return False
    trainer_cls = tf_trainer.TensorFlowTrainer
    if getattr(trainer_cls, _INSTALLED_MARK, False):
        return True
    original_build = getattr(trainer_cls, "_maybe_symbolic_build", None)
    original_reduce = getattr(tf_trainer, "reduce_per_replica", None)
    if original_build is None or original_reduce is None:
        log.warning("this Keras has no _maybe_symbolic_build/reduce_per_replica; unchanged")
        return False

    @functools.wraps(original_build)
    def maybe_symbolic_build(self, iterator=None, data_batch=None):
        strategy = self._distribute_strategy
        if strategy is None or iterator is None or not _is_multi_worker(strategy):
            return original_build(self, iterator=iterator, data_batch=data_batch)
        for _, _, distributed_iterator in iterator:
            batch = next(distributed_iterator)
            data_batch = tree.map_structure(lambda v: _local_value(strategy, v), batch)
            break
        with strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    @functools.wraps(original_reduce)
    def reduce_per_replica(values, strategy, reduction):
        if reduction not in ("auto", "mean") or not _is_multi_worker(strategy):
            return original_reduce(values, strategy, reduction)
        if isinstance(strategy, tf.distribute.TPUStrategy):
            return original_reduce(values, strategy, reduction)

        def reduce_one(value):
            local = _local_value(strategy, value)
            if getattr(local, "shape", None) is not None and local.shape.rank == 0:
                return strategy.reduce("MEAN", value, axis=None)
            return original_reduce(value, strategy, reduction)

        return tree.map_structure(reduce_one, values)

    trainer_cls._maybe_symbolic_build = maybe_symbolic_build
    tf_trainer.reduce_per_replica = reduce_per_replica
    setattr(trainer_cls, _INSTALLED_MARK, True)
    log.info("installed the multi-worker fit corrections into Keras' TensorFlowTrainer")
    return True
