"""``Lookahead`` (Zhang et al., 2019, arXiv:1907.08610) around any Keras 3 optimizer.

With ``RectifiedAdam`` inside it is "Ranger". Semantics are tfa 0.23's: slow weights start
at the variables' values; after inner steps k, 2k, ... (1-based)
``slow += slow_step_size * (fast - slow)`` and ``fast = slow``; one step counter, the inner
optimizer's.

Fixed relative to tfa:
* slots may be created lazily inside the first distributed step (tfa needed them to exist
  before a MirroredStrategy step);
* the synchronisation runs only on sync steps, so an embedding table with sparse gradients is
  not rewritten on every step;
* a step the inner optimizer skips (a LossScaleOptimizer seeing inf/NaN gradients) neither
  advances nor triggers the synchronisation (tensorflow/addons#2351).
"""

from __future__ import annotations

from typing import List, Union

import keras
import tensorflow as tf

from radam_dist import executor, radam_math
from radam_dist.optimizers.classic_api import ClassicOptimizerAPI
from radam_dist.optimizers.wrapper import (
    ForwardsToInnerOptimizer,
    pop_inner_only_arguments,
    resolve_inner_optimizer,
    step_counter,
)
from radam_dist.step.plan import StepPlan


class Lookahead(ForwardsToInnerOptimizer, ClassicOptimizerAPI, keras.optimizers.Optimizer):
    """Wraps ``optimizer``; every ``sync_period`` steps pulls the weights toward slow copies.

    Args:
        optimizer: a Keras 3 optimizer instance, or its name / config.
        sync_period: k, the number of inner steps between synchronisations.
        slow_step_size: alpha, how far the slow weights move toward the fast ones.
    """

    def __init__(
        self,
        optimizer: Union[keras.optimizers.Optimizer, str, dict],
        sync_period: int = 6,
        slow_step_size: float = 0.5,
        name: str = "Lookahead",
        **kwargs,
    ):
        for key in ("is_legacy_optimizer", "jit_compile"):
            kwargs.pop(key, None)
        # clipnorm, use_ema, loss_scale_factor, ... act in Keras' apply(), which Lookahead
        # replaces: set them on the inner optimizer (refused here, never ignored).
        pop_inner_only_arguments(kwargs, "Lookahead")
        optimizer = resolve_inner_optimizer(optimizer, "Lookahead")
        radam_math.check_lookahead_hyperparameters(sync_period, slow_step_size)
        super().__init__(learning_rate=0.0, name=name, **kwargs)
        # The step counter and the learning rate are the inner optimizer's; the base class's
        # own two stay unused (untracking them would make the list unsaveable by checkpoints).
        self.inner_optimizer = optimizer
        self.sync_period = int(sync_period)
        self.slow_step_size = float(slow_step_size)
        self._aggregate_gradients = True
        self._init_slots()
        # The slow weights live where the inner optimizer keeps its state (sharded with it).
        inner_layout = getattr(optimizer, "_state_layout", None)
        self._step_plan = StepPlan(
            self, bool(inner_layout is not None and inner_layout.shards_state), role="lookahead")
        self._state_layout = self._step_plan.layout

    # -- shared state (step counter and learning rate: ForwardsToInnerOptimizer) ------------------
    @property
    def variables(self) -> list:
        unused = (self._iterations, self._learning_rate)
        own = [v for v in self._variables if not any(v is u for u in unused)]
        return own + list(self.inner_optimizer.variables)

    @property
    def weights(self) -> list:
        """tfa's order: the step count, the slow weights, then the inner optimizer's slots."""
        inner = self.inner_optimizer
        # The step counter itself (with gradient_accumulation_steps `iterations` is a
        # tensor, micro-steps // k, which set_weights could not assign).
        counter = step_counter(self)
        inner_slots = inner.weights[1:] if isinstance(inner, ClassicOptimizerAPI) else [
            v for v in inner.variables if v is not counter
            and v is not getattr(inner, "_learning_rate", None)
        ]
        return [counter] + self._slot_variables() + inner_slots

    def _logical_variables(self) -> list:
        """``variables`` with every slot whole (what ``.keras`` files hold)."""
        unused = (self._iterations, self._learning_rate)
        own = [v for v in super()._logical_variables() if not any(v is u for u in unused)]
        inner = self.inner_optimizer
        if isinstance(inner, ClassicOptimizerAPI):
            return own + inner._logical_variables()
        return own + list(inner.variables)

    def _restart_slots(self) -> None:
        """Before the first step the slow weights are the variables (a model loaded from a
        file saved untrained: the optimizer was built before the weights were loaded)."""
        if isinstance(self.inner_optimizer, ClassicOptimizerAPI):
            self.inner_optimizer._restart_slots()
        own = [name for name in self._state_layout.slot_names(self) if name == "slow"]
        if not own:
            return
        for var in self._trainable_variables:
            slow = self._state_layout.get_slot(self, var, "slow")
            if isinstance(slow, tf.Tensor):  # a gathered copy: set the whole through weights
                index = self._index_of(var)
                self._state_layout.slot_entries(self)[index].assign(var)
            else:
                slow.assign(var)

    def get_slot(self, var, slot_name: str):
        """``"slow"``, or the inner optimizer's slot (whole; see ClassicOptimizerAPI.get_slot)."""
        if slot_name not in self.get_slot_names():
            raise KeyError(f"{self.__class__.__name__} has no slot named {slot_name!r}; its "
                           f"slots are {self.get_slot_names()}")
        if slot_name != "slow" and isinstance(self.inner_optimizer, ClassicOptimizerAPI):
            return self.inner_optimizer.get_slot(var, slot_name)
        return super().get_slot(var, slot_name)

    def get_slot_names(self) -> List[str]:
        inner = self.inner_optimizer
        names = inner.get_slot_names() if isinstance(inner, ClassicOptimizerAPI) else []
        return names + [n for n in super().get_slot_names() if n not in names]

    def build(self, var_list):
        if self.built:
            return
        inner = self.inner_optimizer
        inner_plan = getattr(inner, "_step_plan", None)
        self._refuse_build_inside_replica_step(
            inner_plan is not None and inner_plan.sums_in_graph())
        var_list = self._state_layout.expand(var_list)  # PSS: one slot per shard, on its server
        if not self.inner_optimizer.built:
            self.inner_optimizer.build(var_list)
        super().build(var_list)
        self._state_layout.build_slots(self, var_list, ("slow",), start_at_variables=True)
        self._step_plan.note_variables(var_list)
        self._step_plan.log_once()

    # -- one step -------------------------------------------------------------------------------
    def apply(self, grads, trainable_variables=None):
        if trainable_variables is None:
            trainable_variables = self._trainable_variables
        else:
            grads, trainable_variables = self._state_layout.expand_pairs(grads, trainable_variables)
            self._build_eagerly(trainable_variables)
            self._check_variables_are_known(trainable_variables)
        before = tf.identity(self.iterations)
        inner = self.inner_optimizer
        forwarded = hasattr(inner, "_aggregate_gradients")
        if forwarded:
            previous, inner._aggregate_gradients = inner._aggregate_gradients, self._aggregate_gradients
        try:
            with tf.control_dependencies([before]):
                inner.apply(grads, trainable_variables)
        finally:
            if forwarded:
                inner._aggregate_gradients = previous
        after = tf.convert_to_tensor(self.iterations)
        sync = tf.logical_and(after > before, after % self.sync_period == 0)
        # Variables with `overwrite_with_gradient` hold their gradient's value (Keras' rule:
        # no optimizer touches them); the slow weights leave them alone.
        synced = [v for v in trainable_variables if not self._overwrite_variable_with_gradient(v)]
        variables = [v.value if isinstance(v, keras.Variable) else v for v in synced]
        if not variables:
            return None
        result = self._state_layout.lookahead_sync(
            self, variables, sync, lambda: self._replicated_sync(variables, sync, after))
        # The pull-back moved the weights after the inner step applied their constraints
        # (a NonNeg kernel would go negative): apply them again on sync steps, as Keras
        # applies them after every update.
        constrained = [(v.value if isinstance(v, keras.Variable) else v, v.constraint)
                       for v in synced if getattr(v, "constraint", None) is not None]
        if constrained:
            self._apply_constraints(constrained, sync)
        return result

    def _apply_constraints(self, constrained, sync) -> None:
        """``var.assign(constraint(var))`` for each pair, on the steps where ``sync`` holds;
        under a strategy in cross-replica context (one branch per copy, as the sync)."""

        def constrain(var, constraint):
            var.assign(constraint(tf.convert_to_tensor(var)))

        def constrain_all():
            for var, constraint in constrained:
                constrain(var, constraint)

        if not tf.distribute.has_strategy():
            return executor.when(sync, constrain_all)

        def cross_replica(distribution, sync):
            for var, constraint in constrained:
                distribution.extended.update(
                    var, lambda copy, pred, c=constraint: executor.when(
                        pred, lambda: constrain(copy, c)),
                    args=(sync,), group=False)

        tf.__internal__.distribute.interim.maybe_merge_call(
            cross_replica, self._distribution_strategy, sync)

    def _replicated_sync(self, variables, sync, after) -> None:
        one = radam_math.runtime_one(tf.cast(tf.maximum(after, 1), tf.float32))
        if self._step_plan.compiles_without_strategy(self._distribution_strategy):
            # No strategy: one branch for all variables, not one per variable.
            return executor.when(sync, lambda: self._pull_back_all(variables, one))
        tf.__internal__.distribute.interim.maybe_merge_call(
            self._distributed_sync, self._distribution_strategy, variables, sync, one
        )

    def _slow(self, var):
        return self._state_layout.slot_variable(self, "slow", var)

    def _pull_back_all(self, variables, one) -> None:
        pairs = [(var, self._slow(var)) for var in variables]
        executor.pull_back(pairs, self.slow_step_size, one, plan=self._step_plan,
                           cache=self.compiled_cache())

    def _distributed_sync(self, distribution, variables, sync, one):
        devices = self._step_plan.mirrored_devices(distribution)
        if devices and not radam_math.in_xla_context():
            variables = self._sync_on_each_device(distribution, devices, variables, sync, one)
        for var in variables:
            distribution.extended.update(var, self._sync_variable, args=(sync, one), group=False)

    def _sync_on_each_device(self, distribution, devices, variables, sync, one) -> list:
        """MirroredStrategy / MWMS: one branch per device over that device's (fast, slow)
        copies, by the plan's kernel, not one per variable; returns the variables left to
        the per-variable path (those whose copies are not where the strategy's devices are)."""
        layout = self._state_layout
        per_device: List[list] = [[] for _ in devices]
        rest = []
        for var in variables:
            copies = layout.local_copies(distribution, var, devices)
            slow = self._slow(var)
            slows = None if slow is None else layout.local_copies(distribution, slow, devices)
            if copies is None or slows is None:
                rest.append(var)
                continue
            for i, pair in enumerate(zip(copies, slows)):
                per_device[i].append(pair)
        cache = self.compiled_cache()
        for i, (device, pairs) in enumerate(zip(devices, per_device)):
            if not pairs:
                continue
            one_i = executor.local_value(distribution, one, i)
            with tf.device(device):
                executor.when(executor.local_value(distribution, sync, i),
                              lambda pairs=pairs, one_i=one_i, device=device: executor.pull_back(
                                  pairs, self.slow_step_size, one_i, plan=self._step_plan,
                                  cache=cache, device=device))
        return rest

    def _sync_variable(self, var, sync, one):
        slow = self._slow(var)
        executor.when(sync, lambda: executor.pull_back_one(var, slow, self.slow_step_size, one))

    # -- config ---------------------------------------------------------------------------------
    def get_config(self) -> dict:
        return {
            "name": self.name,
            "optimizer": keras.optimizers.serialize(self.inner_optimizer),
            "sync_period": self.sync_period,
            "slow_step_size": self.slow_step_size,
        }


keras.saving.get_custom_objects()["Addons>Lookahead"] = Lookahead
Lookahead = keras.saving.register_keras_serializable(package="radam_dist")(Lookahead)
