"""RectifiedAdam for tf_keras (Keras 2, ``TF_USE_LEGACY_KERAS=1``) models.

A Keras 3 optimizer cannot be compiled into a tf_keras model, and jobs that stayed on tf_keras
(whose ``model.fit`` works under MultiWorkerMirroredStrategy) still want RAdam.
``LegacyRectifiedAdam`` is a ``tf_keras.optimizers.Optimizer`` whose per-variable update is
radam_math's (the same functions the Keras 3 optimizer calls), so both give the same numbers.
tf_keras' own optimizer base class does the cross-replica aggregation.

tf_keras is imported when this module is, not by ``radam_dist.optimizers`` (which does not
import this module). ``radam_dist.distribute.legacy_keras``, the former path, forwards to it.
"""

from __future__ import annotations

import tf_keras

from radam_dist import executor, radam_math


@tf_keras.saving.register_keras_serializable(package="radam_dist")
class LegacyRectifiedAdam(tf_keras.optimizers.Optimizer):
    """RAdam (tfa 0.23 numerics) for tf_keras; arguments as ``radam_dist.RectifiedAdam``.

    ``weight_decay`` is RAdam's decoupled decay applied inside the update (tfa's order), not
    tf_keras' AdamW-style decay before it.
    """

    def __init__(
        self,
        learning_rate=0.001,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-7,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        sma_threshold: float = 5.0,
        total_steps: int = 0,
        warmup_proportion: float = 0.1,
        min_lr: float = 0.0,
        jit_compile: bool = False,
        name: str = "LegacyRectifiedAdam",
        **kwargs,
    ):
        radam_math.check_hyperparameters(beta_1, beta_2, total_steps, warmup_proportion)
        super().__init__(name=name, jit_compile=jit_compile, **kwargs)
        self._learning_rate = self._build_learning_rate(learning_rate)
        self.hyperparams = radam_math.RAdamHyperparams(
            beta_1=float(beta_1), beta_2=float(beta_2), epsilon=float(epsilon),
            amsgrad=bool(amsgrad), sma_threshold=float(sma_threshold),
            total_steps=float(total_steps), warmup_proportion=float(warmup_proportion),
            min_lr=float(min_lr),
        )
        self.radam_weight_decay = float(weight_decay)

    def build(self, var_list):
        super().build(var_list)
        if getattr(self, "_built", False):
            return
        self._built = True
        names = ("m", "v", "vhat") if self.hyperparams.amsgrad else ("m", "v")
        self._radam_slots = {
            name: [self.add_variable_from_reference(var, name) for var in var_list]
            for name in names
        }

    def update_step(self, gradient, variable):
        dtype = radam_math.compute_dtype(variable.dtype)
        scalars = radam_math.step_scalars(
            self.iterations + 1, self.learning_rate, self.radam_weight_decay,
            self.hyperparams, dtype=dtype, has_weight_decay=self.radam_weight_decay != 0.0,
        )
        index = self._index_dict[self._var_key(variable)]
        m, v = self._radam_slots["m"][index], self._radam_slots["v"][index]
        vhat = self._radam_slots["vhat"][index] if "vhat" in self._radam_slots else None
        executor.update_one(variable, gradient, m, v, vhat, scalars)

    def get_config(self):
        config = super().get_config()
        hp = self.hyperparams
        config.update(
            learning_rate=self._serialize_hyperparameter(self._learning_rate),
            beta_1=hp.beta_1, beta_2=hp.beta_2, epsilon=hp.epsilon,
            weight_decay=self.radam_weight_decay, amsgrad=hp.amsgrad,
            sma_threshold=hp.sma_threshold, total_steps=int(hp.total_steps),
            warmup_proportion=hp.warmup_proportion, min_lr=hp.min_lr,
        )
        return config
