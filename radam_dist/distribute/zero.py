"""Replica-sharded optimizer state (ZeRO stage 1) for MirroredStrategy and MWMS.

``RectifiedAdam(..., shard_optimizer_state=True)``: with N replicas, each variable's rows
(axis 0; a scalar counts as one row) are split into N equal chunks of ceil(rows / N) rows,
padded. Replica r keeps m, v (and vhat) only for chunk r, in ``tf.Variable``s with
``synchronization=ON_READ, aggregation=NONE`` (each replica's copy is a different chunk).
A step:

1. each replica gets its chunk of the summed gradients: under a single-worker
   MirroredStrategy by a reduce-scatter in the step's own graph (``local-reduce-scatter``),
   under MWMS by an all-to-all collective of the dense gradients' row blocks, summed by the
   receiver (``all-to-all``), where the step needs the whole sum by Keras' all-reduce and a
   slice (``all-reduce+slice``); the step plan (``StepPlan.zero_exchange``) says why (TensorFlow has no CPU
   reduce-scatter collective);
2. each replica runs radam_math's update on its chunk (the chunk of the variable is a
   transient tensor in a ``radam_math.Rows`` cell, which radam_math reads and assigns like a variable;
   dense updates by the plan's kernel, ``executor.update_rows``);
3. the updated chunks are all-gathered into every replica's copy of the variable (for a
   sparse gradient only the changes of the touched rows, with their indices, which every
   replica adds to its copy).

So per replica the optimizer state is 2/N of the parameters (m, v) instead of 2x (3/N and 3x
with amsgrad). This is the ``ReplicaSharded`` state layout (state_layout.py): from outside
the state is whole. Each sharded slot is seen through a ``WholeSlot`` (gathered to read,
scattered to assign) that stands where the replicated layout has its slot variable, in
``weights`` / ``get_weights`` / ``set_weights``, ``.keras`` files and checkpoints (under the
same keys, unpadded), so state written with N replicas loads with any other number, with
ZeRO off, or without a strategy.
"""

from __future__ import annotations

import functools
import math
from typing import Dict, List, Optional, Sequence

import keras
import tensorflow as tf
from tensorflow.python.ops import collective_ops

from radam_dist import fused, radam_math
from radam_dist.distribute import collective_reads
from radam_dist.distribute.gradient_sums import sum_all_but
from radam_dist.distribute.state_layout import StateLayout
from radam_dist import executor

_VARIABLE_VALUE = "VARIABLE_VALUE"  # the checkpoint key of a tf.Variable's value


def _unwrap(variable):
    return variable.value if isinstance(variable, keras.Variable) else variable


class _VarChunks:
    """The chunked state of one variable (not tracked itself: see ChunkedState)."""

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
                name=f"{value.name.split(':')[0]}/{name}_chunk",
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


class ChunkedState:
    """All chunked slots of one optimizer (plain Python: what is saved is the ``WholeSlot``s,
    which look like replicated slot variables to ``.keras`` files and checkpoints)."""

    def __init__(self, optimizer, variables: Sequence, slot_names: Sequence[str]):
        self._strategy = optimizer.distribution_strategy
        n = self._strategy.num_replicas_in_sync
        self._slot_names = tuple(slot_names)
        self._chunked: List[_VarChunks] = []
        with self._strategy.scope():
            for variable in variables:
                self._chunked.append(_VarChunks(variable, n, self._slot_names))
        self._index = {optimizer.variable_key(v): i for i, v in enumerate(variables)}
        names = [getattr(v, "path", None) or _unwrap(v).name.split(":")[0] for v in variables]
        # tfa's order: every variable's first slot, then every variable's second slot, ...
        self.whole_slots = [WholeSlot(self, i, slot, f"{names[i]}/{slot}")
                            for slot in self._slot_names for i in range(len(self._chunked))]

    def for_variable(self, optimizer, variable) -> _VarChunks:
        return self._chunked[self._index[optimizer.variable_key(variable)]]

    def local_bytes(self) -> int:
        """Bytes of optimizer state one replica holds."""
        total = 0
        for chunked in self._chunked:
            for slot in chunked.slots.values():
                total += int(tf.size(_local_copies(slot)[0])) * slot.dtype.size
        return total

    def full_slot(self, variable_index: int, name: str) -> tf.Tensor:
        """The whole ``name`` slot of the variable at ``variable_index`` (gathered; under MWMS
        a collective, so every worker must ask)."""
        chunked = self._chunked[variable_index]
        slot = chunked.slots[name]
        if self._strategy.extended._in_multi_worker_mode():
            # a collective: every worker must gather (refused at once where one does not)
            collective_reads.before_read(self._strategy, f"{slot.name} ({name})")
            chunks = self._strategy.gather(slot, axis=0)
        else:  # all replicas are local: concatenate their copies, no collective needed
            chunks = tf.concat([tf.convert_to_tensor(c) for c in _local_copies(slot)], axis=0)
        return chunked.unpadded(chunks)

    def assign_whole(self, variable_index: int, name: str, value) -> None:
        """Set the whole ``name`` slot: each local replica keeps its rows of ``value``."""
        chunked = self._chunked[variable_index]
        value = tf.cast(tf.convert_to_tensor(value), chunked.dtype)
        if value.shape != chunked.shape:
            raise ValueError(f"slot {name!r} has shape {chunked.shape}, got a value of shape "
                             f"{value.shape}")
        chunks = chunked.padded(value)
        copies = _local_copies(chunked.slots[name])
        for replica_id, copy in zip(_local_replica_ids(self._strategy), copies):
            copy.assign(chunks[replica_id])


