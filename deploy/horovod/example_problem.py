"""The data and model of the Horovod examples (train_radam.py, train_elastic.py).

Replace these two functions with your own (or import yours in their place): nothing else in
the examples depends on what the problem is.
"""

from __future__ import annotations

import keras
import numpy as np


def make_dataset(samples: int, seed: int = 0):
    """A synthetic 10-class problem (no download): the label depends nonlinearly on x."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(samples, 32)).astype("float32")
    w = rng.normal(size=(32, 10)).astype("float32")
    y = np.argmax(np.tanh(x @ w) + 0.1 * rng.normal(size=(samples, 10)), axis=1)
    return x, y.astype("int32")


def make_model(hidden=(128, 64)) -> keras.Model:
    """A small classifier for ``make_dataset``: ReLU layers of ``hidden`` units, 10 logits."""
    return keras.Sequential(
        [keras.Input((32,))]
        + [keras.layers.Dense(units, activation="relu") for units in hidden]
        + [keras.layers.Dense(10)]
    )
