"""Replica-sharded optimizer state (ZeRO stage 1) for MirroredStrategy and MWMS.

``RectifiedAdam(..., shard_optimizer_state=True)``: with N replicas, each variable's rows
(axis 0; a scalar counts as one row) are split into N equal chunks of ceil(rows / N) rows,
padded. Replica r keeps m, v (and vhat) only for chunk r, in ``tf.Variable``s with
``synchronization=ON_READ, aggregation=NONE`` (each replica's copy is a different chunk).
A step:

1. gradients are summed across replicas (the same all-reduce as without sharding; the
   ReplicaContext has no reduce-scatter) and each replica slices out its chunk;
2. each replica runs radam_math's update on its chunk (the chunk of the variable is a
   transient tensor in a ``_Rows`` cell, which radam_math reads and assigns like a variable);
3. the updated chunks are all-gathered and every replica assigns the whole variable.

So per replica the optimizer state is 2/N of the parameters (m, v) instead of 2x (3/N and 3x
with amsgrad). This is the ``ReplicaSharded`` state layout (state_layout.py): from outside
the state is whole. Each sharded slot is seen through a ``WholeSlot`` (gathered to read,
scattered to assign) that stands where the replicated layout has its slot variable, in
``weights`` / ``get_weights`` / ``set_weights``, ``.keras`` files and checkpoints (under the
same keys, unpadded), so state written with N replicas loads with any other number, with
ZeRO off, or without a strategy.
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence

import keras
import tensorflow as tf

from radam_dist import radam_math
from radam_dist.distribute.state_layout import StateLayout

_VARIABLE_VALUE = "VARIABLE_VALUE"  # the checkpoint key of a tf.Variable's value

class _Rows:
    """A transient stand-in for a variable: radam_math reads it, assigns it and scatter-adds
    to it; the value is a tensor (the replica's chunk of the variable), never stored."""

    def __init__(self, value):
        self.value = value

    @property
    def dtype(self):
        return self.value.dtype

    def assign(self, value):
        self.value = value

    def scatter_add(self, slices):
        self.value = tf.tensor_scatter_nd_add(
            self.value, tf.expand_dims(slices.indices, -1), slices.values
        )


tf.register_tensor_conversion_function(
    _Rows, lambda rows, dtype=None, name=None, as_ref=False: rows.value
)


def _unwrap(variable):
    return variable.value if isinstance(variable, keras.Variable) else variable


class _VarShards:
    """The chunked state of one variable (not tracked itself: see ShardedState)."""

    def __init__(self, variable, num_replicas: int, slot_names: Sequence[str]):
        value = _unwrap(variable)
        self.shape = tf.TensorShape(value.shape)
        self.rows = int(self.shape[0]) if self.shape.rank else 1
        self.row_shape = self.shape[1:] if self.shape.rank else tf.TensorShape([])
        self.num_replicas = num_replicas
        self.rows_per_replica = max(1, math.ceil(self.rows / num_replicas))
        self.dtype = value.dtype
        chunk = [self.rows_per_replica] + self.row_shape.as_list()
        self.slots: Dict[str, tf.Variable] = {}
        for name in slot_names:
            self.slots[name] = tf.Variable(
                tf.zeros(chunk, self.dtype),
                trainable=False,
                synchronization=tf.VariableSynchronization.ON_READ,
                aggregation=tf.VariableAggregation.NONE,
                name=f"{value.name.split(':')[0]}/{name}_shard",
            )

    def padded(self, tensor):
        """``tensor`` (the variable's shape) as [N, rows_per_replica, ...] (zero rows added)."""
        tensor = tf.reshape(tensor, [self.rows] + self.row_shape.as_list())
        extra = self.rows_per_replica * self.num_replicas - self.rows
        if extra:
            tensor = tf.pad(tensor, [[0, extra]] + [[0, 0]] * self.row_shape.rank)
        chunked = [self.num_replicas, self.rows_per_replica] + self.row_shape.as_list()
        return tf.reshape(tensor, chunked)

    def unpadded(self, gathered):
        """All replicas' chunks stacked on axis 0, back to the variable's shape."""
        return tf.reshape(gathered[: self.rows], self.shape)


class ShardedState:
    """All chunked slots of one optimizer (plain Python: what is saved is the ``WholeSlot``s,
    which look like replicated slot variables to ``.keras`` files and checkpoints)."""

    def __init__(self, optimizer, variables: Sequence, slot_names: Sequence[str]):
        self._strategy = optimizer._distribution_strategy
        n = self._strategy.num_replicas_in_sync
        self._slot_names = tuple(slot_names)
        self._shards: List[_VarShards] = []
        with self._strategy.scope():
            for variable in variables:
                self._shards.append(_VarShards(variable, n, self._slot_names))
        self._index = {optimizer._var_key(v): i for i, v in enumerate(variables)}
        names = [getattr(v, "path", None) or _unwrap(v).name.split(":")[0] for v in variables]
        # tfa's order: every variable's first slot, then every variable's second slot, ...
        self.whole_slots = [WholeSlot(self, i, slot, f"{names[i]}/{slot}")
                            for slot in self._slot_names for i in range(len(self._shards))]

    def for_variable(self, optimizer, variable) -> _VarShards:
        return self._shards[self._index[optimizer._var_key(variable)]]

    def local_bytes(self) -> int:
        """Bytes of optimizer state one replica holds."""
        total = 0
        for shards in self._shards:
            for slot in shards.slots.values():
                total += int(tf.size(_local_copies(slot)[0])) * slot.dtype.size
        return total

    def full_slot(self, variable_index: int, name: str) -> tf.Tensor:
        """The whole ``name`` slot of the variable at ``variable_index`` (gathered; under MWMS
        a collective, so every worker must ask)."""
        shards = self._shards[variable_index]
        slot = shards.slots[name]
        if self._strategy.extended._in_multi_worker_mode():
            chunks = self._strategy.gather(slot, axis=0)  # collective: every worker gathers
        else:  # all replicas are local: concatenate their copies, no collective needed
            chunks = tf.concat([tf.convert_to_tensor(c) for c in _local_copies(slot)], axis=0)
        return shards.unpadded(chunks)

    def assign_whole(self, variable_index: int, name: str, value) -> None:
        """Set the whole ``name`` slot: each local replica keeps its rows of ``value``."""
        shards = self._shards[variable_index]
        value = tf.cast(tf.convert_to_tensor(value), shards.dtype)
        if value.shape != shards.shape:
            raise ValueError(f"slot {name!r} has shape {shards.shape}, got a value of shape "
                             f"{value.shape}")
        chunks = shards.padded(value)
        copies = _local_copies(shards.slots[name])
        for replica_id, copy in zip(_local_replica_ids(self._strategy), copies):
            copy.assign(chunks[replica_id])


class WholeSlot(tf.__internal__.tracking.Trackable):
    """One sharded slot seen whole, like a replicated slot variable: reading it gathers the
    replicas' rows (a copy), ``assign`` scatters them. In a checkpoint it is saved under the
    key a replicated slot variable has (``VARIABLE_VALUE``), unpadded, so checkpoints move
    between replica counts and between ZeRO on and off."""

    def __init__(self, state: ShardedState, variable_index: int, slot_name: str, path: str):
        self._state = state
        self._variable_index = variable_index
        self.slot_name = slot_name
        self.path = path
        self.name = path
        shards = state._shards[variable_index]
        self.shape = shards.shape
        self.dtype = shards.dtype

    @property
    def value(self) -> tf.Tensor:
        return self._state.full_slot(self._variable_index, self.slot_name)

    def numpy(self):
        return self.value.numpy()

    def __array__(self, dtype=None, copy=None):
        value = self.numpy()
        return value if dtype is None else value.astype(dtype)

    def assign(self, value) -> None:
        self._state.assign_whole(self._variable_index, self.slot_name, value)

    def __repr__(self):
        return f"<WholeSlot {self.path!r} shape={self.shape} dtype={self.dtype.name} (gathered)>"

    def _serialize_to_tensors(self):
        return {_VARIABLE_VALUE: self.value}

    def _restore_from_tensors(self, restored_tensors):
        self.assign(restored_tensors[_VARIABLE_VALUE])
        return None


tf.register_tensor_conversion_function(
    WholeSlot, lambda slot, dtype=None, name=None, as_ref=False: slot.value
)


class _LogicalVariableList(tf.__internal__.tracking.Trackable):
    """Stands in the checkpoint for Keras' ``_variables`` list: the same indices, with a
    ``WholeSlot`` where the replicated layout has a slot variable."""

    def __init__(self, entries: Sequence):
        self._entries = {str(i): entry for i, entry in enumerate(entries)}

    def _trackable_children(self, save_type="checkpoint", **kwargs):
        return dict(self._entries)

    def _lookup_dependency(self, name, cached_dependencies=None):
        return self._entries.get(name)


def _restore_deferred(optimizer, insert_at: int, whole_slots: Sequence) -> None:
    """Route the restores a checkpoint left pending on Keras' variable list (restored before
    the optimizer was built) by logical position.

    The checkpoint numbers the list as the replicated layout does: ..., the slots from
    ``insert_at``, then the variables made after them (the gate's accumulators and counters).
    Keras' list here holds no slots, so the slots' values go to the whole slots now, and the
    pending values after them move down by the number of slots: each variable appended later
    gets its own value as Keras tracks it (at its index in Keras' list), none gets a slot's.
    """
    tracked = optimizer._lookup_dependency("_variables")
    if tracked is None or not hasattr(tracked, "_handle_deferred_dependencies"):
        return
    for offset, entry in enumerate(whole_slots):
        tracked._handle_deferred_dependencies(name=str(insert_at + offset), trackable=entry)
    pending = tracked._deferred_dependencies  # {name: [CheckpointPosition, ...]}, mutable
    after = insert_at + len(whole_slots)
    moved = {int(name) - len(whole_slots): pending.pop(name)
             for name in [n for n in pending if n.isdigit() and int(n) >= after]}
    for index, positions in sorted(moved.items()):
        pending.setdefault(str(index), []).extend(positions)


def _this_replica(variable):
    """The calling replica's own copy of an ON_READ variable (a plain tf.Variable, which
    supports scatter_add, unlike the distributed wrapper)."""
    get = getattr(variable, "_get_on_device_or_primary", None)
    return get() if get is not None else variable


def _local_copies(variable) -> list:
    values = getattr(variable, "values", None)
    return list(values) if values is not None else [variable]


def _local_replica_ids(strategy) -> List[int]:
    local = len(strategy.extended.worker_devices)
    resolver = getattr(strategy, "cluster_resolver", None)
    task = 0
    if strategy.extended._in_multi_worker_mode():
        task = int(getattr(resolver, "task_id", 0) or 0)
    return [task * local + j for j in range(local)]


def supports(strategy) -> bool:
    """ZeRO-1 runs under MirroredStrategy and MultiWorkerMirroredStrategy."""
    return isinstance(strategy, (tf.distribute.MirroredStrategy,
                                 tf.distribute.MultiWorkerMirroredStrategy))


class ReplicaSharded(StateLayout):
    """ZeRO-1: each replica keeps its rows of every slot (radam_dist/distribute/state_layout.py
    for the interface). Seen from outside the state is whole: ``weights`` / ``get_weights``
    / ``get_slot`` gather (a copy), ``set_weights``, ``.keras`` load and checkpoint restore
    scatter, in the replicated layout's order and checkpoint keys."""

    kind = "replica-sharded"
    shards_state = True

    def __init__(self):
        self.state = None
        self._insert_at = None
        self._checkpoint_list = None

    def build_slots(self, optimizer, variables, slot_names, start_at_variables=False):
        if getattr(optimizer, "use_ema", False):
            raise ValueError("shard_optimizer_state=True does not support use_ema")
        state = ShardedState(optimizer, variables, slot_names)
        if start_at_variables:  # each replica's chunk starts at its rows of the variable
            for index, variable in enumerate(variables):
                for name in slot_names:
                    state.assign_whole(index, name, tf.convert_to_tensor(_unwrap(variable)))
        # Where the replicated layout appends its slot variables to Keras' variable list.
        self._insert_at = len(optimizer._variables)
        self.state = state
        _restore_deferred(optimizer, self._insert_at, state.whole_slots)

    def apply_gradients(self, optimizer, grads, variables, default):
        return apply_gradients(optimizer, self.state, grads, variables)

    def lookahead_sync(self, lookahead, variables, sync, default):
        return lookahead_sync(lookahead, self.state, variables, sync)

    def slot_variable(self, optimizer, name, var):
        raise RuntimeError("replica-sharded slots are updated by zero.apply_gradients")

    def slot_names(self, optimizer):
        return [] if self.state is None else list(self.state._slot_names)

    def get_slot(self, optimizer, var, name):
        """The whole slot, gathered: a tf.Tensor copy (assign through set_weights)."""
        if self.state is None or name not in self.state._slot_names:
            return super().get_slot(optimizer, var, name)  # a slot made by add_slot
        index = optimizer._index_of(var)
        return self.state.full_slot(index, name)

    def slot_entries(self, optimizer):
        return [] if self.state is None else list(self.state.whole_slots)

    def logical_variables(self, optimizer, own_variables):
        own = list(own_variables)
        if self.state is None:
            return own
        return own[: self._insert_at] + self.slot_entries(optimizer) + own[self._insert_at:]

    def checkpoint_children(self, optimizer, children):
        if self.state is None:
            return children
        children = dict(children)
        if self._checkpoint_list is None or len(self._checkpoint_list._entries) != len(
            optimizer._variables) + len(self.state.whole_slots):
            self._checkpoint_list = _LogicalVariableList(
                self.logical_variables(optimizer, optimizer._variables))
        children["_variables"] = self._checkpoint_list
        return children

    def local_state_bytes(self, optimizer):
        return 0 if self.state is None else self.state.local_bytes()


def apply_gradients(optimizer, state: ShardedState, grads: Sequence, variables: Sequence) -> None:
    """One RAdam step with replica-sharded slots (see the module docstring)."""
    ctx = tf.distribute.get_replica_context()
    if ctx is None:
        raise ValueError("shard_optimizer_state=True: apply() must run in a replica context")
    variables = [_unwrap(v) for v in variables]
    grads_and_vars = list(zip(grads, variables))
    if getattr(optimizer, "_aggregate_gradients", True):
        grads_and_vars = optimizer._all_reduce_sum_gradients(grads_and_vars)
    grads = optimizer._clip_aggregated([g for g, _ in grads_and_vars])
    replica = ctx.replica_id_in_sync_group
    scalars = {}
    new_values = []
    for grad, var in zip(grads, variables):
        if grad is None:
            new_values.append(tf.convert_to_tensor(var))
            continue
        dtype = radam_math.compute_dtype(var.dtype)
        if dtype.name not in scalars:
            scalars[dtype.name] = optimizer.step_scalars(optimizer.learning_rate, dtype)
        s = scalars[dtype.name]
        if s.has_weight_decay and not optimizer._use_weight_decay(var):
            s = s._replace(has_weight_decay=False)
        shards = state.for_variable(optimizer, var)
        slots = {name: _this_replica(slot) for name, slot in shards.slots.items()}
        work = _Rows(tf.gather(shards.padded(tf.convert_to_tensor(var)), replica))
        m, v, vhat = slots["m"], slots["v"], slots.get("vhat")
        if isinstance(grad, tf.IndexedSlices):
            first = tf.cast(replica * shards.rows_per_replica, grad.indices.dtype)
            inside = tf.logical_and(grad.indices >= first,
                                    grad.indices < first + shards.rows_per_replica)
            positions = tf.reshape(tf.where(inside), [-1])
            radam_math.apply_sparse(work, tf.gather(grad.values, positions),
                                    tf.gather(grad.indices, positions) - first, m, v, vhat, s)
        else:
            radam_math.apply_dense(work, tf.gather(shards.padded(grad), replica), m, v, vhat, s)
        gathered = ctx.all_gather(tf.convert_to_tensor(work), axis=0)
        new_values.append(shards.unpadded(gathered))

    def assign_all(distribution, values):
        for var, value in zip(variables, values):
            distribution.extended.update(var, lambda x, y: x.assign(y), args=(value,), group=False)

    ctx.merge_call(assign_all, args=(new_values,))


def state_bytes_per_replica(optimizer) -> int:
    """Bytes of optimizer state one replica holds: m, v (vhat), and Lookahead's slow weights."""
    total = 0
    for opt in (optimizer, getattr(optimizer, "inner_optimizer", None)):
        layout = getattr(opt, "_state_layout", None)
        if layout is not None:
            total += layout.local_state_bytes(opt)
    return total


# -- Lookahead's slow weights, sharded like RAdam's slots ------------------------------------------
def lookahead_sync(lookahead, state: ShardedState, variables: Sequence, sync) -> None:
    """On sync steps, each replica pulls its rows back toward its slow chunk (radam_math's
    ``lookahead_pull_back``), then the rows are all-gathered into the variables. Steps that
    do not sync exchange nothing (the decision is taken in cross-replica context)."""
    ctx = tf.distribute.get_replica_context()
    replica = ctx.replica_id_in_sync_group
    variables = [_unwrap(v) for v in variables]
    new_chunks = []
    for var in variables:
        shards = state.for_variable(lookahead, var)
        slow = _this_replica(shards.slots["slow"])
        chunk = tf.gather(shards.padded(tf.convert_to_tensor(var)), replica)

        def pull_back(chunk=chunk, slow=slow):
            rows = _Rows(chunk)
            radam_math.lookahead_pull_back(rows, slow, lookahead.slow_step_size)
            return rows.value

        new_chunks.append(tf.cond(sync, pull_back, lambda chunk=chunk: chunk))

    def gather_and_assign(chunks):
        replica_ctx = tf.distribute.get_replica_context()
        values = [state.for_variable(lookahead, var).unpadded(replica_ctx.all_gather(c, axis=0))
                  for var, c in zip(variables, chunks)]

        def assign_all(distribution, values):
            for var, value in zip(variables, values):
                distribution.extended.update(var, lambda x, y: x.assign(y), args=(value,),
                                             group=False)

        replica_ctx.merge_call(assign_all, args=(values,))

    def cross_replica(distribution, chunks, sync):
        if isinstance(sync, tf.distribute.DistributedValues):
            sync = distribution.experimental_local_results(sync)[0]

        def exchange():
            distribution.extended.call_for_each_replica(gather_and_assign, args=(chunks,))

        tf.cond(sync, exchange, lambda: None)

    ctx.merge_call(cross_replica, args=(new_chunks, sync))