class WholeSlot(tf.__internal__.tracking.Trackable):
    """One sharded slot seen whole, like a replicated slot variable: reading it gathers the
    replicas' rows (a copy), ``assign`` scatters them. In a checkpoint it is saved under the
    key a replicated slot variable has (``VARIABLE_VALUE``), unpadded, so checkpoints move
    between replica counts and between ZeRO on and off."""

    def __init__(self, state: ChunkedState, variable_index: int, slot_name: str, path: str):
        self._state = state
        self._variable_index = variable_index
        self.slot_name = slot_name
        self.path = path
        self.name = path
        chunked = state._chunked[variable_index]
        self.shape = chunked.shape
        self.dtype = chunked.dtype

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
    tracked = optimizer.tracked_dependency("_variables")
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
        self.sparse_index_bytes = {}  # variables whose gradients were IndexedSlices
        self._insert_at = None
        self._checkpoint_list = None

    def build_slots(self, optimizer, variables, slot_names, start_at_variables=False):
        if getattr(optimizer, "use_ema", False):
            raise ValueError("shard_optimizer_state=True does not support use_ema")
        state = ChunkedState(optimizer, variables, slot_names)
        collective_reads.start_watchdog(state._strategy)  # MWMS: every worker must save
        if start_at_variables:  # each replica's chunk starts at its rows of the variable
            for index, variable in enumerate(variables):
                for name in slot_names:
                    state.assign_whole(index, name, tf.convert_to_tensor(_unwrap(variable)))
        # Where the replicated layout appends its slot variables to Keras' variable list.
        self._insert_at = len(optimizer.tracked_variables())
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
        index = optimizer.variable_index(var)
        return self.state.full_slot(index, name)

    def slot_entries(self, optimizer):
        return [] if self.state is None else list(self.state.whole_slots)

    def logical_variables(self, optimizer, own_variables):
        own = list(own_variables)
        if self.state is None:
            return own
        return own[: self._insert_at] + self.slot_entries(optimizer) + own[self._insert_at:]

    def checkpoint_children(self, optimizer, children):
        children = super().checkpoint_children(optimizer, children)
        if self.state is None:
            return children
        children = dict(children)
        if self._checkpoint_list is None or len(self._checkpoint_list._entries) != len(
            optimizer.tracked_variables()) + len(self.state.whole_slots):
            self._checkpoint_list = _LogicalVariableList(
                self.logical_variables(optimizer, optimizer.tracked_variables()))
        children["_variables"] = self._checkpoint_list
        return children

    def local_state_bytes(self, optimizer):
        return 0 if self.state is None else self.state.local_bytes()


# -- how the gradients reach each replica's chunk -------------------------------------------------
# The exchange a step uses (its plan's ``last_exchange``, ``exchange_path``):
LOCAL_REDUCE_SCATTER = "local-reduce-scatter"
ALL_TO_ALL = "all-to-all"
ALL_REDUCE_SLICE = "all-reduce+slice"

# ``all-reduce`` forces the all-reduce + slice exchange everywhere (to compare the two); the
# step plan reads it (radam_dist/step/plan.py, ``StepPlan.zero_exchange``, which says why each
# exchange is chosen: TensorFlow has no CPU reduce-scatter collective).
EXCHANGE_ENV = "RADAM_DIST_ZERO_EXCHANGE"

def exchange_path(optimizer) -> Optional[str]:
    """The exchange the last traced ZeRO step of ``optimizer`` (or of Lookahead's inner
    optimizer) used: ``LOCAL_REDUCE_SCATTER``, ``ALL_TO_ALL``, ``ALL_REDUCE_SLICE``, or None
    (not sharded / not stepped yet)."""
    for opt in (getattr(optimizer, "inner_optimizer", None), optimizer):  # gradients first
        plan = opt.step_plan() if hasattr(opt, "step_plan") else None
        if plan is not None and plan.layout.shards_state and plan.last_exchange:
            return plan.last_exchange[0]
    return None


