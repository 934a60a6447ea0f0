"""``model.fit`` through the parameter servers.

``ParameterServerOptimizer`` stands where a Keras optimizer stands. ``build`` registers the
model's variables with the servers (or re-attaches) and loads the servers' values; each
``apply`` pushes the batch's gradients and receives the updated parameters in one round trip
(``PushPull``), then assigns them. The update itself happens on the servers, with
``radam_dist.RectifiedAdam`` / ``Lookahead`` built from ``optimizer``.

Compile with ``jit_compile=False`` (the exchange is a ``tf.py_function``; Keras already picks
False on CPU-only machines).
"""

from __future__ import annotations

import logging
from typing import List

import keras
import numpy as np
import tensorflow as tf

from radam_dist.ps.client import PSClient, StaleGradientError
from radam_dist.ps.optimizer_config import to_config

log = logging.getLogger(__name__)


class ParameterServerOptimizer(keras.optimizers.Optimizer):
    """A Keras optimizer whose step runs on parameter servers.

    Args:
        client: a ``PSClient`` connected to the shards.
        optimizer: what the servers run: a ``RectifiedAdam`` / ``Lookahead`` instance, its
            Keras serialization, or RectifiedAdam keyword arguments.
    """

    def __init__(self, client: PSClient, optimizer, name: str = "ParameterServerOptimizer", **kwargs):
        super().__init__(learning_rate=0.0, name=name, **kwargs)
        self.client = client
        self.server_optimizer_config = to_config(optimizer)
        self.stale_steps = 0  # steps whose gradients the servers refused as stale
        self._ps_variables: List = []
        self._ps_names: List[str] = []

    def build(self, var_list) -> None:
        if self.built:
            return
        super().build(var_list)
        self._ps_variables = list(var_list)
        self._ps_names = [v.path for v in self._ps_variables]
        if len(set(self._ps_names)) != len(self._ps_names):
            raise ValueError(f"variable paths are not unique: {self._ps_names}")
        with tf.init_scope():  # build may run while Keras traces the train step
            initial = {n: keras.ops.convert_to_numpy(v) for n, v in zip(self._ps_names, self._ps_variables)}
            self.client.register(initial, self.server_optimizer_config)
            values = self.client.pull(self._ps_names)  # the first worker's values win
            for name, var in zip(self._ps_names, self._ps_variables):
                var.assign(values[name])

    def apply(self, grads, trainable_variables=None):
        variables = self._ps_variables if trainable_variables is None else list(trainable_variables)
        if not self.built:
            self.build(variables)
        positions = {id(v): i for i, v in enumerate(self._ps_variables)}
        names, flat, layout = [], [], []
        for grad, var in zip(grads, variables):
            if grad is None:
                continue
            names.append(self._ps_names[positions[id(var)]])
            if isinstance(grad, tf.IndexedSlices):
                flat.extend([grad.values, grad.indices])
                layout.append(True)
            else:
                flat.append(grad)
                layout.append(False)
        order = [self._ps_variables[positions[id(v)]] for v in variables]
        order_names = [self._ps_names[positions[id(v)]] for v in variables]

        def exchange(*tensors):
            return self._exchange(names, layout, tensors, order_names)

        new_values = tf.py_function(exchange, flat, Tout=[tf.as_dtype(v.dtype) for v in order])
        for var, value in zip(order, new_values):
            var.assign(tf.ensure_shape(value, var.shape))
        self._iterations.assign_add(1)

    def _exchange(self, names, layout, tensors, order_names) -> List[np.ndarray]:
        grads, it = {}, iter(tensors)
        for name, sparse in zip(names, layout):
            grads[name] = (next(it).numpy(), next(it).numpy()) if sparse else next(it).numpy()
        try:
            _, values = self.client.push_pull(grads, self._ps_names)
        except StaleGradientError as err:
            self.stale_steps += 1
            log.warning("servers refused this step's gradients as stale (%s); pulling", err)
            values = self.client.pull(self._ps_names)
        return [values[n] for n in order_names]

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(server_optimizer=self.server_optimizer_config, targets=self.client.targets)
        return config
