"""Keras callbacks for ``model.fit`` under Horovod, written for Keras 3.

Order matters: Keras hands one ``logs`` dict to the callbacks in list order (History and the
progress bar come last), so put ``MetricAverage`` before anything that records metrics, and
wrap checkpoints and loggers in ``RootRankOnly``. ``standard_callbacks`` returns that list.
"""

from __future__ import annotations

import logging
from typing import Iterable, List, Optional

import keras
import numpy as np
import tensorflow as tf

from radam_dist.horovod._hvd import require_initialized
from radam_dist.horovod.broadcast import broadcast_state

logger = logging.getLogger(__name__)


class BroadcastState(keras.callbacks.Callback):
    """At the start of ``fit``, copy the root rank's model and optimizer state to all ranks.

    Runs before the first step (Horovod's callback ran after it, once the first update had
    already been applied to unsynchronised weights), creating the optimizer's slots if needed.
    """

    def __init__(self, root_rank: int = 0):
        super().__init__()
        self.root_rank = root_rank
        self.broadcast_done = False

    def on_train_begin(self, logs=None):
        if self.broadcast_done:
            return
        broadcast_state(self.model, self.model.optimizer, root_rank=self.root_rank)
        self.broadcast_done = True


class MetricAverage(keras.callbacks.Callback):
    """Replace each epoch's metrics by their mean over ranks (one all-reduce per epoch).

    Every rank computes its metrics on its own shard; without this, rank 0's checkpoint
    decisions (``save_best_only``, early stopping) see one shard only.
    """

    def on_epoch_end(self, epoch, logs=None):
        if not logs:
            return
        hvd = require_initialized()
        if hvd.size() == 1:
            return
        keys = sorted(k for k, v in logs.items() if _is_number(v))
        values = tf.constant([float(logs[k]) for k in keys], tf.float64)
        averaged = hvd.allreduce(
            values, op=hvd.Average, name=f"radam_dist.metrics.epoch{epoch}"
        ).numpy()
        for key, value in zip(keys, averaged):
            logs[key] = float(value)


def _is_number(value) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return np.ndim(value) == 0


class RootRankOnly(keras.callbacks.Callback):
    """Runs ``callback`` on rank ``root_rank`` only (checkpoints, CSV/TensorBoard logs).

    On other ranks every hook is a no-op, so only one process writes files.
    """

    def __init__(self, callback: keras.callbacks.Callback, root_rank: int = 0):
        super().__init__()
        if not isinstance(callback, keras.callbacks.Callback):
            raise TypeError(f"RootRankOnly wraps a keras Callback, got {type(callback).__name__}")
        self.callback = callback
        self.root_rank = root_rank

    def _active(self) -> bool:
        return require_initialized().rank() == self.root_rank

    def set_model(self, model):
        super().set_model(model)
        self.callback.set_model(model)

    def set_params(self, params):
        super().set_params(params)
        self.callback.set_params(params)


def _forward(hook_name: str):
    def hook(self, *args, **kwargs):
        if self._active():
            return getattr(self.callback, hook_name)(*args, **kwargs)
        return None

    hook.__name__ = hook_name
    hook.__doc__ = f"Forwards ``{hook_name}`` on the root rank."
    return hook


for _hook in (
    "on_train_begin", "on_train_end", "on_epoch_begin", "on_epoch_end",
    "on_train_batch_begin", "on_train_batch_end", "on_test_begin", "on_test_end",
    "on_test_batch_begin", "on_test_batch_end", "on_predict_begin", "on_predict_end",
    "on_predict_batch_begin", "on_predict_batch_end",
):
    setattr(RootRankOnly, _hook, _forward(_hook))


class LearningRateScaleWarmup(keras.callbacks.Callback):
    """Horovod's learning-rate rule: scale by the number of ranks, reached gradually.

    With ``size`` ranks the global batch is ``size`` times larger, so the usual rule is
    ``lr = base_lr * size``. Jumping there at step 0 often diverges, so the rate rises
    linearly from ``base_lr`` to ``base_lr * size`` over ``warmup_steps`` optimizer steps
    (set per batch, from the optimizer's step counter, so resuming continues the ramp).
    RAdam's rectification already damps the first steps; a shorter warmup is usually enough.

    Args:
        base_lr: the single-process learning rate.
        warmup_steps: steps to reach ``base_lr * scale``; 0 applies the full scale at once.
        scale: the multiplier; default ``hvd.size()``.
    """

    def __init__(self, base_lr: float, warmup_steps: int = 0, scale: Optional[float] = None):
        super().__init__()
        if not base_lr > 0:
            raise ValueError(f"base_lr must be > 0, got {base_lr!r}")
        if int(warmup_steps) != warmup_steps or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be a non-negative integer, got {warmup_steps!r}")
        if scale is not None and not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale!r}")
        self.base_lr = float(base_lr)
        self.warmup_steps = int(warmup_steps)
        self.scale = scale

    def learning_rate_at(self, step: int) -> float:
        """The rate for the optimizer's 0-based ``step``."""
        scale = self.scale if self.scale is not None else float(require_initialized().size())
        if self.warmup_steps == 0:
            return self.base_lr * scale
        progress = min(1.0, step / self.warmup_steps)
        return self.base_lr * (1.0 + (scale - 1.0) * progress)

    def on_train_begin(self, logs=None):
        if _settable_rate(self.model.optimizer) is None:
            raise ValueError(
                "LearningRateScaleWarmup sets the optimizer's learning rate each batch, but "
                "this optimizer's rate is a schedule or callable; scale the schedule itself "
                "(e.g. multiply its initial rate by hvd.size()) instead"
            )
        self._set(int(self.model.optimizer.iterations.numpy()))

    def on_train_batch_begin(self, batch, logs=None):
        self._set(int(self.model.optimizer.iterations.numpy()))

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["learning_rate"] = float(
                keras.ops.convert_to_numpy(_settable_rate(self.model.optimizer))
            )

    def _set(self, step: int) -> None:
        self.model.optimizer.learning_rate = self.learning_rate_at(step)


def _settable_rate(optimizer):
    """The learning-rate variable that ``optimizer.learning_rate = x`` assigns, or None."""
    while hasattr(optimizer, "inner_optimizer"):
        optimizer = optimizer.inner_optimizer
    rate = getattr(optimizer, "_learning_rate", None)
    return rate if isinstance(rate, keras.Variable) else None


def standard_callbacks(
    root_rank_callbacks: Iterable[keras.callbacks.Callback] = (),
    base_lr: Optional[float] = None,
    warmup_steps: int = 0,
    root_rank: int = 0,
) -> List[keras.callbacks.Callback]:
    """The usual list, in the order that works: broadcast, (lr scaling), metric averaging,
    then ``root_rank_callbacks`` (ModelCheckpoint, CSVLogger, ...) on the root rank only."""
    callbacks: List[keras.callbacks.Callback] = [BroadcastState(root_rank)]
    if base_lr is not None:
        callbacks.append(LearningRateScaleWarmup(base_lr, warmup_steps))
    callbacks.append(MetricAverage())
    callbacks.extend(RootRankOnly(cb, root_rank) for cb in root_rank_callbacks)
    return callbacks