def bytes_sent_per_replica(optimizer, exchange: Optional[str] = None,
                           sparse_rows: int = 0) -> Dict[str, int]:
    """Bytes one replica sends per step, by formula from the shapes and the algorithm.

    N replicas; a dense variable of G bytes, P padded to N * ceil(rows / N) rows; a variable
    with a sparse gradient (as traced) of k rows per replica (``sparse_rows``), R bytes a
    row, X bytes an index. Exchanges:

    * ``unsharded`` (the replicated step, for comparison): TensorFlow's ring all-reduce
      2 (N-1)/N G; IndexedSlices all-gathered (CollectiveReplicaLauncher's
      all_reduce_indexed_slices, ring): (N-1) k (R + X);
    * ``all-reduce+slice``: the same, then the ring all-gather of the new rows (N-1)/N P for
      every dense variable (1.5 times an all-reduce), and for a sparse one the changes of
      its chunk's touched rows with their indices (as columns of the values), counted as
      (N-1) min(k, S) (R + X), S the rows of a chunk (each replica's touched rows of the
      summed gradient: about k of its N k entries, deduplicated; all_gather pads them to
      the longest replica's count);
    * ``local-reduce-scatter``: rows r' of each dense gradient to replica r', (N-1)/N P, and
      the new rows back, (N-1)/N P; a sparse gradient's entries to every other replica,
      (N-1) k (R + X), and the changes of the touched rows back, counted as
      (N-1) min(k, S) (R + X) (touched rows spread evenly over the chunked; duplicates send
      less);
    * ``all-to-all``: the dense variables as ``local-reduce-scatter`` (the all-to-all sends
      each other replica its block of P/N, then the ring all-gather (N-1)/N P), the sparse
      ones as ``all-reduce+slice``.

    The few bytes of sizes the sparse all-gathers exchange first are left out.
    """
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    layout = getattr(inner, "state_layout", None)
    state = getattr(layout, "state", None)
    if state is None:
        raise ValueError("bytes_sent_per_replica: the optimizer has no replica-sharded state")
    exchange = exchange or exchange_path(inner) or ALL_REDUCE_SLICE
    sparse = getattr(layout, "sparse_index_bytes", {})  # variable index -> X
    n = state._strategy.num_replicas_in_sync
    unsharded = reduce = gather = 0
    for index, chunked in enumerate(state._chunked):
        row = chunked.row_shape.num_elements() * chunked.dtype.size
        g, p = chunked.rows * row, chunked.rows_per_replica * n * row
        if index in sparse:
            entries = (n - 1) * sparse_rows * (row + sparse[index])
            unsharded += entries
            reduce += entries
            # the touched rows' changes, both exchanges: at most a chunk's rows, deduplicated
            gather += (n - 1) * min(sparse_rows, chunked.rows_per_replica) * (row + sparse[index])
        else:
            unsharded += 2 * (n - 1) * g // n
            if exchange in (LOCAL_REDUCE_SCATTER, ALL_TO_ALL):
                reduce += (n - 1) * p // n
            else:
                reduce += 2 * (n - 1) * g // n
            gather += (n - 1) * p // n
    return {"exchange": exchange, "replicas": n, "reduce": reduce, "gather": gather,
            "total": reduce + gather, "unsharded": unsharded}


def apply_gradients(optimizer, state: ChunkedState, grads: Sequence, variables: Sequence) -> None:
    """One RAdam step with replica-sharded slots (see the module docstring)."""
    ctx = tf.distribute.get_replica_context()
    if ctx is None:
        raise ValueError("shard_optimizer_state=True: apply() must run in a replica context")
    variables = [_unwrap(v) for v in variables]
    plan = optimizer.step_plan()
    exchange, why = plan.zero_exchange()
    plan.note_exchange(exchange, why)
    layout = optimizer.state_layout
    if layout is not None:  # for bytes_sent_per_replica
        layout.sparse_index_bytes = {
            state._index[optimizer.variable_key(var)]: grad.indices.dtype.size
            for grad, var in zip(grads, variables) if isinstance(grad, tf.IndexedSlices)}
    if exchange == LOCAL_REDUCE_SCATTER:
        ctx.merge_call(functools.partial(_local_step, optimizer, state, variables),
                       args=(list(grads),))
        return
    _all_reduce_step(ctx, optimizer, state, grads, variables, exchange)


