"""The tf.keras (Keras 2) optimizer API that tensorflow-addons users call, on Keras 3.

Keras 3 optimizers keep their state in flat variable lists and dropped slots, ``minimize``
with a tape, ``get_weights`` and the ``name`` / ``experimental_aggregate_gradients``
arguments. Code written against ``tfa.optimizers`` uses all of them, so both radam_dist
optimizers mix this class in.
"""

from __future__ import annotations

from typing import Callable, Iterable, List, Optional, Sequence, Union

import keras
import numpy as np
import tensorflow as tf


class ClassicOptimizerAPI:
    """Slots, weights and ``minimize`` as tf.keras optimizers had them.

    Subclasses create their slots through ``add_slot`` (in ``build``), which keeps one list per
    slot name indexed like the trainable variables, and the creation order that
    ``get_weights`` reports (iteration count first, then slots, as tfa did).
    """

    def _init_slots(self) -> None:
        # slot name -> list of slot variables, indexed like the variables the optimizer was
        # built with (string keys and lists keep tf.train.Checkpoint able to track them).
        self._slots = {}

    # -- slots ------------------------------------------------------------------------------
    def _index_of(self, var) -> int:
        try:
            return self._get_variable_index(var)
        except KeyError:
            raise KeyError(
                f"variable {getattr(var, 'path', getattr(var, 'name', var))!r} is not among the "
                f"variables {self.__class__.__name__} was built with"
            ) from None

    def add_slot(self, var, slot_name: str, initializer="zeros"):
        """Create (or return the existing) slot ``slot_name`` for ``var``.

        ``var`` must be one of the variables the optimizer is built with (slots are created
        in ``build``). ``initializer`` is a Keras initializer, its name, or a tensor /
        variable whose value the slot starts with.
        """
        index = self._index_of(var)
        per_var = list(self._slots.get(slot_name, [None] * len(self._trainable_variables)))
        if per_var[index] is not None:
            return per_var[index]
        if not isinstance(initializer, (str, keras.initializers.Initializer)):
            # An initial value. Made the variable's initializer, not assigned afterwards: a
            # checkpoint restored before the slots existed restores into them on creation.
            with tf.init_scope():  # never an op of a traced step
                value = tf.convert_to_tensor(initializer)
            initializer = _ValueInitializer(value)
        slot = self.add_variable_from_reference(var, name=slot_name, initializer=initializer)
        per_var[index] = slot
        # A fresh list each time: checkpoint tracking refuses lists mutated in place.
        self._slots[slot_name] = per_var
        return slot

    def get_slot(self, var, slot_name: str):
        """The slot ``slot_name`` of ``var`` (KeyError naming what exists if absent).

        Replicated state: the slot variable itself. ZeRO (``shard_optimizer_state=True``
        under a strategy): the whole slot gathered from the replicas, a ``tf.Tensor`` copy
        (change the state through ``set_weights``). A sharded variable under
        ParameterServerStrategy: the ShardedVariable of its shard slots.
        """
        if slot_name not in self.get_slot_names():
            raise KeyError(
                f"{self.__class__.__name__} has no slot named {slot_name!r}; "
                f"its slots are {self.get_slot_names()}"
            )
        return self._state_layout.get_slot(self, var, slot_name)

    def get_slot_names(self) -> List[str]:
        """Slot names in creation order, e.g. ``['m', 'v']`` (plus ``'vhat'`` with amsgrad)."""
        names = self._state_layout.slot_names(self)
        return names + [name for name in self._slots if name not in names]

    def __dir__(self):
        # tf.train.Checkpoint treats any object whose dir() lists `get_slot_names` as a TF1 /
        # tf.keras optimizer and saves its slots a second time, as slot references, which it
        # refuses for variables that are already ordinary dependencies (ours are, as in every
        # Keras 3 optimizer). The method stays callable; it is only left out of the listing.
        return [name for name in super().__dir__() if name != "get_slot_names"]

    def _slot_variables(self) -> list:
        """Every slot in creation order (whole views of sharded ones; see state_layout)."""
        layout = self._state_layout
        entries = layout.slot_entries(self)
        if layout.shards_state:  # slots added by add_slot stay replicated
            entries += [slot for per_var in self._slots.values() for slot in per_var
                        if slot is not None]
        return entries

    # -- what a state layout may ask (radam_dist/distribute/state_host.py) ------------------
    @property
    def distribution_strategy(self):
        """The strategy the optimizer was made under (its state lives there)."""
        return self._distribution_strategy

    @property
    def state_layout(self):
        """Where the state lives (radam_dist/distribute/state_layout.py)."""
        return self._state_layout

    def step_plan(self):
        """The plan of this optimizer's step (``radam_dist.step.plan.StepPlan``): where the
        state lives, how gradients are exchanged and which kernel updates each variable
        group, with why. ``print(opt.step_plan())`` answers "why is my step slow"."""
        return self._step_plan

    def compiled_cache(self) -> dict:
        """Compiled update chunks kept from step to step (not tracked by Keras)."""
        return self.__dict__.setdefault("_fused_compiled", {})

    def variable_index(self, variable) -> int:
        """The position of ``variable`` among the variables the optimizer was built with
        (KeyError naming it when it is not one of them)."""
        return self._index_of(variable)

    def variable_key(self, variable):
        """A key for ``variable`` that every wrapper of it shares (Keras' own)."""
        return self._var_key(variable)

    def slot_table(self) -> dict:
        """Slot name -> per-variable list of slot variables (``add_slot``'s table)."""
        return self._slots

    def tracked_variables(self) -> list:
        """Keras' own list of the optimizer's variables, in creation order."""
        return self._variables

    def tracked_dependency(self, name: str):
        """The checkpoint dependency ``name`` of the optimizer, or None."""
        return self._lookup_dependency(name)

    @property
    def sums_gradients(self) -> bool:
        """False where the caller summed the gradients across replicas already
        (``experimental_aggregate_gradients=False``)."""
        return getattr(self, "_aggregate_gradients", True)

    def sum_gradients(self, grads_and_vars) -> list:
        """The cross-replica sum of the pairs (order and None gradients kept)."""
        return self._all_reduce_sum_gradients(grads_and_vars)

    def clip_summed(self, grads) -> list:
        """Clipping (clipnorm, global_clipnorm, clipvalue) of summed gradients, as tf.keras."""
        return self._clip_aggregated(grads)

    def decays(self, variable) -> bool:
        """Does weight decay apply to ``variable`` (``exclude_from_weight_decay``)?"""
        return self._use_weight_decay(variable)

    def guard_checkpoint_children(self, guard: Callable[[str], None]) -> None:
        """Have ``guard(name)`` see (and may refuse, by raising) every child a checkpoint
        restores into this optimizer before it has that child (TensorFlow files those among
        the object's deferred dependencies)."""
        self._maybe_initialize_trackable()
        table = getattr(self, "_self_unconditional_deferred_dependencies", None)
        if isinstance(table, dict) and not isinstance(table, _GuardedDependencies):
            object.__setattr__(self, "_self_unconditional_deferred_dependencies",
                               _GuardedDependencies(guard, table))

    # -- the state layout (radam_dist/distribute/state_layout.py) ---------------------------
    def _logical_variables(self) -> list:
        """Keras' ``variables`` with every slot whole: what ``.keras`` files hold, the same
        list in every state layout and for every number of replicas."""
        return self._state_layout.logical_variables(self, list(self._variables))

    def save_own_variables(self, store) -> None:
        """``.keras`` save: the whole state (sharded slots gathered)."""
        for i, variable in enumerate(self._logical_variables()):
            store[str(i)] = np.asarray(tf.convert_to_tensor(variable))

    def load_own_variables(self, store) -> None:
        """``.keras`` load: the whole state, scattered where the layout shards it.

        A file whose state does not fit (another optimizer configuration) is refused with
        ValueError rather than skipped; an unbuilt optimizer keeps Keras' warning.
        """
        targets = self._logical_variables()
        if not self.built or not targets:
            return super().load_own_variables(store)
        if len(store.keys()) != len(targets) and _never_stepped(store):
            # Saved before its first step (a compiled, untrained model): its state is the
            # initial one. Keras' own behaviour: warn, load nothing; slots that start at the
            # variables start at the loaded ones.
            super().load_own_variables(store)
            return self._restart_slots()
        if len(store.keys()) != len(targets):
            raise ValueError(
                f"cannot load the optimizer state of {self.name!r}: the file holds "
                f"{len(store.keys())} arrays, this optimizer has {len(targets)} (its "
                f"configuration differs, e.g. amsgrad, accumulation_steps or the model)"
            )
        values = [np.asarray(store[str(i)]) for i in range(len(targets))]
        for target, value in zip(targets, values):
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(
                    f"cannot load the optimizer state of {self.name!r}: "
                    f"{getattr(target, 'path', target.name)!r} has shape {tuple(target.shape)}, "
                    f"the file holds {value.shape}"
                )
        for target, value in zip(targets, values):
            target.assign(value)

    def _restart_slots(self) -> None:
        """Give slots that start at the variables' values (Lookahead's) those values now."""

    def _trackable_children(self, save_type="checkpoint", **kwargs):
        """tf.train.Checkpoint's view of the optimizer: the layout presents sharded slots
        under the keys replicated slot variables have (see state_layout)."""
        children = super()._trackable_children(save_type, **kwargs)
        layout = self.__dict__.get("_state_layout")
        return children if layout is None else layout.checkpoint_children(self, children)

    def _build_eagerly(self, variables: Sequence) -> None:
        """Create the slots outside any traced step, once.

        Keras 3 creates optimizer variables lazily in the first ``apply``; inside
        ``strategy.run`` in a tf.function that lifts initializers that capture
        replica-local tensors and fails (``cond/Placeholder``). Building in the eager
        outer context, under the optimizer's strategy, makes lazy creation safe.
        """
        if self.built:
            return
        variables = list(variables)

        def build(*_):
            with tf.init_scope(), self._distribution_strategy.scope():
                with keras.name_scope(self.name, caller=self):
                    self.build(variables)
                self.built = True

        replica_context = tf.distribute.get_replica_context()
        if tf.distribute.has_strategy() and replica_context is not None:
            replica_context.merge_call(build)
        else:
            build()

    # -- weights ----------------------------------------------------------------------------
    @property
    def weights(self) -> list:
        """tfa's layout: the iteration count, then every slot in creation order; then, where
        Keras' base optimizer keeps state of its own, the EMA averages (``use_ema``) and the
        gradient accumulators (``gradient_accumulation_steps``), so that ``set_weights``
        restores the whole state."""
        # The counter itself: with gradient_accumulation_steps `iterations` is a tensor
        # (micro-steps // k) that neither restores the micro-step nor takes an assign.
        return [self._iterations] + self._slot_variables() + self._keras_base_state()

    def _keras_base_state(self) -> list:
        """The variables Keras' base class made in ``build``: EMA averages, then gradient
        accumulators (None entries, for ``overwrite_with_gradient`` variables, left out)."""
        state = []
        if self.use_ema:
            state += list(self.__dict__.get("_model_variables_moving_average") or [])
        if self.gradient_accumulation_steps:
            state += list(self.__dict__.get("_accumulated_gradients") or [])
        return [v for v in state if v is not None]

    def get_weights(self) -> List[np.ndarray]:
        """Values of ``weights`` as numpy arrays (a tfa optimizer's list loads here too)."""
        return [np.asarray(tf.convert_to_tensor(w)) for w in self.weights]

    def set_weights(self, weights: Sequence) -> None:
        """Set ``weights`` from a list laid out as ``get_weights`` returns it.

        Validates every entry before assigning any, so a bad list changes nothing.
        """
        targets = self.weights
        if not self.built:
            raise ValueError(
                "set_weights() needs the optimizer's slots: call optimizer.build(variables) "
                "(or apply one step) first"
            )
        if len(weights) != len(targets):
            raise ValueError(
                f"{self.__class__.__name__}.set_weights expected {len(targets)} arrays "
                f"(the iteration count, then {len(targets) - 1} slots), got {len(weights)}"
            )
        values = []
        for target, weight in zip(targets, weights):
            weight = np.asarray(weight)
            if tuple(weight.shape) != tuple(target.shape):
                raise ValueError(
                    f"weight for {target.name!r} has shape {weight.shape}, "
                    f"expected {tuple(target.shape)}"
                )
            values.append(weight)
        for target, weight in zip(targets, values):
            target.assign(weight.astype(np.dtype(getattr(target.dtype, "name", target.dtype))))

    # -- lazy builds inside a traced step ---------------------------------------------------
    def _refuse_build_inside_replica_step(self, sums_in_graph: bool) -> None:
        """ValueError where ``build`` runs inside ``strategy.run`` in a tf.function under a
        single-worker MirroredStrategy whose step uses Keras' all-reduce.

        Only a wrapper builds us there: our own first ``apply`` builds eagerly
        (``_build_eagerly``), but Keras' LossScaleOptimizer creates its own variables in the
        traced step and then builds its inner optimizer. With Keras' all-reduce (clipnorm,
        clipvalue, global_clipnorm, all_reduce_dtype, or a Keras optimizer) inside its
        cross-replica cond, that step fails at run time on an uninitialised placeholder (Keras'
        own Adam too); the in-graph sum of the default step is unaffected."""
        from tensorflow.python.distribute import mirrored_strategy  # pylint: disable=import-outside-toplevel

        if tf.executing_eagerly() or sums_in_graph or not tf.distribute.has_strategy():
            return
        if tf.distribute.in_cross_replica_context():
            return
        extended = tf.distribute.get_strategy().extended
        if (type(extended) is not mirrored_strategy.MirroredExtended  # pylint: disable=unidiomatic-typecheck
                or getattr(extended, "_is_multi_worker_training", False)):
            return
        raise ValueError(
            f"{self.__class__.__name__} is being built inside a traced strategy.run step (by a "
            "wrapper such as keras.optimizers.LossScaleOptimizer, which creates its variables "
            "there); with clipnorm / clipvalue / global_clipnorm / all_reduce_dtype under "
            "MirroredStrategy that step fails on an uninitialised placeholder. Build the "
            "outermost optimizer first, inside strategy.scope(): "
            "optimizer.build(model.trainable_variables) (model.fit does this)"
        )

    # -- tf.keras's `lr` -------------------------------------------------------------------
    @property
    def lr(self):
        """tf.keras's name of ``learning_rate`` (read and write)."""
        # tf.keras returned the tf.Variable itself: `opt.lr.read_value()`, `opt.lr.assign(x)`.
        rate = self.learning_rate
        return rate.value if isinstance(rate, keras.Variable) else rate

    @lr.setter
    def lr(self, value):
        self.learning_rate = value

    # -- tf.keras call signatures -----------------------------------------------------------
    def apply_gradients(
        self,
        grads_and_vars: Iterable,
        name: Optional[str] = None,
        experimental_aggregate_gradients: bool = True,
    ):
        """Apply one step. ``experimental_aggregate_gradients=False`` means the gradients were
        already summed across replicas by the caller (as in tf.keras)."""
        grads_and_vars = list(grads_and_vars)
        if not grads_and_vars:
            return self.iterations
        grads, variables = zip(*grads_and_vars)
        previous = getattr(self, "_aggregate_gradients", True)
        self._aggregate_gradients = experimental_aggregate_gradients
        try:
            self.apply(list(grads), list(variables))
        finally:
            self._aggregate_gradients = previous
        return self.iterations

    def minimize(
        self,
        loss: Union[tf.Tensor, Callable],
        var_list: Union[Sequence, Callable],
        grad_loss=None,
        name: Optional[str] = None,
        tape: Optional[tf.GradientTape] = None,
    ):
        """Compute gradients of ``loss`` and apply them, as tf.keras's ``minimize`` did.

        ``loss`` is a zero-argument callable, or a tensor together with the ``tape`` that
        recorded it; ``var_list`` is a list of variables or a callable returning one.
        """
        if not callable(loss) and tape is None:
            raise ValueError("`tape` is required when a `Tensor` loss is passed.")
        tape = tape if tape is not None else tf.GradientTape()
        if callable(loss):
            with tape:
                if not callable(var_list):
                    tape.watch(_tf_variables(var_list))
                loss = loss()
                if callable(var_list):
                    var_list = var_list()
        var_list = list(tf.nest.flatten(var_list))
        # The tape takes tf.Variables: a keras.Variable's is its `.value`.
        grads = tape.gradient(loss, _tf_variables(var_list), grad_loss)
        return self.apply_gradients(zip(grads, var_list), name=name)


