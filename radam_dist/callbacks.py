"""Keras callbacks that belong to the optimizers themselves."""

from __future__ import annotations

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