def _scalars_for(optimizer, var, scalars: dict):
    dtype = radam_math.compute_dtype(var.dtype)
    if dtype.name not in scalars:
        scalars[dtype.name] = optimizer.step_scalars(optimizer.learning_rate, dtype)
    s = scalars[dtype.name]
    if s.has_weight_decay and not optimizer.decays(var):
        s = s._replace(has_weight_decay=False)
    return s


def _sparse_rows(grad: tf.IndexedSlices, first, rows: int):
    """(values, indices - first) of the entries of ``grad`` inside rows [first, first+rows)."""
    first = tf.cast(first, grad.indices.dtype)
    inside = tf.logical_and(grad.indices >= first, grad.indices < first + rows)
    positions = tf.reshape(tf.where(inside), [-1])
    return tf.gather(grad.values, positions), tf.gather(grad.indices, positions) - first


def collective_launcher(strategy, local_replica_id: int):
    """The strategy's own collective launcher for a local replica (its group key, instance
    keys and ordering token: our collectives are numbered and ordered with Keras' own, so
    every worker issues them under the same keys in the same order), or None."""
    launchers = getattr(getattr(strategy.extended, "_cross_device_ops", None), "_launchers", None)
    if not launchers or local_replica_id >= len(launchers):
        return None
    return launchers[local_replica_id]


def _all_to_all(ctx, strategy, blocks: tf.Tensor) -> tf.Tensor:
    """``blocks[r']`` to replica r'; returns [N, ...], row i the block replica i sent here."""
    local_id = tf.get_static_value(ctx._local_replica_id)
    launcher = collective_launcher(strategy, int(local_id))
    options = launcher._options
    hint = "nccl" if options.implementation.value == "NCCL" else "auto"  # no RING all-to-all
    instance_key = launcher._next_instance_key()
    with tf.device(launcher._device):
        return collective_ops.all_to_all_v2(
            blocks, launcher._group_size, launcher._group_key, instance_key,
            communication_hint=hint, timeout=options.timeout_seconds,
            ordering_token=launcher._get_ordering_token())


def _all_to_all_rows(ctx, optimizer, state, grads_and_vars) -> Dict[int, tf.Tensor]:
    """{position: this replica's rows of the summed gradient} for the dense floating
    gradients: per dtype one all-to-all of [N, every variable's padded rows r' flattened]
    (``_VarChunks.padded``), then the N received blocks added in replica order
    (``radam_math.sum_in_replica_order``: for N = 2 the ring all-reduce's bits)."""
    n = ctx.num_replicas_in_sync
    buckets: Dict[str, list] = {}
    for position, (grad, _) in enumerate(grads_and_vars):
        if isinstance(grad, tf.Tensor) and grad.dtype.is_floating:
            buckets.setdefault(grad.dtype.name, []).append(position)
    out = {}
    for positions in buckets.values():
        chunked = [state.for_variable(optimizer, grads_and_vars[p][1]) for p in positions]
        blocks = [tf.reshape(sh.padded(grads_and_vars[p][0]), [n, -1])
                  for p, sh in zip(positions, chunked)]
        sizes = [sh.rows_per_replica * sh.row_shape.num_elements() for sh in chunked]
        received = _all_to_all(ctx, state._strategy,
                               tf.concat(blocks, axis=1) if len(blocks) > 1 else blocks[0])
        total = radam_math.sum_in_replica_order([received[i] for i in range(n)])
        columns = tf.split(total, sizes) if len(sizes) > 1 else [total]
        for p, sh, column in zip(positions, chunked, columns):
            out[p] = tf.reshape(column, [sh.rows_per_replica] + sh.row_shape.as_list())
    return out


