"""How a replicated step's gradients are summed across replicas, beyond Keras' one pack: the
in-graph sum of a single-worker MirroredStrategy and MWMS's large gradients apart.

Which of them a step takes is the step plan's choice (radam_dist/step/plan.py); this module
is the mechanism.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import tensorflow as tf

from radam_dist import radam_math

# -- the cross-replica sum in the step's own graph ---------------------------------------------
#
# Under a single-process MirroredStrategy all replicas' gradients live in one graph, and the
# ring all-reduce between its devices (CollectiveReduceV2) costs more than reading the other
# devices' tensors directly (docs/BENCHMARKS.md, "Figures behind the code"). So the dense
# gradients go unreduced into the optimizer's merge_call, and every device adds all replicas'
# gradients in replica order (the fused chunks inside their XLA computation, saving the write
# and read of the sum): every copy gets the same bits, and for 2 replicas the bits of the ring
# (a + b == b + a). For more replicas the rounding order differs from the ring's (measured in
# tests/test_fused_strategies.py). ``RADAM_DIST_INGRAPH_SUM=0`` keeps Keras' all-reduce.

INGRAPH_SWITCH = "RADAM_DIST_INGRAPH_SUM"  # read by the step plan (radam_dist/step/plan.py)


# -- MultiWorkerMirroredStrategy: large gradients in collectives of their own ------------------
#
# Keras' all-reduce hands every gradient to the strategy in one call with the default
# CommunicationOptions (bytes_per_pack=0): one pack, so the gradients are concatenated into
# one buffer, all-reduced, and split again: two extra copies of every byte. Each large
# tensor all-reduced on its own, one after another, is faster (docs/BENCHMARKS.md, "Figures
# behind the code"). Every element is the
# ring's sum of the same values: for 2 workers a + b, the bits of the single pack; for more,
# the ring may add in another order (the element's place in the buffer changes), the same
# bits on every replica. ``RADAM_DIST_ALL_REDUCE_SPLIT=0`` keeps Keras' single pack.

SPLIT_SWITCH = "RADAM_DIST_ALL_REDUCE_SPLIT"  # read by the step plan
# A dense gradient of at least this many bytes is all-reduced on its own (no concat, no
# split); the smaller ones keep Keras' single pack, where packing saves per-collective costs.
SPLIT_MIN_BYTES = 1 << 20


def _is_large(grad) -> bool:
    return (isinstance(grad, tf.Tensor) and grad.shape.is_fully_defined()
            and grad.shape.num_elements() * grad.dtype.size >= SPLIT_MIN_BYTES)


def all_reduce_large_apart(grads_and_vars: Sequence[Tuple], all_reduce_sum) -> List[Tuple]:
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


def all_reduce_or_defer(plan, grads_and_vars: Sequence[Tuple], all_reduce_sum) -> Tuple[
        List[Tuple], Tuple[bool, ...]]:
    """The exchange ``plan`` (the optimizer's step plan) picks: Keras' all-reduce of the
    pairs, except the dense float gradients whose sum the in-graph sum defers to the
    merge_call; returns the pairs and, per pair, whether its gradient is still this
    replica's own. Under MWMS the large gradients go in collectives of their own
    (``all_reduce_large_apart``)."""
    grads_and_vars = list(grads_and_vars)
    plan.note_exchange(*plan.exchange())
    if not plan.sums_in_graph():
        if plan.sums_large_gradients_apart():
            return all_reduce_large_apart(grads_and_vars, all_reduce_sum), ()
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
