"""ParameterServerStrategy with a ``variable_partitioner``: slots sharded like their variable.

Under PSS with a partitioner, a Keras 3 layer's weight is a ``keras.Variable`` wrapping a
``tf.distribute.ShardedVariable`` (one ``tf.Variable`` per shard, each on one parameter
server). Two things break there in stock Keras 3 (TF 2.21 / Keras 3.15):

* ``tape.gradient(loss, model.trainable_variables)`` raises ``'ShardedVariable' object has
  no attribute 'handle'``: Keras' Variable claims to act as a resource variable and hands the
  tape its value's ``handle``, which a ShardedVariable does not have;
* optimizer slots made with ``add_variable_from_reference`` for the wrapped variable are
  created whole, on the coordinator (``/job:chief``), not next to the shards.

radam_dist's answer is to work shard by shard: ``expand_sharded(variables)`` replaces each
sharded variable by its shards (plain ``tf.Variable``s on the parameter servers), which the
tape differentiates normally (an Embedding's shards get IndexedSlices, a Dense kernel's
shards dense slices). RectifiedAdam and Lookahead expand their variable lists the same way
when they build, so each shard gets its own m / v / vhat / slow slot, created colocated with
that shard, i.e. on the same parameter server; ``get_slot(sharded_var, name)`` reassembles
the shard slots into a ShardedVariable. Gradients given for a whole sharded variable are
split by rows (``gradient_per_shard``), so ``apply_gradients`` takes either form.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import keras
import tensorflow as tf
from tensorflow.python.distribute import sharded_variable as _sharded  # ShardedVariable type

from radam_dist.distribute.state_layout import StateLayout

ShardedVariable = _sharded.ShardedVariable


def _unwrap(variable):
    return variable.value if isinstance(variable, keras.Variable) else variable


def is_sharded(variable) -> bool:
    """True for a ShardedVariable or a keras.Variable that wraps one."""
    try:
        return isinstance(_unwrap(variable), ShardedVariable)
    except Exception:  # an uninitialised keras.Variable has no value yet
        return False


def shards_of(variable) -> list:
    """The shard variables of a sharded variable, ``[variable]`` otherwise."""
    value = _unwrap(variable)
    if isinstance(value, ShardedVariable):
        return list(value.variables)
    return [variable]


def expand_sharded(variables: Sequence) -> list:
    """``variables`` with every sharded variable replaced by its shards, in order.

    Use the result both as the tape's sources and in ``apply_gradients`` under PSS with a
    ``variable_partitioner``: ``tape.gradient`` cannot differentiate a Keras variable that
    wraps a ShardedVariable.
    """
    expanded = []
    for variable in variables:
        expanded.extend(shards_of(variable))
    return expanded


def gradient_per_shard(grad, variable) -> list:
    """Split the gradient of a whole sharded ``variable`` into one gradient per shard.

    Dense gradients are split by rows; IndexedSlices keep the rows that fall in each shard,
    re-indexed from that shard's first row.
    """
    shards = shards_of(variable)
    if grad is None:
        return [None] * len(shards)
    sizes = [int(s.shape[0]) for s in shards]
    if not isinstance(grad, tf.IndexedSlices):
        return list(tf.split(tf.convert_to_tensor(grad), sizes, axis=0))
    pieces, start = [], 0
    for shard, size in zip(shards, sizes):
        indices = tf.cast(grad.indices, tf.int64)
        inside = tf.logical_and(indices >= start, indices < start + size)
        positions = tf.reshape(tf.where(inside), [-1])
        pieces.append(tf.IndexedSlices(
            tf.gather(grad.values, positions),
            tf.cast(tf.gather(indices, positions) - start, grad.indices.dtype),
            dense_shape=tf.constant(shard.shape.as_list(), tf.int64),
        ))
        start += size
    return pieces


def expand_sharded_pairs(grads: Sequence, variables: Sequence) -> Tuple[list, list]:
    """``(grads, variables)`` with sharded variables (and their gradients) split into shards.

    Returns the inputs unchanged (as lists) when nothing is sharded, so the common path
    costs one isinstance check per variable.
    """
    grads, variables = list(grads), list(variables)
    if not any(is_sharded(v) for v in variables):
        return grads, variables
    out_grads, out_vars = [], []
    for grad, variable in zip(grads, variables):
        if is_sharded(variable):
            out_grads.extend(gradient_per_shard(grad, variable))
            out_vars.extend(shards_of(variable))
        else:
            out_grads.append(grad)
            out_vars.append(variable)
    return out_grads, out_vars


def sharded_slot(optimizer, variable, slot_name: str) -> Optional[ShardedVariable]:
    """The ShardedVariable made of the per-shard ``slot_name`` slots of a sharded variable,
    or None when ``variable`` is not sharded."""
    if not is_sharded(variable):
        return None
    slots = [_unwrap(optimizer.get_slot(shard, slot_name)) for shard in shards_of(variable)]
    return ShardedVariable(slots, name=f"{slot_name}/{_unwrap(variable).name}")


def _device_list(variable) -> List[str]:
    value = _unwrap(variable)
    if isinstance(value, ShardedVariable):
        return [s.device for s in value.variables]
    return [value.device]


def describe_placement(variables, optimizer) -> Dict[str, Dict[str, List[str]]]:
    """``{variable path: {"variable": [device per shard], slot name: [device per shard]}}``
    for every slot the optimizer keeps (with Lookahead: m, v, [vhat,] slow)."""
    placement = {}
    for var in variables:
        entry = {"variable": _device_list(var)}
        for name in optimizer.get_slot_names():
            try:
                entry[name] = _device_list(optimizer.get_slot(var, name))
            except KeyError:
                continue
        placement[getattr(var, "path", None) or var.name] = entry
    return placement


# -- the state layout (radam_dist/distribute/state_layout.py) --------------------------------------
class ParameterServerSharded(StateLayout):
    """ParameterServerStrategy: one slot per variable shard, colocated with that shard; the
    whole slot of a sharded variable is the ShardedVariable of its shard slots."""

    kind = "parameter-server-sharded"

    def expand(self, variables: Sequence) -> list:
        return expand_sharded(variables)

    def expand_pairs(self, grads: Sequence, variables: Sequence) -> Tuple[list, list]:
        return expand_sharded_pairs(grads, variables)

    def get_slot(self, optimizer, var, name: str):
        if is_sharded(var):
            return sharded_slot(optimizer, var, name)
        return super().get_slot(optimizer, var, name)