def _all_reduce_step(ctx, optimizer, state, grads, variables,
                     exchange: str = ALL_REDUCE_SLICE) -> None:
    """Keras' all-reduce (``all-to-all``: of the sparse gradients only; the dense ones by
    ``_all_to_all_rows``), each replica's rows sliced out, updated, all-gathered.

    A dense gradient: the replica's chunk updated in compiled chunks, its new rows
    all-gathered and assigned whole. A sparse gradient: only the touched rows of the
    replica's chunk move (radam_math.apply_sparse), so only their changes travel and
    every replica scatter-adds them to its copy: the same float additions on the same rows
    as adding them to the chunk and gathering it whole (the indices are unique, the chunks
    disjoint), without sending the untouched rows of the table. Both in one all-gather
    where the dtypes allow (``_all_gather_rows``).
    """
    grads_and_vars = list(zip(grads, variables))
    summed_rows: Dict[int, tf.Tensor] = {}  # position -> this replica's summed rows
    if optimizer.sums_gradients:
        if exchange == ALL_TO_ALL:
            summed_rows = _all_to_all_rows(ctx, optimizer, state, grads_and_vars)
            # IndexedSlices (and any non-floating dense gradient): Keras' all-reduce
            grads_and_vars = sum_all_but(
                grads_and_vars, [p in summed_rows for p in range(len(grads_and_vars))],
                optimizer.sum_gradients)
            for p, rows in summed_rows.items():
                grads_and_vars[p] = (rows, grads_and_vars[p][1])
        else:
            grads_and_vars = optimizer.sum_gradients(grads_and_vars)
    # clipnorm / global_clipnorm take all-reduce+slice: clipping rows here is clipvalue's
    grads = optimizer.clip_summed([g for g, _ in grads_and_vars])

    replica = ctx.replica_id_in_sync_group
    dense = []  # (position, the update of its chunk) for the executor
    scalars = {}
    new_values = []
    changes = {}  # position -> (values, global indices) of this replica's touched rows
    for position, (grad, var) in enumerate(zip(grads, variables)):
        if grad is None:
            new_values.append(tf.convert_to_tensor(var))
            continue
        s = _scalars_for(optimizer, var, scalars)
        chunked = state.for_variable(optimizer, var)
        slots = {name: _this_replica(slot) for name, slot in chunked.slots.items()}
        m, v, vhat = slots["m"], slots["v"], slots.get("vhat")
        if isinstance(grad, tf.IndexedSlices):
            first = replica * chunked.rows_per_replica
            values, indices = _sparse_rows(grad, first, chunked.rows_per_replica)
            work = _SparseRowsOf(var, first)
            executor.update_one(work, tf.IndexedSlices(values, indices), m, v, vhat, s)
            changes[position] = [(chunked, d.values, d.indices + tf.cast(first, d.indices.dtype))
                                 for d in work.deltas]
            new_values.append(None)
            continue
        rows = tf.gather(chunked.padded(tf.convert_to_tensor(var)), replica)
        grad_rows = grad if position in summed_rows else tf.gather(chunked.padded(grad), replica)
        if var.dtype.is_floating:
            dense.append((position, fused.DenseUpdate(radam_math.Rows(rows), grad_rows, m, v,
                                                      vhat, s)))
            new_values.append((chunked, None))
            continue
        work = radam_math.Rows(rows)
        executor.update_one(work, grad_rows, m, v, vhat, s)
        new_values.append((chunked, tf.convert_to_tensor(work)))
    if dense:  # the chunk's dense updates by the plan's kernel, as the local exchange's
        out = executor.update_rows([u for _, u in dense], plan=optimizer.step_plan(),
                                   cache=optimizer.compiled_cache())
        for (position, _), value in zip(dense, out):
            new_values[position] = (new_values[position][0], value)
    new_values, changes = _all_gather_rows(ctx, new_values, changes)

    def assign_all(distribution, values, changes):
        for position, (var, value) in enumerate(zip(variables, values)):
            if position in changes:
                for delta_values, delta_indices in changes[position]:
                    distribution.extended.update(
                        var, lambda x, d, i: x.scatter_add(tf.IndexedSlices(d, i)),
                        args=(delta_values, delta_indices), group=False)
                continue
            distribution.extended.update(var, lambda x, y: x.assign(y), args=(value,), group=False)

    ctx.merge_call(assign_all, args=(new_values, changes))


