"""What every optimizer that wraps another one forwards to it.

Lookahead and Horovod's DistributedOptimizer (``radam_dist.horovod``) both run an inner
optimizer: the step counter and the learning rate are the inner optimizer's, so schedules,
callbacks such as ReduceLROnPlateau and checkpoints see one of each.
"""

from __future__ import annotations

from typing import Optional, Union

import keras

from radam_dist.optimizers.classic_api import ClassicOptimizerAPI


# Keras' base-optimizer arguments that act in the base class's apply(), which a wrapper
# replaces: given to the wrapper they would be silently ignored. Their defaults (as a
# config may carry them); anything else is refused, as Keras' LossScaleOptimizer does.
_INNER_ONLY_ARGUMENTS = {
    "weight_decay": None,
    "clipnorm": None,
    "global_clipnorm": None,
    "clipvalue": None,
    "use_ema": False,
    "ema_momentum": 0.99,
    "ema_overwrite_frequency": None,
    "loss_scale_factor": None,
    "gradient_accumulation_steps": None,
}


def pop_inner_only_arguments(kwargs: dict, wrapper: str) -> None:
    """Remove the base-optimizer arguments from ``kwargs``; ValueError for one that is set."""
    for name, default in _INNER_ONLY_ARGUMENTS.items():
        if name not in kwargs:
            continue
        value = kwargs.pop(name)
        if value is None or value is default or (default is not None and value == default):
            continue
        raise ValueError(
            f"{wrapper} does not apply `{name}` itself (got {name}={value!r}): set it on the "
            f"inner optimizer instead, e.g. {wrapper}(RectifiedAdam(..., {name}={value!r}))"
        )


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


def step_counter(optimizer):
    """The variable that counts ``optimizer``'s steps: a wrapper's is its inner optimizer's;
    with Keras' ``gradient_accumulation_steps`` it counts micro-steps (``iterations`` is then
    a tensor, micro-steps // k)."""
    while isinstance(optimizer, ForwardsToInnerOptimizer):
        optimizer = optimizer.inner_optimizer
    return optimizer._iterations


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

    @property
    def loss_scale_factor(self):
        """The inner optimizer's: it unscales the gradients and ``scale_loss`` scales by it,
        so ``LossScaleOptimizer``, which switches off its inner optimizer's factor, reaches
        the one that applies it (else the gradients would be divided twice)."""
        inner = self.__dict__.get("inner_optimizer")
        return None if inner is None else inner.loss_scale_factor

    @loss_scale_factor.setter
    def loss_scale_factor(self, value):
        # Keras' base __init__ sets None before the inner optimizer exists.
        if "inner_optimizer" in self.__dict__:
            self.inner_optimizer.loss_scale_factor = value

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
