"""Cross-replica gradient aggregation options for RectifiedAdam.

* default: the gradients are summed across replicas in float32 (Keras' all-reduce);
* ``all_reduce_dtype="float16"``: dense float32 gradients are cast to float16 for the
  all-reduce (half the bytes on the wire) and cast back before the update. Each replica's
  gradient is divided by the number of replicas before the cast and the sum multiplied back,
  so the sum cannot overflow where the single gradients do not. Sparse (IndexedSlices)
  gradients and non-float32 gradients are reduced as before. The error this costs is
  measured in tests/test_distribute_aggregation.py and docs/DISTRIBUTE.md.

bfloat16 is refused: TF 2.21's collective all-reduce (CollectiveReduceV2) accepts float16,
float32, float64, int32 and int64 only, so a bfloat16 "all-reduce" would have to be emulated
and would save nothing.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import keras
import tensorflow as tf

from radam_dist import radam_math
from radam_dist._env import switched_on

SUPPORTED_ALL_REDUCE_DTYPES = ("float32", "float16")


def validate_all_reduce_dtype(value) -> Optional[str]:
    """``None`` for the default float32 all-reduce, or the name of the compressed dtype."""
    if value is None:
        return None
    name = tf.as_dtype(value).name if not isinstance(value, str) else value
    if name == "float32":
        return None
    if name == "bfloat16":
        raise ValueError(
            "all_reduce_dtype='bfloat16' is not supported: TensorFlow's collective all-reduce "
            "has no bfloat16 kernel (it takes float16, float32, float64); use 'float16'"
        )
    if name not in SUPPORTED_ALL_REDUCE_DTYPES:
        raise ValueError(
            f"all_reduce_dtype must be one of {SUPPORTED_ALL_REDUCE_DTYPES} or None, got {value!r}"
        )
    return name


def compressed_all_reduce_sum(
    grads_and_vars: Sequence[Tuple],
    dtype: str,
    all_reduce_sum: Callable[[List[Tuple]], List[Tuple]],
) -> List[Tuple]:
    """Sum ``grads_and_vars`` across replicas with dense float32 gradients sent as ``dtype``.

    ``all_reduce_sum`` is the optimizer's own float32 cross-replica sum (it keeps the order
    and the None gradients); it is called once for the compressed gradients and once for the
    rest, so every collective sees a single dtype.
    """
    replica_context = tf.distribute.get_replica_context()
    grads_and_vars = list(grads_and_vars)
    if replica_context is None or replica_context.num_replicas_in_sync == 1:
        return all_reduce_sum(grads_and_vars)
    wire = tf.as_dtype(dtype)
    n = float(replica_context.num_replicas_in_sync)

    def compressible(grad):
        dense = grad is not None and not isinstance(grad, tf.IndexedSlices)
        return dense and grad.dtype == tf.float32

    small = [(tf.cast(g / n, wire), v) for g, v in grads_and_vars if compressible(g)]
    other = [(g, v) for g, v in grads_and_vars if g is not None and not compressible(g)]
    # Keras' sum warns (and breaks) on None entries: only real gradients go in.
    small = iter(all_reduce_sum(small) if small else [])
    other = iter(all_reduce_sum(other) if other else [])
    result = []
    for g, v in grads_and_vars:
        if g is None:
            result.append((None, v))
        elif compressible(g):
            result.append((tf.cast(next(small)[0], tf.float32) * n, v))
        else:
            result.append((next(other)[0], v))
    return result


# -- the cross-replica sum in the step's own graph ---------------------------------------------
#
# Under a single-process MirroredStrategy all replicas' gradients live in one graph, and the
# ring all-reduce between its devices (CollectiveReduceV2) costs more than reading the other
# devices' tensors directly: the large set (13.6M parameters in 4 tensors, 2 logical CPUs)
# spent 1.75x the per-replica bandwidth bound in the all-reduce alone. So there the dense
# gradients go unreduced into the optimizer's merge_call, and every device adds all replicas'
# gradients in replica order (the fused chunks inside their XLA computation, saving the write
# and read of the sum): every copy gets the same bits, and for 2 replicas the bits of the ring
# (a + b == b + a). For more replicas the rounding order differs from the ring's (measured in
# tests/test_fused_strategies.py). ``RADAM_DIST_INGRAPH_SUM=0`` keeps Keras' all-reduce.

INGRAPH_SWITCH = "RADAM_DIST_INGRAPH_SUM"


def sums_in_graph(optimizer) -> bool:
    """Can this step defer its dense gradients' sum to the merge_call (see above)?

    Only a single-worker MirroredStrategy with merge_call, the float32 all-reduce and no
    clipping (which needs the summed gradient before the update): elsewhere Keras' all-reduce.
    """
    from tensorflow.python.distribute import mirrored_strategy  # pylint: disable=import-outside-toplevel

    if not switched_on(INGRAPH_SWITCH):
        return False
    if optimizer.all_reduce_dtype is not None or any(
            getattr(optimizer, name, None) for name in ("clipnorm", "global_clipnorm", "clipvalue")):
        return False
    extended = _replicated_strategy_extended()
    return (type(extended) is mirrored_strategy.MirroredExtended  # pylint: disable=unidiomatic-typecheck
            and not getattr(extended, "_is_multi_worker_training", False)
            and extended._use_merge_call())  # pylint: disable=protected-access


def _replicated_strategy_extended():
    """The strategy's ``extended`` in a replica context with more than one replica, else
    None: where a step's gradients still are each replica's own."""
    if not tf.distribute.has_strategy() or tf.distribute.in_cross_replica_context():
        return None
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync < 2:
        return None
    return tf.distribute.get_strategy().extended


# -- MultiWorkerMirroredStrategy: large gradients in collectives of their own ------------------
#
# Keras' all-reduce hands every gradient to the strategy in one call with the default
# CommunicationOptions (bytes_per_pack=0): one pack, so the gradients are concatenated into
# one buffer, all-reduced, and split again: two extra copies of every byte. Each large
# tensor all-reduced on its own, one after another, took 0.48-0.79x the time of the single
# pack in same-run comparisons (large set, 13.6M parameters in 4 tensors; resnet50 set 0.49x;
# two CPU workers on gRPC loopback, loaded machine; docs/BENCHMARKS.md). Every element is the
# ring's sum of the same values: for 2 workers a + b, the bits of the single pack; for more,
# the ring may add in another order (the element's place in the buffer changes), the same
# bits on every replica. ``RADAM_DIST_ALL_REDUCE_SPLIT=0`` keeps Keras' single pack.

SPLIT_SWITCH = "RADAM_DIST_ALL_REDUCE_SPLIT"
# A dense gradient of at least this many bytes is all-reduced on its own (no concat, no
# split); the smaller ones keep Keras' single pack, where packing saves per-collective costs.
SPLIT_MIN_BYTES = 1 << 20


def splits_large_gradients(optimizer) -> bool:
    """Does this step all-reduce its large dense gradients one by one (see above)?

    Only in a replica context of MultiWorkerMirroredStrategy with more than one replica and
    the float32 all-reduce (``all_reduce_dtype`` keeps its own path)."""
    # pylint: disable-next=import-outside-toplevel
    from tensorflow.python.distribute import collective_all_reduce_strategy as cars

    if not switched_on(SPLIT_SWITCH) or getattr(optimizer, "all_reduce_dtype", None) is not None:
        return False
    return isinstance(_replicated_strategy_extended(), cars.CollectiveAllReduceExtended)


def _is_large(grad) -> bool:
    return (isinstance(grad, tf.Tensor) and grad.shape.is_fully_defined()
            and grad.shape.num_elements() * grad.dtype.size >= SPLIT_MIN_BYTES)


def split_all_reduce_sum(grads_and_vars: Sequence[Tuple], all_reduce_sum) -> List[Tuple]:
    """The cross-replica sum of ``grads_and_vars`` (order and None gradients kept): the
    large dense gradients each in a collective of its own (``bytes_per_pack=1``: every
    tensor its own pack, issued in order), the rest through ``all_reduce_sum`` (Keras')."""
    grads_and_vars = list(grads_and_vars)
    large = tuple(_is_large(g) for g, _ in grads_and_vars)
    if not any(large):
        return all_reduce_sum(grads_and_vars)
    result = sum_all_but(grads_and_vars, large, all_reduce_sum)  # the small ones first, as before
    options = tf.distribute.experimental.CommunicationOptions(bytes_per_pack=1)
    reduced_large = iter(tf.distribute.get_replica_context().all_reduce(
        tf.distribute.ReduceOp.SUM, [g for (g, _), own in zip(grads_and_vars, large) if own],
        options=options))
    return [(next(reduced_large), v) if own else (g, v) for (g, v), own in zip(result, large)]


def sum_all_but(grads_and_vars: Sequence[Tuple], kept: Sequence[bool],
                all_reduce_sum) -> List[Tuple]:
    """The pairs in their order, each gradient not ``kept`` (and not None) replaced by its
    cross-replica sum from one ``all_reduce_sum`` call (Keras'); the kept ones untouched, for
    a path of their own (a deferred sum, a collective of their own, ZeRO's all-to-all)."""
    rest = [(g, v) for (g, v), keep in zip(grads_and_vars, kept) if not keep and g is not None]
    reduced = iter(all_reduce_sum(rest) if rest else [])
    return [(g, v) if keep or g is None else (next(reduced)[0], v)
            for (g, v), keep in zip(grads_and_vars, kept)]


def all_reduce_or_defer(optimizer, grads_and_vars: Sequence[Tuple], all_reduce_sum) -> Tuple[
        List[Tuple], Tuple[bool, ...]]:
    """Keras' all-reduce of the pairs, except the dense float gradients whose sum
    ``sums_in_graph`` defers to the merge_call; returns the pairs and, per pair, whether
    its gradient is still this replica's own. Under MWMS the large gradients go in
    collectives of their own (``split_all_reduce_sum``)."""
    grads_and_vars = list(grads_and_vars)
    if not sums_in_graph(optimizer):
        if splits_large_gradients(optimizer):
            return split_all_reduce_sum(grads_and_vars, all_reduce_sum), ()
        return all_reduce_sum(grads_and_vars), ()
    deferred = tuple(g is not None and not isinstance(g, tf.IndexedSlices) and v.dtype.is_floating
                     for g, v in grads_and_vars)
    return sum_all_but(grads_and_vars, deferred, all_reduce_sum), deferred


def in_graph_sum(distribution, grad):
    """The mirrored sum of a per-replica gradient: on each device, in replica order."""
    from tensorflow.python.distribute import values as values_lib  # pylint: disable=import-outside-toplevel

    parts = distribution.experimental_local_results(grad)
    sums = []
    for device in distribution.extended.worker_devices:
        with tf.device(device):
            sums.append(radam_math.sum_in_replica_order(parts))
    return values_lib.Mirrored(tuple(sums))


class DeferredSum:
    """A per-replica gradient whose sum the fused chunks compute (``fused.apply_dense``)."""

    def __init__(self, distribution, value):
        self.value = value
        self.parts = tuple(distribution.experimental_local_results(value))

# -- accumulation over micro-batches and skipping of non-finite steps --------------------------
#
# Keras 3's own ``gradient_accumulation_steps`` puts the update (which calls merge_call) inside
# a cond in replica context, which MirroredStrategy and MWMS refuse ("Exception encountered
# when calling Cond.call()"). Here the decision is taken once per step in cross-replica
# context (inside one merge_call), as Keras' LossScaleOptimizer does: a cond there, whose
# "apply" branch goes back to the replicas with call_for_each_replica.


def validate_accumulation_steps(value) -> int:
    if int(value) != value or value < 1:
        raise ValueError(f"accumulation_steps must be a positive integer, got {value!r}")
    return int(value)


def gate_is_active(optimizer) -> bool:
    return optimizer.accumulation_steps > 1 or optimizer.skip_nonfinite


def build_gate_state(optimizer, variables: Sequence) -> None:
    """Create the accumulators (one per variable, like it) and the counters; called from
    ``build``, i.e. eagerly under the optimizer's strategy."""
    if not gate_is_active(optimizer):
        return
    optimizer.skipped_steps = optimizer.add_variable(
        shape=(), initializer="zeros", dtype="int64", name="skipped_steps"
    )
    optimizer.accumulated_micro_steps = optimizer.add_variable(
        shape=(), initializer="zeros", dtype="int64", name="accumulated_micro_steps"
    )
    optimizer._accumulators = []
    if optimizer.accumulation_steps > 1:
        optimizer._accumulators = [_add_accumulator(optimizer, v) for v in variables]


def _add_accumulator(optimizer, variable):
    """One micro-batch accumulator like ``variable``.

    Each replica sums its own micro-batches into its copy. Under MirroredStrategy / MWMS the
    accumulator is a sync-on-read variable with SUM aggregation: in replica context (the
    step) each replica reads and updates its own copy, as before, but read from outside (a
    checkpoint, ``.keras`` / ``save_weights``, ``get_weights``) it is the sum over the
    replicas, and assigned from outside (a restore) each replica gets 1/N of the value. A
    checkpoint taken in the middle of an accumulation so holds every replica's partial sums,
    not only the first replica's, and restores with any number of replicas (their sum is
    what the next step applies). Under MWMS that read is a collective: every worker saves.
    """
    from radam_dist.distribute import zero  # imported here: zero imports this module

    strategy = getattr(optimizer, "_distribution_strategy", None)
    if strategy is None or not zero.supports(strategy):
        return optimizer.add_variable_from_reference(variable, name="accumulator")
    name = f"{variable.path.replace('/', '_')}_accumulator" if hasattr(variable, "path") \
        else f"{str(variable.name).replace('/', '_').replace(':', '_')}_accumulator"
    with keras.name_scope(optimizer.name, caller=optimizer):
        accumulator = keras.Variable(
            initializer=keras.initializers.get("zeros"), shape=variable.shape,
            dtype=variable.dtype, trainable=False, aggregation="sum",
            synchronization="on_read", name=name)
    optimizer._track_variable(accumulator)
    return accumulator


def _tf(variable):
    return variable.value if isinstance(variable, keras.Variable) else variable


def _count_nonfinite(grads) -> tf.Tensor:
    counts = [tf.constant(0.0)]
    for g in grads:
        if g is None:
            continue
        values = g.values if isinstance(g, tf.IndexedSlices) else g
        counts.append(tf.reduce_sum(tf.cast(tf.logical_not(tf.math.is_finite(values)), tf.float32)))
    return tf.add_n(counts)


def _first(distribution, value):
    if isinstance(value, tf.distribute.DistributedValues):
        return distribution.experimental_local_results(value)[0]
    return value


def _accumulated_gradient(grad, accumulator, steps: int):
    """(this micro-batch's gradient + the accumulated ones) / steps, sparse kept sparse (the
    rows touched by some micro-batch, i.e. the non-zero rows of the sum)."""
    acc = tf.convert_to_tensor(_tf(accumulator))
    if isinstance(grad, tf.IndexedSlices):
        total = tf.tensor_scatter_nd_add(acc, tf.expand_dims(grad.indices, -1), grad.values)
        flat = tf.reshape(total, [tf.shape(total)[0], -1])
        rows = tf.reshape(tf.where(tf.reduce_any(tf.not_equal(flat, 0), axis=1)), [-1])
        rows = tf.cast(rows, grad.indices.dtype)
        return tf.IndexedSlices(tf.gather(total, rows) / steps, rows, grad.dense_shape)
    return (tf.convert_to_tensor(grad) + acc) / steps


def gated_apply(optimizer, grads, variables, apply_fn) -> None:
    """``apply_fn(grads, variables)`` behind the accumulation / non-finite gate.

    Each call is one micro-batch. If any replica's gradients hold inf or NaN (all-reduced
    count), the micro-batch is dropped: nothing changes but ``skipped_steps`` (+1). Otherwise
    it is added to the per-replica accumulators, and every ``accumulation_steps``-th
    micro-batch the mean of the accumulated gradients is applied (one RAdam step, one
    ``iterations`` increment) and the accumulators are cleared.
    """
    grads, variables = list(grads), list(variables)
    ctx = tf.distribute.get_replica_context()
    if ctx is None:
        raise ValueError("apply() must be called in a replica context")
    steps = optimizer.accumulation_steps
    if optimizer.skip_nonfinite:
        bad = _count_nonfinite(grads)
        if ctx.num_replicas_in_sync > 1:
            bad = ctx.all_reduce(tf.distribute.ReduceOp.SUM, bad)
        finite = tf.equal(bad, 0.0)
    else:
        finite = tf.constant(True)
    micro = tf.convert_to_tensor(_tf(optimizer.accumulated_micro_steps))
    is_last = tf.equal((micro + 1) % steps, 0)
    accumulators = list(optimizer._accumulators)
    present = [i for i, g in enumerate(grads) if g is not None]

    def replica_apply(replica_grads):
        if steps > 1:
            replica_grads = [
                None if g is None else _accumulated_gradient(g, accumulators[i], steps)
                for i, g in enumerate(replica_grads)
            ]
        apply_fn(replica_grads, variables)

    def cross_replica(distribution, replica_grads, finite, is_last):
        finite, is_last = _first(distribution, finite), _first(distribution, is_last)
        counter = _tf(optimizer.accumulated_micro_steps)

        def apply_branch():
            distribution.extended.call_for_each_replica(replica_apply, args=(replica_grads,))
            for i in present if steps > 1 else []:
                distribution.extended.update(
                    _tf(accumulators[i]), lambda a: a.assign(tf.zeros_like(a)), group=False
                )
            counter.assign_add(1)

        def accumulate_branch():
            for i in present:
                distribution.extended.update(
                    _tf(accumulators[i]), _add_to, args=(replica_grads[i],), group=False
                )
            counter.assign_add(1)

        def skip_branch():
            _tf(optimizer.skipped_steps).assign_add(1)

        def take():
            if steps == 1:
                apply_branch()
            else:
                tf.cond(is_last, apply_branch, accumulate_branch)

        tf.cond(finite, take, skip_branch)

    ctx.merge_call(cross_replica, args=(grads, finite, is_last))


def _add_to(accumulator, grad):
    if isinstance(grad, tf.IndexedSlices):
        return accumulator.scatter_add(grad)
    return accumulator.assign_add(grad)
