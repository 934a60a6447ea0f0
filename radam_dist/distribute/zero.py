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
with amsgrad). Checkpoints hold the whole, unpadded m / v
(gathered across replicas when saving, sliced for the local replicas when restoring), so a
checkpoint written with N replicas restores with any other number.
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence

import keras
import tensorflow as tf

from radam_dist import radam_math



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


class ShardedState(tf.__internal__.tracking.AutoTrackable):
    """All chunked slots of one optimizer; checkpoints them whole (N-independent)."""

    def __init__(self, optimizer, variables: Sequence, slot_names: Sequence[str]):
        self._strategy = optimizer._distribution_strategy
        n = self._strategy.num_replicas_in_sync
        self._slot_names = tuple(slot_names)
        self._shards: List[_VarShards] = []
        with self._strategy.scope():
            for variable in variables:
                self._shards.append(_VarShards(variable, n, self._slot_names))
        self._index = {optimizer._var_key(v): i for i, v in enumerate(variables)}

    def for_variable(self, optimizer, variable) -> _VarShards:
        return self._shards[self._index[optimizer._var_key(variable)]]

    def local_bytes(self) -> int:
        """Bytes of optimizer state one replica holds."""
        total = 0
        for shards in self._shards:
            for slot in shards.slots.values():
                total += int(tf.size(_local_copies(slot)[0])) * slot.dtype.size
        return total

    # -- checkpoints: the whole slot, whatever the number of replicas ----------------------------
    def _whole(self, shards: _VarShards, name: str):
        slot = shards.slots[name]
        if self._strategy.extended._in_multi_worker_mode():
            chunks = self._strategy.gather(slot, axis=0)  # collective: every worker saves
        else:  # all replicas are local: concatenate their copies, no collective needed
            chunks = tf.concat([tf.convert_to_tensor(c) for c in _local_copies(slot)], axis=0)
        return shards.unpadded(chunks)

    def full_slot(self, variable_index: int, name: str) -> tf.Tensor:
        """The whole ``name`` slot of the variable at ``variable_index`` (gathered)."""
        return self._whole(self._shards[variable_index], name)

    def _serialize_to_tensors(self):
        return {
            f"{i}_{name}": self._whole(shards, name)
            for i, shards in enumerate(self._shards)
            for name in self._slot_names
        }

    def _restore_from_tensors(self, restored_tensors):
        for key, value in restored_tensors.items():
            index, name = key.split("_", 1)
            shards = self._shards[int(index)]
            chunks = shards.padded(value)
            copies = _local_copies(shards.slots[name])
            for replica_id, copy in zip(_local_replica_ids(self._strategy), copies):
                copy.assign(chunks[replica_id])
        return None


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


def build(optimizer, variables: Sequence, slot_names: Sequence[str]) -> None:
    """Create the chunked slots (called from the optimizer's ``build``, eagerly)."""
    if optimizer.use_ema:
        raise ValueError("shard_optimizer_state=True does not support use_ema")
    strategy = optimizer._distribution_strategy
    if isinstance(strategy, tf.distribute.experimental.ParameterServerStrategy):
        raise ValueError(
            "shard_optimizer_state=True is for MirroredStrategy / MultiWorkerMirroredStrategy; "
            "under ParameterServerStrategy give the strategy a variable_partitioner instead "
            "(the slots are then sharded with their variables over the parameter servers)"
        )
    optimizer.sharded_state = ShardedState(optimizer, variables, slot_names)


def apply_gradients(optimizer, grads: Sequence, variables: Sequence) -> None:
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
    state = optimizer.sharded_state
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
        if opt is None:
            continue
        state = getattr(opt, "sharded_state", None)
        if state is not None:
            total += state.local_bytes()
            continue
        for slot in opt._slot_variables():
            total += int(tf.size(_local_copies(_unwrap(slot))[0])) * _unwrap(slot).dtype.size
    return total


# -- Lookahead's slow weights, sharded like RAdam's slots ------------------------------------------
def lookahead_is_sharded(lookahead) -> bool:
    """Lookahead shards its slow weights when its inner optimizer shards its state."""
    return bool(getattr(lookahead.inner_optimizer, "shard_optimizer_state", False))


def build_lookahead(lookahead, variables: Sequence) -> None:
    """Chunked slow weights, each replica's chunk starting at its rows of the variable."""
    state = ShardedState(lookahead, variables, ("slow",))
    replica_ids = _local_replica_ids(lookahead._distribution_strategy)
    for variable in variables:
        shards = state.for_variable(lookahead, variable)
        chunks = shards.padded(tf.convert_to_tensor(_unwrap(variable)))
        for replica_id, copy in zip(replica_ids, _local_copies(shards.slots["slow"])):
            copy.assign(chunks[replica_id])
    lookahead.sharded_state = state


def lookahead_sync(lookahead, variables: Sequence, sync) -> None:
    """On sync steps, each replica pulls its rows back toward its slow chunk (radam_math's
    ``lookahead_pull_back``), then the rows are all-gathered into the variables. Steps that
    do not sync exchange nothing (the decision is taken in cross-replica context)."""
    ctx = tf.distribute.get_replica_context()
    replica = ctx.replica_id_in_sync_group
    state = lookahead.sharded_state
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