def _all_gather_rows(ctx, entries: list, changes: dict) -> tuple:
    """(whole new values, gathered row changes) for ``_all_reduce_step``.

    Under MWMS every all-gather is two collectives (the sizes, then the data; each a round
    trip), so where all are float32 with int32 / int64 indices one all-gather carries it
    all: per replica [row-change counts (int32 bits) | the dense variables' new rows | each
    sparse variable's changed rows with their indices as columns], then cut by the counts.
    Otherwise one all-gather per dtype and one per sparse update."""
    deltas = [(p, j) for p in sorted(changes) for j in range(len(changes[p]))]
    dense = [p for p, e in enumerate(entries) if isinstance(e, tuple)]
    kinds = {entries[p][1].dtype for p in dense} | {changes[p][j][1].dtype for p, j in deltas}
    if not deltas or kinds != {tf.float32} or any(
            changes[p][j][2].dtype not in (tf.int32, tf.int64) for p, j in deltas):
        out = _all_gather_bucketed(ctx, entries)
        return out, {p: [_gather_row_changes(ctx, chunked, values, indices)
                         for chunked, values, indices in d] for p, d in changes.items()}
    counts, pieces, widths = [], [], []
    for p, j in deltas:
        chunked, values, indices = changes[p][j]
        k = tf.shape(values)[0]
        width = chunked.row_shape.num_elements()
        index_columns = indices.dtype.size // 4  # int32: 1 float32 column, int64: 2
        columns = tf.reshape(tf.bitcast(indices, tf.float32), [k, index_columns])
        counts.append(tf.cast(k, tf.int32))
        widths.append((width, width + index_columns))
        pieces.append(tf.reshape(tf.concat([tf.reshape(values, [k, width]), columns], 1), [-1]))
    sizes = [int(entries[p][1].shape.num_elements()) for p in dense]
    flat_dense = [tf.reshape(entries[p][1], [-1]) for p in dense]
    header = tf.bitcast(tf.stack(counts), tf.float32)
    gathered = ctx.all_gather(tf.concat([header] + flat_dense + pieces, axis=0), axis=0)
    n, j_count, d_size = ctx.num_replicas_in_sync, len(deltas), sum(sizes)
    offset = tf.constant(0, tf.int32)
    dense_parts, sparse_parts = [], [[] for _ in deltas]
    for _ in range(n):  # each replica's segment: its header says how long it is
        k = tf.bitcast(gathered[offset:offset + j_count], tf.int32)
        offset += j_count
        dense_parts.append(gathered[offset:offset + d_size])
        offset += d_size
        for j, (_, full) in enumerate(widths):
            sparse_parts[j].append(tf.reshape(gathered[offset:offset + k[j] * full], [-1, full]))
            offset += k[j] * full
    out = list(entries)
    if dense:
        columns = tf.split(tf.stack(dense_parts), sizes, axis=1)
        for p, column in zip(dense, columns):
            chunked = entries[p][0]
            stacked = [chunked.rows_per_replica * chunked.num_replicas] + chunked.row_shape.as_list()
            out[p] = chunked.unpadded(tf.reshape(column, stacked))
    gathered_changes: Dict[int, list] = {}
    for (p, j), parts, (width, full) in zip(deltas, sparse_parts, widths):
        chunked, _, indices = changes[p][j]
        rows = tf.concat(parts, axis=0)
        values = tf.reshape(rows[:, :width], [-1] + chunked.row_shape.as_list())
        index = tf.reshape(tf.bitcast(rows[:, width:], indices.dtype), [-1])
        gathered_changes.setdefault(p, []).append((values, index))
    return out, gathered_changes


def _gather_row_changes(ctx, chunked: _VarChunks, values, indices):
    """All replicas' (values, indices) of changed rows, concatenated in replica order; each
    replica has its own number of rows (ReplicaContext.all_gather pads and unpads them).
    Where the index bits fit in whole columns of the values' dtype (int32 or int64 indices,
    float32 values) the indices ride as bitcast columns of the values: one all-gather."""
    k = tf.shape(values)[0]
    width = chunked.row_shape.num_elements()
    flat = tf.reshape(values, [k, width])
    if indices.dtype.size % values.dtype.size == 0 and values.dtype.size in (4, 8):
        columns = tf.reshape(tf.bitcast(indices, values.dtype), [k, -1])
        gathered = ctx.all_gather(tf.concat([flat, columns], axis=1), axis=0)
        out_values = tf.reshape(gathered[:, :width], [-1] + chunked.row_shape.as_list())
        out_indices = tf.bitcast(gathered[:, width:], indices.dtype)
        return out_values, tf.reshape(out_indices, [-1])
    return ctx.all_gather(values, axis=0), ctx.all_gather(indices, axis=0)


def _all_gather_bucketed(ctx, entries: list) -> list:
    """All-gather every replica's new rows, one collective per dtype instead of one per
    variable (under MWMS each collective is a round trip): ``entries`` holds a whole value
    (no gradient: unchanged) or ``(chunked, rows)``; returns the whole new values."""
    buckets: Dict[str, list] = {}
    for position, entry in enumerate(entries):  # None: a sparse update (its rows travel apart)
        if isinstance(entry, tuple):
            buckets.setdefault(entry[1].dtype.name, []).append(position)
    out = list(entries)
    for positions in buckets.values():
        flat = [tf.reshape(entries[p][1], [-1]) for p in positions]
        sizes = [int(f.shape[0]) for f in flat]
        gathered = ctx.all_gather(tf.concat(flat, axis=0) if len(flat) > 1 else flat[0],
                                  axis=0)
        columns = tf.split(tf.reshape(gathered, [-1, sum(sizes)]), sizes, axis=1)
        for p, column in zip(positions, columns):
            chunked = entries[p][0]
            stacked = [chunked.rows_per_replica * chunked.num_replicas] + chunked.row_shape.as_list()
            out[p] = chunked.unpadded(tf.reshape(column, stacked))
    return out


