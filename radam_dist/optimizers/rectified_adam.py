"""``RectifiedAdam``: tensorflow-addons 0.23's RAdam as a Keras 3 optimizer."""

from __future__ import annotations

import functools
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import keras
import numpy as np
import tensorflow as tf

from radam_dist import executor, fused, radam_math
from radam_dist.distribute import compression, gradient_sums
from radam_dist.optimizers import accumulation
from radam_dist.optimizers.classic_api import ClassicOptimizerAPI, maybe_float
from radam_dist.step.plan import StepPlan

Hyper = Union[float, keras.optimizers.schedules.LearningRateSchedule, Callable[[], Any]]

# Optimizers (ids) whose EMA overwrite this thread's step defers to cross-replica context.
_EMA_OVERWRITE_DEFERRED = threading.local()

# Keys that tf.keras / tfa configs carry and Keras 3 does not know.
_LEGACY_CONFIG_KEYS = ("is_legacy_optimizer", "jit_compile")


def _evaluate(value: Hyper, step):
    """A float, a schedule evaluated at the 0-based ``step``, or a zero-argument callable."""
    if isinstance(value, keras.optimizers.schedules.LearningRateSchedule):
        return value(step)
    if callable(value):
        return value()
    return value


def _is_unserializable_callable(value) -> bool:
    if not callable(value) or isinstance(
        value, (keras.optimizers.schedules.LearningRateSchedule, keras.Variable)
    ):
        return False
    try:
        keras.saving.serialize_keras_object(value)
    except (TypeError, ValueError):
        return True
    return False


def _serialize_hyper(value: Hyper):
    if isinstance(value, keras.optimizers.schedules.LearningRateSchedule):
        return keras.optimizers.schedules.serialize(value)
    if _is_unserializable_callable(value):
        return float(value())
    if callable(value):
        return keras.saving.serialize_keras_object(value)
    return float(value)


def _deserialize_hyper(value, custom_objects=None):
    if isinstance(value, dict):
        if "module" in value or "registered_name" in value:
            return keras.saving.deserialize_keras_object(value, custom_objects=custom_objects)
        # A tf.keras-style schedule config; tfa saved "name": None, which Keras 3 schedules
        # accept in their config but then fail on when called.
        value = dict(value, config={k: v for k, v in value.get("config", {}).items()
                                    if not (k == "name" and v is None)})
        return keras.optimizers.schedules.deserialize(value)
    return value


