"""What every optimizer that wraps another one forwards to it.

Lookahead and Horovod's DistributedOptimizer (``radam_dist.horovod``) both run an inner
optimizer: the step counter and the learning rate are the inner optimizer's, so schedules,
callbacks such as ReduceLROnPlateau and checkpoints see one of each.
"""

from __future__ import annotations

from typing import Optional, Union

import keras

from radam_dist.optimizers.classic_api import ClassicOptimizerAPI


def resolve_inner_optimizer(
    optimizer: Union[keras.optimizers.Optimizer, str, dict], wrapper: str
) -> keras.optimizers.Optimizer:
    """The optimizer ``wrapper`` will run: an instance, or one made from a name or config.

    Raises TypeError for anything that is not a Keras 3 optimizer (tf.keras and tfa ones
    included, which cannot run on Keras 3).
    """
    if isinstance(optimizer, (str, dict)):
        optimizer = keras.optimizers.get(optimizer)
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise TypeError(
            f"{wrapper} wraps a Keras 3 optimizer (keras.optimizers.Optimizer); got "
            f"{type(optimizer).__name__}. tf.keras / tfa optimizers do not run on Keras 3."
        )
    return optimizer


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

    # tf.keras's `lr`, through the forwarded learning_rate above (Horovod's DistributedOptimizer
    # has no ClassicOptimizerAPI of its own).
    lr = ClassicOptimizerAPI.lr

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