def _never_stepped(store) -> bool:
    """True when a saved optimizer state's first array, the step count, is 0."""
    try:
        first = np.asarray(store["0"])
    except KeyError:
        return True
    return first.shape == () and np.issubdtype(first.dtype, np.integer) and int(first) == 0


class _GuardedDependencies(dict):
    """An optimizer's deferred checkpoint dependencies, each new key shown to a guard."""

    def __init__(self, guard, *args):
        super().__init__(*args)
        self.guard = guard

    def setdefault(self, key, default=None):
        self.guard(key)
        return super().setdefault(key, default)

    def __setitem__(self, key, value):
        self.guard(key)
        super().__setitem__(key, value)


class _ValueInitializer(keras.initializers.Initializer):
    """Starts a slot at a given value (Lookahead's slow weights start at the variables)."""

    def __init__(self, value):
        self.value = value

    def __call__(self, shape, dtype=None):
        return tf.cast(self.value, dtype or self.value.dtype)


def _tf_variables(variables) -> list:
    return [v.value if isinstance(v, keras.Variable) else v for v in tf.nest.flatten(variables)]


def maybe_float(value):
    """Keras 3 wants a float learning rate; tf.keras accepted ints and numpy scalars."""
    if isinstance(value, (int, np.integer, np.floating)) and not isinstance(value, bool):
        return float(value)
    return value
