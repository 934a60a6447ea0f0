"""Accumulation over micro-batches (``accumulation_steps``) and skipping of non-finite
steps (``skip_nonfinite``): the gate in front of RectifiedAdam's update.
"""

from __future__ import annotations

from typing import Sequence

import keras
import tensorflow as tf

from radam_dist.distribute import zero

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
