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
        value = None
        if not isinstance(initializer, (str, keras.initializers.Initializer)):
            value, initializer = initializer, "zeros"
        slot = self.add_variable_from_reference(var, name=slot_name, initializer=initializer)
        if value is not None:
            with tf.init_scope():  # an initial value, never an op of a traced step
                slot.assign(tf.cast(tf.convert_to_tensor(value), slot.dtype))
        per_var[index] = slot
        # A fresh list each time: checkpoint tracking refuses lists mutated in place.
        self._slots[slot_name] = per_var
        return slot

    def get_slot(self, var, slot_name: str):
        """The slot variable ``slot_name`` of ``var`` (KeyError naming what exists if absent)."""
        if slot_name not in self._slots:
            raise KeyError(
                f"{self.__class__.__name__} has no slot named {slot_name!r}; "
                f"its slots are {self.get_slot_names()}"
            )
        from radam_dist.distribute import pss  # PSS: the shard slots, as one ShardedVariable

        if pss.is_sharded(var):
            return pss.sharded_slot(self, var, slot_name)
        slot = self._slots[slot_name][self._index_of(var)]
        if slot is None:
            raise KeyError(f"no {slot_name!r} slot was created for this variable")
        return slot

    def get_slot_names(self) -> List[str]:
        """Slot names in creation order, e.g. ``['m', 'v']`` (plus ``'vhat'`` with amsgrad)."""
        return list(self._slots)

    def __dir__(self):
        # tf.train.Checkpoint treats any object whose dir() lists `get_slot_names` as a TF1 /
        # tf.keras optimizer and saves its slots a second time, as slot references, which it
        # refuses for variables that are already ordinary dependencies (ours are, as in every
        # Keras 3 optimizer). The method stays callable; it is only left out of the listing.
        return [name for name in super().__dir__() if name != "get_slot_names"]

    def _slot_variables(self) -> list:
        return [slot for per_var in self._slots.values() for slot in per_var if slot is not None]

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
        """tfa's layout: the iteration count, then every slot in creation order."""
        return [self.iterations] + self._slot_variables()

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
                    tape.watch(var_list)
                loss = loss()
                if callable(var_list):
                    var_list = var_list()
        var_list = list(tf.nest.flatten(var_list))
        grads = tape.gradient(loss, var_list, grad_loss)
        return self.apply_gradients(zip(grads, var_list), name=name)


def maybe_float(value):
    """Keras 3 wants a float learning rate; tf.keras accepted ints and numpy scalars."""
    if isinstance(value, (int, np.integer, np.floating)) and not isinstance(value, bool):
        return float(value)
    return value
