"""Distinct collective keys for every MirroredStrategy / MultiWorkerMirroredStrategy object.

TensorFlow numbers the collective groups and instances of every strategy object from the same
starting key (``_collective_key_base`` is a class attribute, 0). The collective executor
remembers an instance key across strategy objects, so a second strategy in one process (a
notebook, a sweep, one pytest run) that issues a different collective under a key the first
one used fails: ``InternalError: Collective instance 106 expected type 0 and data_type 1 but
got type 2 and data_type 3`` (or "Shape mismatch in the collective instance 100",
tensorflow/tensorflow#62790). TensorFlow's own tests step ``_collective_key_base`` by 100000
per strategy (tensorflow/python/distribute/strategy_combinations.py).

``install()`` does the same for user code: every strategy object created after it gets its own
base (an instance attribute shadowing the class's 0), so its group keys, and with them its
instance keys, are its own. Bases are handed out in creation order; under MWMS every worker
process runs the same script, creates its strategies in the same order and so agrees on the
keys. Installed when radam_dist's optimizers are imported; strategies created before that keep
TensorFlow's base 0, which no later strategy reuses.

Why a patch of ``__init__``: TensorFlow offers no hook. The base is read from the strategy
object while its own ``__init__`` builds the extended object's ``CollectiveKeys`` (before
``__init__`` returns, so it cannot be set afterwards), the strategies are made by user code
(we cannot hand out a subclass), and a class attribute set around each creation would race
between threads. ``__init__`` is the one place left; the wrapper only sets the attribute and
calls TensorFlow's own.
"""

from __future__ import annotations

import functools
import itertools
import threading

# Far above the group keys one strategy uses (one per device set), as in TF's own tests.
KEY_BASE_STRIDE = 100_000

# MWMS bases count in a range of their own: they must agree across worker processes, so a
# MirroredStrategy that only one worker makes (a chief-only evaluation, say) must not shift them.
MWMS_KEY_BASE_START = 10_000 * KEY_BASE_STRIDE  # group keys are int32: room for ~11,000 MWMS

_lock = threading.Lock()
_counters = {"mirrored": itertools.count(1), "multi_worker": itertools.count(0)}
_installed = False


def _strategy_classes() -> list:
    import tensorflow as tf  # here: this module is imported while TensorFlow may be importing

    return [tf.distribute.MirroredStrategy, tf.distribute.MultiWorkerMirroredStrategy]


def next_key_base(multi_worker: bool = False) -> int:
    """A collective key base no other strategy of this process has.

    ``multi_worker``: for a MultiWorkerMirroredStrategy, whose n-th base is the same in every
    worker that makes its MWMS objects in the same order, whatever else it makes.
    """
    with _lock:
        if multi_worker:
            return MWMS_KEY_BASE_START + next(_counters["multi_worker"]) * KEY_BASE_STRIDE
        return next(_counters["mirrored"]) * KEY_BASE_STRIDE


def _enable_collective_ops_once() -> None:
    """A second MWMS object must not re-enable collective ops on the running server.

    Every MultiWorkerMirroredStrategy object calls ``context().enable_collective_ops`` with the
    same ServerDef; on a context that already has its server, TensorFlow then updates the
    server in place, which drops collective requests that a faster worker has already sent
    for the new strategy's first group: both workers then wait forever in the first variable
    broadcast (seen here about every second run with several MWMS objects per process). With
    an identical ServerDef there is nothing to update, so the call is skipped; any other
    ServerDef still goes to TensorFlow.
    """
    from tensorflow.python.eager import context

    original = context.Context.enable_collective_ops

    @functools.wraps(original)
    def enable_collective_ops(self, server_def):
        if server_def is not None and getattr(self, "_collective_ops_server_def", None) == server_def:
            return
        return original(self, server_def)

    context.Context.enable_collective_ops = enable_collective_ops


def install() -> None:
    """Give each MirroredStrategy / MWMS created from now on its own collective key base."""
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
    _enable_collective_ops_once()
    mirrored, multi_worker = _strategy_classes()
    for cls in (mirrored, multi_worker):
        original = cls.__init__

        @functools.wraps(original)
        def __init__(self, *args, __original=original, __multi_worker=cls is multi_worker,
                     **kwargs):
            # Read by the strategy's extended object while __init__ builds its CollectiveKeys.
            self._collective_key_base = next_key_base(__multi_worker)
            __original(self, *args, **kwargs)

        cls.__init__ = __init__