class _SparseRows(radam_math.Rows):
    """A replica's rows of a variable under a sparse update: read like ``radam_math.Rows``, but the
    scatter-adds are kept (``deltas``) rather than applied, so that every replica adds them
    to its own copy of the variable in place: only the touched rows travel and change."""

    def __init__(self, value):
        super().__init__(value)
        self.deltas: List[tf.IndexedSlices] = []

    def assign(self, value):
        raise RuntimeError("radam_math.apply_sparse assigns no whole variable")

    def scatter_add(self, slices):
        self.deltas.append(slices)


class _SparseRowsOf(_SparseRows):
    """A replica's chunk of a variable under a sparse update, read row-wise from the
    variable itself (``sparse_read`` of the touched rows only: a dense read of a table that
    scatters have touched copies all of it), its scatter-adds kept as ``_SparseRows``'."""

    def __init__(self, variable, first):
        super().__init__(None)
        self._variable, self._first = variable, first

    @property
    def dtype(self):
        return self._variable.dtype

    def sparse_read(self, indices):
        return _this_replica(self._variable).sparse_read(
            indices + tf.cast(self._first, indices.dtype))


def _local_step(optimizer, state: ChunkedState, variables: Sequence, distribution,
                grads: Sequence) -> None:
    """The step in cross-replica context (single-worker MirroredStrategy, all devices here).

    Reduce-scatter: on device r, rows r of every replica's dense gradient summed (a sparse
    gradient: every replica's entries, as Keras' all-reduce of IndexedSlices concatenates
    them, of which r keeps its rows). Update: device r's chunk, dense gradients by the plan's
    kernel (``executor.update_rows``). All-gather: every device assigns its copy every
    replica's new rows (a sparse update: adds the touched rows' changes in place).
    No bucketing into flat buffers: in one graph the rows move without collectives, and a
    flat buffer would only add two copies of every gradient.
    """

    devices = list(distribution.extended.worker_devices)
    n = len(devices)
    aggregate = optimizer.sums_gradients
    local = distribution.experimental_local_results
    # one value per replica (a tensor that every replica passed is that value on each)
    grads = [None if g is None else list(local(g)) if isinstance(
        g, tf.distribute.DistributedValues) else [g] * n for g in grads]
    if any(g is not None and len(g) != n for g in grads):
        raise RuntimeError("ZeRO-1: a gradient has no value on every replica")
    clip_value = getattr(optimizer, "clipvalue", None) or 0
    plan, cache = optimizer.step_plan(), optimizer.compiled_cache()
    present = [i for i, g in enumerate(grads) if g is not None]
    chunked = [state.for_variable(optimizer, var) for var in variables]
    # new_rows[i][r]: variable i's rows r after the update (on device r), or for a sparse
    # gradient the list of (values, indices into the variable) to add
    new_rows: Dict[int, list] = {i: [None] * n for i in present}
    sparse = set()
    for r, device in enumerate(devices):
        with tf.device(device):
            scalars: dict = {}
            dense = []  # (i, the update of its rows r)
            for i in present:
                var, sh = variables[i], chunked[i]
                s = _scalars_for(optimizer, var, scalars)
                slots = {name: local(slot)[r] for name, slot in sh.slots.items()}
                rows = sh.padded(tf.convert_to_tensor(local(var)[r]))[r]
                per_replica = grads[i]
                first = r * sh.rows_per_replica
                if isinstance(per_replica[0], tf.IndexedSlices):
                    sparse.add(i)
                    if aggregate:  # Keras' all-reduce of IndexedSlices: every entry, in order
                        grad = tf.IndexedSlices(
                            tf.concat([g.values for g in per_replica], axis=0),
                            tf.concat([g.indices for g in per_replica], axis=0),
                            per_replica[0].dense_shape)
                    else:
                        grad = per_replica[r]
                    if clip_value > 0:
                        grad = tf.clip_by_value(grad, -clip_value, clip_value)
                    values, indices = _sparse_rows(grad, first, sh.rows_per_replica)
                    work = _SparseRows(rows)
                    executor.update_one(work, tf.IndexedSlices(values, indices), slots["m"],
                                        slots["v"], slots.get("vhat"), s)
                    new_rows[i][r] = [(d.values, d.indices + tf.cast(first, d.indices.dtype))
                                      for d in work.deltas]
                    continue
                if aggregate:
                    grad = radam_math.sum_in_replica_order([sh.padded(g)[r] for g in per_replica])
                else:
                    grad = sh.padded(per_replica[r])[r]
                if clip_value > 0:
                    grad = tf.clip_by_value(grad, -clip_value, clip_value)
                if var.dtype.is_floating:
                    dense.append((i, fused.DenseUpdate(radam_math.Rows(rows), grad, slots["m"],
                                                       slots["v"], slots.get("vhat"), s)))
                else:
                    work = radam_math.Rows(rows)
                    executor.update_one(work, grad, slots["m"], slots["v"], slots.get("vhat"), s)
                    new_rows[i][r] = tf.convert_to_tensor(work)
            if dense:
                out = executor.update_rows([u for _, u in dense], plan=plan, cache=cache,
                                           device=device)
                for (i, _), value in zip(dense, out):
                    new_rows[i][r] = value
    for i in present:
        copies = local(variables[i])
        for d, device in enumerate(devices):
            with tf.device(device):
                if i in sparse:
                    for deltas in new_rows[i]:
                        for values, indices in deltas:
                            copies[d].scatter_add(tf.IndexedSlices(values, indices))
                else:
                    _write_rows(chunked[i], copies[d], new_rows[i])


