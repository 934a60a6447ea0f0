"""What every optimizer that wraps another one forwards to it.

Lookahead and Horovod's DistributedOptimizer (``radam_dist.horovod``) both run an inner
optimizer: the step counter and the learning rate are the inner optimizer's, so schedules,
callbacks such as ReduceLROnPlateau and checkpoints see one of each.
"""

from __future__ import annotations

from typing import Optional

import keras


class ForwardsToInnerOptimizer:
    """Mixin for a ``keras.optimizers.Optimizer`` that holds ``self.inner_optimizer``."""

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, value):
        # Keras' base __init__ sets a placeholder rate before the inner optimizer exists.
        if "inner_optimizer" in self.__dict__:
            self.inner_optimizer.learning_rate = value

    def scale_loss(self, loss):
        return self.inner_optimizer.scale_loss(loss)

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)

    def update_step(self, gradient, variable, learning_rate):
        raise NotImplementedError(f"{type(self).__name__} applies whole steps through apply()")

    @classmethod
    def from_config(cls, config: dict, custom_objects: Optional[dict] = None):
        """``config["optimizer"]`` is the inner optimizer's Keras serialization."""
        config = dict(config)
        inner = keras.optimizers.deserialize(config.pop("optimizer"), custom_objects=custom_objects)
        return cls(inner, **config)
