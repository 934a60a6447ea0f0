"""Which state layout an optimizer's strategy gets: the step plan's choice of where m, v,
vhat and the slow weights live.

Why a module of its own: the layouts (``state_layout.Replicated``, ``pss.ParameterServerSharded``,
``zero.ReplicaSharded``) build on the base class in ``state_layout.py``; the choice among
them sits above all three, so no layout module imports another one back.
"""

from __future__ import annotations

import tensorflow as tf

from radam_dist.distribute import pss, zero
from radam_dist.distribute.state_layout import Replicated, StateLayout


def for_strategy(strategy, shard_state: bool) -> StateLayout:
    """The layout for an optimizer made under ``strategy``.

    ``shard_state`` asks for ZeRO-1: honoured under MirroredStrategy / MWMS (also with one
    replica), refused under ParameterServerStrategy, and without a strategy it is the
    replicated layout (one device holds the whole state either way), so a sharded optimizer
    and its saved files work in a plain process too.
    """
    if isinstance(strategy, tf.distribute.experimental.ParameterServerStrategy):
        if shard_state:
            raise ValueError(
                "shard_optimizer_state=True is for MirroredStrategy / "
                "MultiWorkerMirroredStrategy; under ParameterServerStrategy give the strategy a "
                "variable_partitioner instead (the slots are then sharded with their variables "
                "over the parameter servers)"
            )
        return pss.ParameterServerSharded()
    if shard_state and zero.supports(strategy):
        return zero.ReplicaSharded()
    return Replicated()
