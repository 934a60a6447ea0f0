"""How gradients travel between ranks: as they are, as float16, or as bfloat16.

Horovod 0.28.1 can all-reduce float16 (``hvd.Compression.fp16``) but has no bfloat16 data
type, so ``"bf16"`` sends each gradient's bfloat16 bit pattern with an all-gather (uint16)
and sums the gathered copies locally in float32, in rank order, so every rank gets the same
bits. Per rank that receives ``(size - 1) * 2`` bytes per element against roughly
``2 * (size - 1) / size * 4`` for a float32 ring all-reduce: less traffic up to 3 ranks, the
same at 4, more beyond (prefer ``"fp16"`` there, or none). bfloat16 keeps float32's range, so
it cannot overflow where float16 can.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import tensorflow as tf

from radam_dist.horovod._hvd import hvd


def check_compression(compression) -> Optional[str]:
    """Normalise ``compression`` (None, "none", "fp16", "bf16" or an hvd.Compression class)."""
    if compression is None or compression == "none":
        return None
    if isinstance(compression, str):
        name = compression.lower()
        if name in ("fp16", "float16"):
            return "fp16"
        if name in ("bf16", "bfloat16"):
            return "bf16"
    else:
        module = hvd()
        if compression is module.Compression.none:
            return None
        if compression is module.Compression.fp16:
            return "fp16"
    raise ValueError(
        f"compression must be one of None, 'fp16', 'bf16' (or hvd.Compression.none/fp16); "
        f"got {compression!r}"
    )


def _is_float(tensor) -> bool:
    return tensor.dtype.is_floating


def grouped_reduce(
    tensors: Sequence[tf.Tensor], average: bool, compression: Optional[str]
) -> List[tf.Tensor]:
    """All-reduce dense ``tensors`` (Sum or Average) in one group, compressed as asked."""
    module = hvd()
    op = module.Average if average else module.Sum
    if compression != "bf16":
        codec = module.Compression.fp16 if compression == "fp16" else module.Compression.none
        return list(module.grouped_allreduce(list(tensors), op=op, compression=codec))
    floats = [i for i, t in enumerate(tensors) if _is_float(t) and t.dtype != tf.float64]
    others = [i for i in range(len(tensors)) if i not in set(floats)]
    out: List[Optional[tf.Tensor]] = [None] * len(tensors)
    if others:
        reduced = module.grouped_allreduce([tensors[i] for i in others], op=op)
        for i, t in zip(others, reduced):
            out[i] = t
    if floats:
        bits = [
            tf.reshape(tf.bitcast(tf.cast(tensors[i], tf.bfloat16), tf.uint16), [1, -1])
            for i in floats
        ]
        gathered = module.grouped_allgather(bits)
        for i, g in zip(floats, gathered):
            values = tf.cast(tf.bitcast(g, tf.bfloat16), tf.float32)  # [size, n]
            total = tf.reduce_sum(values, axis=0)
            if average:
                total = total / tf.cast(tf.shape(values)[0], tf.float32)
            out[i] = tf.cast(tf.reshape(total, tf.shape(tensors[i])), tensors[i].dtype)
    return out
