"""``broadcast_state``: make every rank start from rank ``root_rank``'s model and optimizer.

``hvd.broadcast_variables`` raises on Keras 3 variables (``'Variable' object has no attribute
'ref'``); we broadcast the tf.Variables underneath them (``keras.Variable.value``). The
optimizer's slots are created first when they do not exist yet, so the whole state travels:
the step counter, the learning rate variable, m, v, vhat, Lookahead's slow weights and
DistributedOptimizer's gradient accumulators.

Before anything is assigned the ranks compare a fingerprint of the variable list (count,
shapes, dtypes); a mismatch raises ValueError on every rank and changes nothing, instead of
Horovod waiting forever for a tensor one rank never sends.
"""

from __future__ import annotations

import hashlib
import logging
from typing import List, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from radam_dist.horovod._hvd import require_initialized

logger = logging.getLogger(__name__)


def _tf_variable(var) -> tf.Variable:
    return var.value if isinstance(var, keras.Variable) else var


def state_variables(model: keras.Model, optimizer=None) -> List[tf.Variable]:
    """The model's variables then the optimizer's, as tf.Variables, without duplicates.

    Builds ``optimizer`` on the model's trainable variables when it has no slots yet.
    """
    if optimizer is not None and not optimizer.built:
        if not model.built:
            raise ValueError(
                "broadcast_state needs a built model (call it on data or model.build(shape) "
                "first) so that the optimizer's slots can be created"
            )
        optimizer.build(model.trainable_variables)
    found, seen = [], set()
    sources = list(model.variables) + (list(optimizer.variables) if optimizer is not None else [])
    for var in sources:
        tf_var = _tf_variable(var)
        if id(tf_var) not in seen:
            seen.add(id(tf_var))
            found.append(tf_var)
    return found


def _fingerprint(variables: Sequence[tf.Variable]) -> int:
    text = ";".join(f"{tuple(v.shape)}:{v.dtype.name}" for v in variables)
    digest = hashlib.sha256(f"{len(variables)}|{text}".encode()).digest()
    return int.from_bytes(digest[:7], "little")  # fits in int64


def _check_same_layout(hvd, variables: Sequence[tf.Variable]) -> None:
    mine = _fingerprint(variables)
    gathered = hvd.allgather(
        tf.constant([[mine, len(variables)]], tf.int64), name="radam_dist.broadcast.layout"
    ).numpy()
    if np.any(gathered[:, 0] != mine):
        counts = ", ".join(f"rank {r}: {int(n)}" for r, n in enumerate(gathered[:, 1]))
        raise ValueError(
            "broadcast_state: the ranks hold different variables (count, shapes or dtypes "
            f"differ; variable counts {counts}). Build the same model and optimizer on every "
            "rank. Nothing was changed."
        )


def broadcast_state(
    model: keras.Model, optimizer: Optional[keras.optimizers.Optimizer] = None, root_rank: int = 0
) -> int:
    """Copy rank ``root_rank``'s model variables and optimizer state to every rank.

    Call it on every rank after building the model (and after loading a checkpoint on the
    root rank). ``optimizer`` defaults to ``model.optimizer``. Returns the number of
    variables broadcast.
    """
    hvd = require_initialized()
    if isinstance(root_rank, bool) or not 0 <= int(root_rank) < hvd.size():
        raise ValueError(f"root_rank must be in [0, {hvd.size()}), got {root_rank!r}")
    if optimizer is None:
        optimizer = getattr(model, "optimizer", None)
    variables = state_variables(model, optimizer)
    if hvd.size() == 1 or not variables:
        return len(variables)
    _check_same_layout(hvd, variables)
    _broadcast(hvd, variables, int(root_rank))
    logger.info("broadcast %d variables from rank %d", len(variables), root_rank)
    return len(variables)


def _broadcast(hvd, variables: Sequence[tf.Variable], root_rank: int) -> None:
    @tf.function(autograph=False)
    def run():
        received = [
            hvd.broadcast(v, root_rank, name=f"radam_dist.broadcast.{i}")
            for i, v in enumerate(variables)
        ]
        # Assign only once every value has arrived: a failed broadcast changes nothing.
        with tf.control_dependencies(received):
            return [v.assign(r) for v, r in zip(variables, received)]

    run()