def _write_rows(chunked: _VarChunks, copy, new_rows: Sequence[tf.Tensor]) -> None:
    """The local all-gather into one device's copy: every replica's rows concatenated, the
    padding cut off, assigned whole: faster than assigning each replica's rows into place
    with a strided-slice assign (docs/BENCHMARKS.md, "Figures behind the code")."""
    copy.assign(chunked.unpadded(tf.concat(list(new_rows), axis=0)))


def state_bytes_per_replica(optimizer) -> int:
    """Bytes of optimizer state one replica holds: m, v (vhat), and Lookahead's slow weights."""
    total = 0
    for opt in (optimizer, getattr(optimizer, "inner_optimizer", None)):
        layout = getattr(opt, "state_layout", None)
        if layout is not None:
            total += layout.local_state_bytes(opt)
    return total


# -- Lookahead's slow weights, sharded like RAdam's slots ------------------------------------------
def lookahead_sync(lookahead, state: ChunkedState, variables: Sequence, sync) -> None:
    """On sync steps, each replica pulls its rows back toward its slow chunk (radam_math's
    ``lookahead_pull_back``), then the rows are all-gathered into the variables. Steps that
    do not sync exchange nothing (the decision is taken in cross-replica context)."""
    ctx = tf.distribute.get_replica_context()
    variables = [_unwrap(v) for v in variables]
    plan = lookahead.step_plan()
    exchange, why = plan.zero_exchange()
    plan.note_exchange(exchange, why)
    if exchange == LOCAL_REDUCE_SCATTER:
        ctx.merge_call(functools.partial(_local_sync, lookahead, state, variables),
                       args=(sync,))
        return
    replica = ctx.replica_id_in_sync_group
    all_chunked = [state.for_variable(lookahead, var) for var in variables]
    chunks = [tf.gather(chunked.padded(tf.convert_to_tensor(var)), replica)
              for chunked, var in zip(all_chunked, variables)]

    def pull_back_all():  # one branch for all variables
        return executor.pull_back_rows(
            [(radam_math.Rows(chunk), _this_replica(chunked.slots["slow"]))
             for chunked, chunk in zip(all_chunked, chunks)], lookahead.slow_step_size)

    new_chunks = tf.cond(sync, pull_back_all, lambda: list(chunks)) if chunks else []

    def gather_and_assign(chunks):
        replica_ctx = tf.distribute.get_replica_context()
        values = _all_gather_bucketed(replica_ctx, list(zip(all_chunked, chunks)))

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


def _local_sync(lookahead, state: ChunkedState, variables: Sequence, distribution, sync) -> None:
    """Lookahead's sync in cross-replica context (single-worker MirroredStrategy): one branch
    for all variables; in it each device pulls its rows back toward its slow chunk, and every
    device writes every replica's rows into its copy (as ``_local_step``)."""
    local = distribution.experimental_local_results
    if isinstance(sync, tf.distribute.DistributedValues):
        sync = local(sync)[0]
    devices = list(distribution.extended.worker_devices)
    chunked = [state.for_variable(lookahead, var) for var in variables]

    def pull_back_all():
        new_rows = [[None] * len(devices) for _ in variables]
        for r, device in enumerate(devices):
            with tf.device(device):
                pairs = [(radam_math.Rows(chunked[i].padded(tf.convert_to_tensor(local(var)[r]))[r]),
                          local(chunked[i].slots["slow"])[r]) for i, var in enumerate(variables)]
                for i, rows in enumerate(executor.pull_back_rows(pairs, lookahead.slow_step_size)):
                    new_rows[i][r] = rows
        for i, var in enumerate(variables):
            for d, (device, copy) in enumerate(zip(devices, local(var))):
                with tf.device(device):
                    _write_rows(chunked[i], copy, new_rows[i])

    tf.cond(sync, pull_back_all, lambda: None)