class RectifiedAdam(ClassicOptimizerAPI, keras.optimizers.Optimizer):
    """Rectified Adam (Liu et al., 2019, arXiv:1908.03265), numerically as in tfa 0.23.

    Args:
        learning_rate: a float, a ``keras.optimizers.schedules.LearningRateSchedule`` (called
            with the 0-based iteration count) or a zero-argument callable.
        beta_1, beta_2: decay rates of the first and second moment estimates.
        epsilon: added to the square root of the second moment (outside the root).
        weight_decay: decoupled weight decay (``lr_t * weight_decay * var``); a float, a
            schedule or a callable. ``exclude_from_weight_decay`` works as in Keras 3.
        amsgrad: keep the running maximum of the second moment (slot ``vhat``).
        sma_threshold: rectify when the approximated SMA length is at least this.
        total_steps: if > 0, warm up linearly over ``total_steps * warmup_proportion`` steps,
            then decay linearly to ``min_lr`` at ``total_steps``.
        warmup_proportion, min_lr: see ``total_steps``.
        all_reduce_dtype: None (float32) or ``"float16"``: the dtype dense gradients are
            summed across replicas in (see docs/DISTRIBUTE.md).
        accumulation_steps: apply one step per this many ``apply`` calls (micro-batches),
            with the mean of their gradients; works under tf.distribute, unlike Keras'
            ``gradient_accumulation_steps``.
        skip_nonfinite: drop a step whose gradients hold inf/NaN on any replica and count
            it in ``skipped_steps``.
        shard_optimizer_state: ZeRO stage 1 under MirroredStrategy / MWMS: each of N
            replicas keeps 1/N of m, v, vhat. ``get_slot`` / ``get_weights`` / ``.keras``
            files / checkpoints still see the whole state (gathered copies); without a
            strategy the state is simply whole.
        **kwargs: ``lr`` (alias of learning_rate), ``decay`` (legacy inverse-time decay
            ``lr / (1 + decay * iterations)``), ``clipnorm``, ``clipvalue``,
            ``global_clipnorm`` and Keras 3's optimizer arguments (``use_ema``,
            ``gradient_accumulation_steps``, ``loss_scale_factor``, ...).

    Differences from tfa (documented in README): no NaN for ``sma_threshold < 4``;
    coefficients in float32 for 16-bit variables; ``effective_learning_rate`` exposes the
    warmup-adjusted rate.
    """

    _SLOT_NAMES = ("m", "v")

    def __init__(
        self,
        learning_rate: Hyper = 0.001,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-7,
        weight_decay: Hyper = 0.0,
        amsgrad: bool = False,
        sma_threshold: float = 5.0,
        total_steps: int = 0,
        warmup_proportion: float = 0.1,
        min_lr: float = 0.0,
        name: str = "RectifiedAdam",
        all_reduce_dtype: Optional[str] = None,  # after `name`: tfa's positional order holds
        accumulation_steps: int = 1,
        skip_nonfinite: bool = False,
        shard_optimizer_state: bool = False,
        **kwargs,
    ):
        if "lr" in kwargs:
            learning_rate = kwargs.pop("lr")
        decay = float(kwargs.pop("decay", 0.0) or 0.0)
        for key in _LEGACY_CONFIG_KEYS:
            kwargs.pop(key, None)
        if kwargs.get("weight_decay") is not None:  # only reachable via **config
            weight_decay = kwargs.pop("weight_decay")
        # As the parameter server checks them (ps/optimizer_config.py), before anything is
        # made: a value that would train to inf / NaN is refused, naming the argument.
        # Schedules and callables are left to their calls; epsilon=0 (or None) stays tfa's
        # "use keras.config.epsilon()".
        radam_math.check_hyperparameters(beta_1, beta_2, total_steps, warmup_proportion)
        for arg, value in (("learning_rate", learning_rate), ("weight_decay", weight_decay),
                           ("min_lr", min_lr), ("decay", decay)):
            radam_math.check_rate(arg, value)
        radam_math.check_rate("epsilon", epsilon or keras.config.epsilon(), positive=True)
        if isinstance(sma_threshold, bool) or not isinstance(sma_threshold, (int, float, np.number)) \
                or not np.isfinite(sma_threshold):
            raise ValueError(f"sma_threshold must be a finite number, got {sma_threshold!r}")
        super().__init__(learning_rate=maybe_float(learning_rate), name=name, **kwargs)
        self.beta_1 = float(beta_1)
        self.beta_2 = float(beta_2)
        self.epsilon = float(epsilon or keras.config.epsilon())
        self.amsgrad = bool(amsgrad)
        self.sma_threshold = float(sma_threshold)
        self.total_steps = int(total_steps)
        self.warmup_proportion = float(warmup_proportion)
        self.min_lr = float(min_lr)
        self.decay = decay
        # Cross-replica sum in float16 when set (radam_dist/distribute/compression.py).
        self.all_reduce_dtype = compression.validate_all_reduce_dtype(all_reduce_dtype)
        self.accumulation_steps = accumulation.validate_accumulation_steps(accumulation_steps)
        self.skip_nonfinite = bool(skip_nonfinite)
        self.shard_optimizer_state = bool(shard_optimizer_state)  # ZeRO-1: distribute/zero.py
        # The step: where m, v, vhat live (replicated, replica-sharded, on parameter
        # servers), how gradients are exchanged, which kernel updates what (step/plan.py).
        self._step_plan = StepPlan(self, self.shard_optimizer_state)
        self._state_layout = self._step_plan.layout
        # get_config reports the rate as given (1e-4, not its float32 9.9999997e-05).
        given = maybe_float(learning_rate)
        self._given_learning_rate = given if isinstance(given, float) else None
        # Decoupled decay is part of our update; Keras 3's own `weight_decay` stays unused.
        self.radam_weight_decay = maybe_float(weight_decay)
        self._has_weight_decay = callable(weight_decay) or weight_decay != 0.0
        self._aggregate_gradients = True
        self._init_slots()
        self._refuse_keras_accumulation_under_mirrored(self._distribution_strategy)

    # -- hyperparameters ----------------------------------------------------------------------
    @property
    def hyperparams(self) -> radam_math.RAdamHyperparams:
        return radam_math.RAdamHyperparams(
            beta_1=self.beta_1,
            beta_2=self.beta_2,
            epsilon=self.epsilon,
            amsgrad=self.amsgrad,
            sma_threshold=self.sma_threshold,
            total_steps=float(self.total_steps),
            warmup_proportion=self.warmup_proportion,
            min_lr=self.min_lr,
        )

    @property
    def learning_rate(self):
        return self._get_current_learning_rate()

    @learning_rate.setter
    def learning_rate(self, value):
        # Validated as in __init__ (ReduceLROnPlateau, `opt.lr = ...`): a bad value changes
        # nothing.
        radam_math.check_rate("learning_rate", value)
        keras.optimizers.Optimizer.learning_rate.fset(self, value)

    @property
    def weight_decay(self):
        return getattr(self, "radam_weight_decay", None)

    @weight_decay.setter
    def weight_decay(self, value):
        # Keras 3's base class assigns None here; our decay lives in `radam_weight_decay`.
        if value is not None:
            self.radam_weight_decay = value

    def _apply_weight_decay(self, variables):
        """Keras 3 would decay before the update; RAdam decays inside it (tfa's order)."""

    # -- state --------------------------------------------------------------------------------
    def build(self, var_list):
        if self.built:
            return
        self._refuse_build_inside_replica_step(self._step_plan.sums_in_graph())
        var_list = self._state_layout.expand(var_list)  # PSS: one slot per shard, on its server
        super().build(var_list)
        slot_names = self._SLOT_NAMES + (("vhat",) if self.amsgrad else ())
        self._state_layout.build_slots(self, var_list, slot_names)
        accumulation.build_gate_state(self, var_list)  # accumulators, skip counter
        self._step_plan.note_variables(var_list)
        self._step_plan.log_once()

    def _refuse_keras_accumulation_under_mirrored(self, strategy) -> None:
        """Keras' ``gradient_accumulation_steps`` puts the update (a merge_call) in a
        replica-context cond, which MirroredStrategy / MWMS refuse in a tf.function:
        refused up front, naming what works there."""
        from tensorflow.python.distribute import mirrored_strategy  # pylint: disable=import-outside-toplevel

        if self.gradient_accumulation_steps and isinstance(
                getattr(strategy, "extended", None), mirrored_strategy.MirroredExtended):
            raise ValueError(
                "Keras' gradient_accumulation_steps does not run under MirroredStrategy / "
                "MultiWorkerMirroredStrategy (its update sits in a replica-context cond): use "
                f"RectifiedAdam(accumulation_steps={self.gradient_accumulation_steps}) instead, "
                "the same mean-of-micro-batches step, which works under tf.distribute")

    def apply(self, grads, trainable_variables=None):
        if self.gradient_accumulation_steps and tf.distribute.has_strategy():
            self._refuse_keras_accumulation_under_mirrored(tf.distribute.get_strategy())
        if trainable_variables is not None:
            grads, trainable_variables = self._state_layout.expand_pairs(grads, trainable_variables)
            self._build_eagerly(trainable_variables)
        if accumulation.gate_is_active(self):  # accumulation / non-finite skipping
            variables = trainable_variables
            if variables is None:
                variables = self._trainable_variables
            return accumulation.gated_apply(self, grads, variables, super().apply)
        return super().apply(grads, trainable_variables)

    # -- one step -------------------------------------------------------------------------------
    def step_scalars(self, learning_rate=None, dtype: tf.DType = tf.float32) -> radam_math.StepScalars:
        """The per-step scalars of the next step (iterations + 1), in ``dtype``."""
        if learning_rate is None:
            learning_rate = self.learning_rate
        iterations = self.iterations
        lr = tf.cast(learning_rate, dtype)
        if self.decay > 0:
            lr = lr / (1.0 + tf.cast(self.decay, dtype) * tf.cast(iterations, dtype))
        weight_decay = _evaluate(self.radam_weight_decay, self._iterations)
        return radam_math.step_scalars(
            iterations + 1,
            lr,
            weight_decay,
            self.hyperparams,
            dtype=dtype,
            has_weight_decay=self._has_weight_decay,
        )

    @property
    def effective_learning_rate(self) -> tf.Tensor:
        """The rate the next step applies after warmup and legacy decay (tfa hid it, #2542).

        Same convention as Keras' ``learning_rate``: the value for step ``iterations + 1``.
        """
        return self.step_scalars().lr

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        variables = [v.value if isinstance(v, keras.Variable) else v for v in trainable_variables]
        grads_and_vars = list(zip(grads, variables))
        in_graph: Tuple[bool, ...] = ()  # per pair: summed across replicas in merge_call
        if self._aggregate_gradients:
            grads_and_vars, in_graph = gradient_sums.all_reduce_or_defer(
                self._step_plan, grads_and_vars, self._all_reduce_sum_gradients)
        grads_and_vars = list(zip(self._clip_aggregated([g for g, _ in grads_and_vars]), variables))
        self._step_plan.note_sparse([v for g, v in grads_and_vars if isinstance(g, tf.IndexedSlices)])
        dtypes = {radam_math.compute_dtype(v.dtype) for v in variables}
        scalars = {d.name: self.step_scalars(learning_rate, d) for d in sorted(dtypes, key=str)}
        tf.__internal__.distribute.interim.maybe_merge_call(
            # Plain Python (no autograph: it mis-converts a partial's callees).
            tf.autograph.experimental.do_not_convert(
                functools.partial(self._distributed_update, in_graph=in_graph)),
            self._distribution_strategy, grads_and_vars, scalars
        )

    def _distributed_update(self, distribution, grads_and_vars, scalars, in_graph=()):
        plan, cache = self._step_plan, self.compiled_cache()
        devices = plan.mirrored_devices(distribution)
        if any(in_graph):
            # The dense gradients' cross-replica sum, deferred to here (gradient_sums.py):
            # the fused chunks add every replica's gradient themselves; the per-variable
            # path gets each device's sum as a mirrored value.
            grads_and_vars = [
                (gradient_sums.DeferredSum(distribution, g) if deferred and devices
                 else gradient_sums.in_graph_sum(distribution, g) if deferred else g, v)
                for (g, v), deferred in zip(grads_and_vars, in_graph)]
        if plan.compiles_without_strategy(distribution):
            # Dense updates by the plan's kernel (radam_dist/executor.py); sparse gradients keep
            # the per-variable path below.
            dense = [(g, v) for g, v in grads_and_vars if fused.is_dense_float(g, v)]
            executor.update_dense([self._dense_update(var, grad, scalars) for grad, var in dense],
                                  plan=plan, cache=cache)
            grads_and_vars = [(g, v) for g, v in grads_and_vars if not fused.is_dense_float(g, v)]
        elif devices:
            grads_and_vars = self._update_each_device(
                distribution, devices, grads_and_vars, scalars, cache)
        for grad, var in grads_and_vars:
            distribution.extended.update(
                var, self._update_variable, args=(grad, scalars), group=False
            )

    def _update_each_device(self, distribution, devices, grads_and_vars, scalars, cache):
        """MirroredStrategy / MWMS: each device updates its copies of the dense variables
        itself (what ``extended.update`` does one variable at a time), by the plan's kernel;
        returns the pairs left to the per-variable path (sparse gradients, odd placements)."""
        layout = self._state_layout
        per_device: List[List[fused.DenseUpdate]] = [[] for _ in devices]
        local_scalars: Dict[tuple, radam_math.StepScalars] = {}  # same tensors: one group
        rest = []
        for grad, var in grads_and_vars:
            copies = layout.local_copies(distribution, var, devices)
            if isinstance(grad, gradient_sums.DeferredSum):  # every device: all replicas' parts
                grads = [grad.parts] * len(devices)
            else:
                grads = [executor.local_value(distribution, grad, i) for i in range(len(devices))]
            slots = [self._slot_value(name, var) for name in ("m", "v", "vhat")]
            slot_copies = [None if slot is None else layout.local_copies(distribution, slot, devices)
                           for slot in slots]
            if (copies is None or not all(fused.is_dense_float(g, var) for g in grads)
                    or any(c is None for c, slot in zip(slot_copies, slots) if slot is not None)):
                if isinstance(grad, gradient_sums.DeferredSum):
                    grad = gradient_sums.in_graph_sum(distribution, grad.value)
                rest.append((grad, var))
                continue
            s = self._variable_scalars(var, scalars)
            for i in range(len(devices)):
                key = (i, radam_math.compute_dtype(var.dtype).name, s.has_weight_decay)
                if key not in local_scalars:
                    local_scalars[key] = executor.local_scalars(distribution, s, i)
                m, v, vhat = (None if c is None else c[i] for c in slot_copies)
                per_device[i].append(
                    fused.DenseUpdate(copies[i], grads[i], m, v, vhat, local_scalars[key]))
        for device, updates in zip(devices, per_device):
            if updates:
                executor.update_dense(updates, plan=self._step_plan, cache=cache, device=device)
        return rest

    def _variable_scalars(self, var, scalars: Dict[str, radam_math.StepScalars]):
        s = scalars[radam_math.compute_dtype(var.dtype).name]
        if s.has_weight_decay and not self._use_weight_decay(var):
            s = s._replace(has_weight_decay=False)
        return s

    def _dense_update(self, var, grad, scalars) -> "fused.DenseUpdate":
        m, v, vhat = (self._slot_value(name, var) for name in ("m", "v", "vhat"))
        return fused.DenseUpdate(var, grad, m, v, vhat, self._variable_scalars(var, scalars))

    def _update_variable(self, var, grad, scalars: Dict[str, radam_math.StepScalars]):
        m, v, vhat = (self._slot_value(name, var) for name in ("m", "v", "vhat"))
        executor.update_one(var, grad, m, v, vhat, self._variable_scalars(var, scalars))

    def _slot_value(self, name, var):
        return self._state_layout.slot_variable(self, name, var)

    def update_step(self, gradient, variable, learning_rate):
        """Keras 3's per-variable hook (used by wrappers that drive variables one by one)."""
        var = variable.value if isinstance(variable, keras.Variable) else variable
        dtype = radam_math.compute_dtype(var.dtype)
        self._update_variable(var, gradient, {dtype.name: self.step_scalars(learning_rate, dtype)})

    def _backend_apply_gradients(self, grads, trainable_variables):
        frequency = self.ema_overwrite_frequency if self.use_ema else None
        if not frequency or not tf.distribute.has_strategy() or (
                tf.distribute.in_cross_replica_context()):
            return self._state_layout.apply_gradients(
                self, grads, trainable_variables, super()._backend_apply_gradients)
        # Keras overwrites the variables with their averages inside a cond in replica
        # context, and the overwrite (extended.update) calls merge_call there, which
        # MirroredStrategy / MWMS refuse in a tf.function. The same step with the decision
        # taken in cross-replica context (one merge_call, as the update's own). The replicas
        # run in threads of their own: what is deferred is marked per thread.
        should_overwrite = tf.equal((self.iterations + 1) % frequency, 0)
        deferred = _EMA_OVERWRITE_DEFERRED.__dict__.setdefault("ids", set())
        deferred.add(id(self))
        try:
            result = self._state_layout.apply_gradients(
                self, grads, trainable_variables, super()._backend_apply_gradients)
        finally:
            deferred.discard(id(self))

        def overwrite(distribution, should_overwrite):
            def run():
                keras.optimizers.Optimizer._overwrite_model_variables_with_average_value(
                    self, self._trainable_variables)
                return tf.constant(True)

            tf.cond(executor.local_value(distribution, should_overwrite, 0), run,
                    lambda: tf.constant(False))

        tf.__internal__.distribute.interim.maybe_merge_call(
            overwrite, self._distribution_strategy, should_overwrite)
        return result

    def _overwrite_model_variables_with_average_value(self, trainable_variables):
        if id(self) in _EMA_OVERWRITE_DEFERRED.__dict__.get("ids", ()):
            return  # inside Keras' replica-context cond: the step's merge_call does it
        super()._overwrite_model_variables_with_average_value(trainable_variables)

    def _all_reduce_sum_gradients(self, grads_and_vars):
        """Keras' float32 cross-replica sum, or the compressed one (``all_reduce_dtype``)."""
        if self.all_reduce_dtype is None:
            return super()._all_reduce_sum_gradients(grads_and_vars)
        return compression.compressed_all_reduce_sum(
            grads_and_vars, self.all_reduce_dtype, super()._all_reduce_sum_gradients
        )

    def _clip_gradients(self, grads):
        """Keras 3 clips before the cross-replica sum; we clip after it (``_clip_aggregated``)
        as tf.keras did, so clipping sees the global batch's gradient."""
        return grads

    def _clip_aggregated(self, grads):
        """tf.keras's clipping (tf.clip_by_*), which also clips IndexedSlices values."""
        if self.clipnorm and self.clipnorm > 0:
            return [None if g is None else tf.clip_by_norm(g, self.clipnorm) for g in grads]
        if self.global_clipnorm and self.global_clipnorm > 0:
            present = [g for g in grads if g is not None]
            clipped = iter(tf.clip_by_global_norm(present, self.global_clipnorm)[0])
            return [None if g is None else next(clipped) for g in grads]
        if self.clipvalue and self.clipvalue > 0:
            c = self.clipvalue
            return [None if g is None else tf.clip_by_value(g, -c, c) for g in grads]
        return grads

    # -- config ---------------------------------------------------------------------------------
    def get_config(self) -> dict:
        """tfa's keys (learning_rate, beta_1, ..., min_lr, decay) plus Keras 3's own.

        A callable that Keras cannot serialize is saved as its current value, as tf.keras did.
        """
        learning_rate = self._learning_rate
        if _is_unserializable_callable(learning_rate):
            self._learning_rate = tf.constant(_evaluate(learning_rate, None), tf.float32)
        try:
            config = super().get_config()
        finally:
            self._learning_rate = learning_rate
        given = self.__dict__.get("_given_learning_rate")
        saved = config.get("learning_rate")
        unchanged = isinstance(saved, float) and np.float32(saved) == np.float32(given)
        if given is not None and unchanged:
            config["learning_rate"] = given  # unchanged since given: the value as given
        config.update(
            {
                "weight_decay": _serialize_hyper(self.radam_weight_decay),
                "beta_1": self.beta_1,
                "beta_2": self.beta_2,
                "epsilon": self.epsilon,
                "amsgrad": self.amsgrad,
                "sma_threshold": self.sma_threshold,
                "total_steps": self.total_steps,
                "warmup_proportion": self.warmup_proportion,
                "min_lr": self.min_lr,
                "decay": self.decay,
                "all_reduce_dtype": self.all_reduce_dtype,
                "accumulation_steps": self.accumulation_steps,
                "skip_nonfinite": self.skip_nonfinite,
                "shard_optimizer_state": self.shard_optimizer_state,
            }
        )
        return config

    @classmethod
    def from_config(cls, config: dict, custom_objects=None):
        config = dict(config)
        for key in ("learning_rate", "lr", "weight_decay"):
            if key in config:
                config[key] = _deserialize_hyper(config[key], custom_objects)
        return cls(**config)


# Serialize as radam_dist>RectifiedAdam; also load tfa configs ("Addons>RectifiedAdam").
keras.saving.get_custom_objects()["Addons>RectifiedAdam"] = RectifiedAdam
RectifiedAdam = keras.saving.register_keras_serializable(package="radam_dist")(RectifiedAdam)
