"""Keras callbacks that belong to the optimizers themselves."""

from __future__ import annotations

import os
import shutil
import tempfile

import keras


class EffectiveLearningRate(keras.callbacks.Callback):
    """Adds ``effective_learning_rate`` (after RAdam's warmup and legacy decay) to the logs.

    tfa hid this rate from callbacks (tensorflow/addons#2542). Put this callback before
    ``keras.callbacks.TensorBoard`` (or CSVLogger) in the list so they record it.
    """

    def _rate(self):
        optimizer = self.model.optimizer
        while not hasattr(optimizer, "effective_learning_rate") and hasattr(
            optimizer, "inner_optimizer"
        ):
            optimizer = optimizer.inner_optimizer
        if hasattr(optimizer, "effective_learning_rate"):
            return float(keras.ops.convert_to_numpy(optimizer.effective_learning_rate))
        return float(keras.ops.convert_to_numpy(optimizer.learning_rate))

    def on_train_batch_end(self, batch, logs=None):
        if logs is not None:
            logs["effective_learning_rate"] = self._rate()

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["effective_learning_rate"] = self._rate()


def _is_chief(strategy) -> bool:
    """True outside a multi-worker strategy, and on MWMS' chief (task ``chief``, or worker 0
    where the cluster has no chief)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    extended = getattr(strategy, "extended", None)
    in_multi_worker = getattr(extended, "_in_multi_worker_mode", lambda: False)()
    if resolver is None or not in_multi_worker:
        return True
    if resolver.task_type == "chief":
        return True
    jobs = resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and int(resolver.task_id) == 0 and "chief" not in jobs


class ModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """``keras.callbacks.ModelCheckpoint`` for MultiWorkerMirroredStrategy: put it in the
    callbacks of **every** worker.

    Saving under MWMS is a collective when the optimizer state is sharded
    (``shard_optimizer_state=True``) or accumulating (``accumulation_steps``): every worker
    must save, in step. Keras' callback writes the same file from every worker, so scripts
    keep it to the chief, which radam_dist refuses (every worker must save). This callback
    saves on every worker at the same points with the same decisions (``save_best_only``
    reads the all-reduced logs): the chief writes ``filepath``, every other worker a copy
    in a scratch folder of its own that it deletes at once. Outside MWMS it is Keras' own.
    """

    def _get_file_path(self, epoch, batch, logs):
        path = super()._get_file_path(epoch, batch, logs)
        if _is_chief(self.model.distribute_strategy):
            return path
        scratch = getattr(self, "_scratch_dir", None)
        if scratch is None:
            scratch = self._scratch_dir = tempfile.mkdtemp(prefix="radam_dist_checkpoint_")
        return os.path.join(scratch, os.path.basename(path.rstrip("/\\")) or "checkpoint")

    def _save_model(self, epoch, batch, logs):
        try:
            super()._save_model(epoch, batch, logs)
        finally:
            scratch = getattr(self, "_scratch_dir", None)
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
                self._scratch_dir = None
