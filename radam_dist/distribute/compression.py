"""Compressed gradient all-reduce: RectifiedAdam's ``all_reduce_dtype``.

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

import tensorflow as tf

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
