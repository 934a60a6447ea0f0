"""Where an optimizer's state lives: the one seam between the optimizers and tf.distribute.

RectifiedAdam and Lookahead never ask which distribution mode they run under; they ask their
``StateLayout``, chosen once from the optimizer's strategy when it is made (``layouts.py``,
for the step plan):

* ``Replicated`` (this file): every replica (or the one device) holds every slot, as Keras
  variables the optimizer tracks;
* ``ParameterServerSharded`` (``pss.py``): under ParameterServerStrategy a sharded variable's
  slots are sharded like it, each shard's slot on its parameter server;
* ``ReplicaSharded`` (``zero.py``): ZeRO-1 under MirroredStrategy / MWMS, replica r holds
  rows r/N of every slot.

Every path that touches the state goes through the layout: ``build``, the update, ``get_slot``
/ ``get_slot_names``, ``weights`` / ``get_weights`` / ``set_weights``, ``.keras`` save / load
and ``tf.train.Checkpoint``. Whatever the layout, the state *seen from outside* is the same
list, in tfa's order (the logical state): a ``.keras`` file or a checkpoint written under one
layout or replica count loads under any other. A new layout is one subclass.

A layout talks to its optimizer only through the small protocol of ``state_host.py``
(``StateHost``): no private name of the optimizer is used here or in the other layouts.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import keras
import tensorflow as tf
from tensorflow.python.distribute import device_util


class StateLayout:
    """The replicated layout; the base class of the others (override what differs)."""

    kind = "replicated"
    shards_state = False  # True where one replica holds only part of each slot

    # -- variables ------------------------------------------------------------------------
    def expand(self, variables: Sequence) -> list:
        """The variables slots are made for (``ParameterServerSharded``: the shards)."""
        return list(variables)

    def expand_pairs(self, grads: Sequence, variables: Sequence) -> Tuple[list, list]:
        """``(grads, variables)`` as the update takes them (see ``expand``)."""
        return list(grads), list(variables)

    # -- build ----------------------------------------------------------------------------
    def build_slots(self, optimizer, variables: Sequence, slot_names: Sequence[str],
                    start_at_variables: bool = False) -> None:
        """Create ``slot_names`` for every variable, zeros or (``start_at_variables``) a copy
        of the variable, in tfa's order (all variables' first slot, then the second ...)."""
        for name in slot_names:
            for var in variables:
                optimizer.add_slot(var, name, initializer=var if start_at_variables else "zeros")

    # -- the update -----------------------------------------------------------------------
    def apply_gradients(self, optimizer, grads: Sequence, variables: Sequence,
                        default: Callable) -> None:
        """One step; ``default`` is the optimizer's own (replicated) update."""
        return default(grads, variables)

    def lookahead_sync(self, lookahead, variables: Sequence, sync, default: Callable):
        """Lookahead's pull-back toward the slow weights on ``sync`` steps."""
        return default()

    def slot_variable(self, optimizer, name: str, var):
        """The tf.Variable the replicated update reads and assigns, or None (no such slot)."""
        per_var = optimizer.slot_table().get(name)
        if per_var is None:
            return None
        slot = per_var[optimizer.variable_index(var)]
        return slot.value if isinstance(slot, keras.Variable) else slot

    def local_copies(self, distribution, variable, devices: Sequence[str]) -> Optional[tuple]:
        """``variable``'s copy on each of ``devices`` (``StepPlan.mirrored_devices``), in that
        order, for an update that writes each device's copy itself; None where ``variable``
        is not a mirror with exactly those copies (it then takes ``extended.update``)."""
        if not isinstance(variable, tf.distribute.DistributedValues):
            return None
        copies = tuple(distribution.experimental_local_results(variable))
        if len(copies) != len(devices) or any(
                device_util.canonicalize(c.device) != device_util.canonicalize(d)
                for c, d in zip(copies, devices)):
            return None
        return copies

    # -- inspection -----------------------------------------------------------------------
    def slot_names(self, optimizer) -> List[str]:
        return list(optimizer.slot_table())

    def get_slot(self, optimizer, var, name: str):
        slot = optimizer.slot_table()[name][optimizer.variable_index(var)]
        if slot is None:
            raise KeyError(f"no {name!r} slot was created for this variable")
        return slot

    def slot_entries(self, optimizer) -> list:
        """Every slot in creation order: variables, or variable-like whole views."""
        return [slot for per_var in optimizer.slot_table().values() for slot in per_var
                if slot is not None]

    def logical_variables(self, optimizer, own_variables: Sequence) -> list:
        """``own_variables`` (the optimizer's Keras variable list) with the slots in place:
        the list ``.keras`` files and checkpoints hold, the same in every layout. A layout
        whose slots are not in Keras' list must also route a checkpoint's restores still
        pending on that list (restored before build) by these positions, for the slots and
        for every variable made after them (``zero._restore_deferred``)."""
        return list(own_variables)

    # -- tf.train.Checkpoint ----------------------------------------------------------------
    def checkpoint_children(self, optimizer, children: dict) -> dict:
        """The optimizer's checkpoint dependencies (``Replicated``: Keras' own). Every layout
        calls this first: it makes a checkpoint of radam_dist's earlier ZeRO layout fail with
        ``OldZeroCheckpoint`` as it is restored (``_refuse_old_zero_layout``)."""
        _refuse_old_zero_layout(optimizer)
        return children

    def local_state_bytes(self, optimizer) -> int:
        """Bytes of slot state one replica holds."""
        total = 0
        for slot in self.slot_entries(optimizer):
            value = slot.value if isinstance(slot, keras.Variable) else slot
            local = getattr(value, "values", None)
            one = local[0] if local else value
            total += int(tf.size(one)) * value.dtype.size
        return total


Replicated = StateLayout

# -- checkpoints of the earlier ZeRO layout ----------------------------------------------------
# Before the state layouts, ZeRO-1 checkpointed m / v (and Lookahead's slow weights) under a
# child ``sharded_state`` of the optimizer, and left them out of Keras' variable list. Restored
# now, TensorFlow would find no ``sharded_state`` (so keep m and v at zero, with only its
# "Value in checkpoint could not be found" warning) and give the list's later entries to the
# slots' positions. TensorFlow files a checkpoint's child that the object does not have among
# the object's deferred dependencies; the optimizer's table of those refuses this one.
OLD_ZERO_CHILD = "sharded_state"


class OldZeroCheckpoint(ValueError):
    """A checkpoint of radam_dist's ZeRO-1 from before the state layouts."""


OLD_ZERO_MESSAGE = (
    "this checkpoint holds the optimizer state of {name!r} in radam_dist's earlier ZeRO-1 "
    "layout (m / v / slow weights under 'sharded_state', written before the state layouts): "
    "this version cannot restore it (m and v would stay at zero and the optimizer's other "
    "variables would land in the slots' places). Restore the model alone "
    "(tf.train.Checkpoint(model=model).restore(path).expect_partial()) and let the optimizer "
    "start afresh."
)


def _refuse_old_zero_child(optimizer_name: str):
    def guard(child: str) -> None:
        if child == OLD_ZERO_CHILD:
            raise OldZeroCheckpoint(OLD_ZERO_MESSAGE.format(name=optimizer_name))

    return guard


def _refuse_old_zero_layout(optimizer) -> None:
    optimizer.guard_checkpoint_children(
        _refuse_old_zero_child(getattr(optimizer, "name", "optimizer")))
