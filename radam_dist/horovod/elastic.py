"""Elastic Horovod (``horovodrun --min-np/--max-np --host-discovery-script``) under Keras 3.

Horovod 0.28.1's elastic pieces do not work with Keras 3 or with our wrapper:

* ``hvd.elastic.TensorFlowKerasState`` / ``KerasState`` call ``optimizer.variables()``
  (a list property in Keras 3) and assign to symbolic tensors;
* ``hvd.elastic.run`` translates only errors naming ``HorovodAllreduce``,
  ``HorovodAllgather`` or ``HorovodBroadcast`` into a recovery; a dead peer seen by a
  *grouped* all-reduce (``HorovodGroupedAllreduce``, what DistributedOptimizer uses) makes
  the wrapped function return ``None`` silently, and nothing is restored;
* a step function traced at one size keeps that size's graph (``DistributedOptimizer``
  skips the all-reduce when traced at size 1), so a job that grows hangs;
* its Keras epoch callback adds ``initial_epoch`` to Keras' already absolute epoch.

This module replaces them::

    from radam_dist.horovod import elastic

    hvd.init()
    model = make_model(); opt = DistributedOptimizer(RectifiedAdam(1e-3))
    state = elastic.KerasState(model, opt, step=0)      # builds the optimizer's slots

    @elastic.function
    def train_step(x, y): ...                          # re-traced after every reset

    @elastic.run
    def train(state):
        while state.step < total_steps:
            train_step(*batch(state.step, hvd.rank(), hvd.size()))
            state.step += 1
            if state.step % commit_every == 0:
                state.commit()

    train(state)

A failure on any rank makes every survivor restore the last commit, re-initialise Horovod
with the new set of workers, copy rank 0's state to every rank (new workers included) and
call ``train`` again. ``model.fit``: pass ``CommitState(state)`` and
``initial_epoch=state.epoch`` (see docs/HOROVOD.md).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import time
from typing import Callable, List, Optional

import keras
import numpy as np
import tensorflow as tf

from radam_dist.horovod._hvd import hvd, require_initialized
from radam_dist.horovod.broadcast import broadcast_state, state_variables

hvd()  # a clear ImportError naming the build recipe when Horovod is missing
from horovod.common.elastic import ObjectState, run_fn  # noqa: E402
from horovod.common.exceptions import HorovodInternalError, HostsUpdatedInterrupt  # noqa: E402

logger = logging.getLogger(__name__)

__all__ = [
    "CommitState",
    "HorovodInternalError",
    "HostsUpdatedInterrupt",
    "KerasState",
    "function",
    "generation",
    "is_collective_failure",
    "run",
]

# Every Horovod TensorFlow op is registered as Horovod<Something> (HorovodAllreduce,
# HorovodGroupedAllreduce, HorovodAllgather, HorovodGroupedAllgather, HorovodBroadcast,
# HorovodAlltoall, HorovodReducescatter, HorovodJoin, ...); a failed one names itself in the
# error. "Horovod has been shut down" is what every later collective says.
_HOROVOD_OP = re.compile(r"\bHorovod[A-Z][A-Za-z]*")
_HOROVOD_FAILURE = re.compile(_HOROVOD_OP.pattern + r"|Horovod has been shut down")

_generation = 0
_RESERVED = frozenset({"model", "optimizer", "variables", "restores", "syncs", "commit", "save",
                       "restore", "sync", "reset", "on_reset", "check_host_updates"})


def generation() -> int:
    """How many resets this process went through (0 before the first)."""
    return _generation


def is_collective_failure(error: BaseException) -> bool:
    """True when ``error`` is a TensorFlow op error raised by a Horovod collective."""
    return isinstance(error, tf.errors.OpError) and bool(
        _HOROVOD_FAILURE.search(str(getattr(error, "message", "")) or str(error))
    )


@contextlib.contextmanager
def _collective_failures_as_internal_errors():
    try:
        yield
    except tf.errors.OpError as exc:
        if is_collective_failure(exc):
            op = _HOROVOD_OP.search(str(exc))
            logger.warning("Horovod collective failed (%s in %s); recovering from the last commit",
                           type(exc).__name__, op.group(0) if op else "a Horovod op")
            raise HorovodInternalError(exc) from exc
        raise


def _reset() -> None:
    """Between two attempts: a fresh Horovod context over the workers that are left/added."""
    global _generation
    module = hvd()
    module.shutdown()
    module.init()
    _generation += 1
    logger.info("horovod re-initialised: rank %d of %d (reset %d)", module.rank(),
                module.size(), _generation)


def run(func: Callable) -> Callable:
    """Like ``hvd.elastic.run``, for any Horovod collective failure.

    ``func(state, *args, **kwargs)`` runs until it returns. When a collective fails (a worker
    died: any op error naming a Horovod op, grouped ones included), the state is restored to
    its last commit; when hosts were added or removed (``state.commit()`` raised
    ``HostsUpdatedInterrupt``) it keeps its current, just committed values. Then Horovod is
    re-initialised, ``state``'s reset callbacks run, rank 0's state is copied to every rank
    and ``func`` is called again. Other errors propagate unchanged; nothing is swallowed.
    """

    @functools.wraps(func)
    def translated(state, *args, **kwargs):
        with _collective_failures_as_internal_errors():
            return func(state, *args, **kwargs)

    return run_fn(translated, _reset)


class _ElasticFunction:
    """A ``tf.function`` that is traced afresh after each reset (new size, new ranks)."""

    def __init__(self, fn: Callable, tf_function_kwargs: dict):
        self._fn = fn
        self._kwargs = tf_function_kwargs
        self._traced = None
        self._key = None
        functools.update_wrapper(self, fn)

    def __call__(self, *args, **kwargs):
        key = (_generation, require_initialized().size())
        if self._traced is None or key != self._key:
            self._traced = tf.function(self._fn, **self._kwargs)
            self._key = key
        return self._traced(*args, **kwargs)


def function(fn: Optional[Callable] = None, **tf_function_kwargs):
    """``tf.function`` for elastic jobs: re-traced whenever Horovod was reset or resized.

    Use it (or a plain Python function) for custom training steps: a graph traced at one
    size bakes that size in (DistributedOptimizer skips the all-reduce when traced at size
    1), so after the job grew, an old graph would never all-reduce while the new rank does.
    """
    if fn is None:
        return lambda f: _ElasticFunction(f, tf_function_kwargs)
    return _ElasticFunction(fn, tf_function_kwargs)


class KerasState(ObjectState):
    """The elastic state of a Keras 3 model and its optimizer, plus plain Python values.

    Committed, restored and synced: every model variable (trainable or not) and the whole
    optimizer state as it lists it in ``optimizer.variables`` (iterations, learning rate,
    m, v, vhat, Lookahead's slow weights, DistributedOptimizer's accumulators), bit for bit;
    and the keyword arguments (``epoch=0, step=0``), readable and writable as attributes.

    * ``commit()``: copy the values to host memory (then check for added/removed hosts);
    * ``restore()``: put the last commit back (after a failure);
    * ``sync()``: copy rank 0's values to every rank (after a reset, for new workers too).

    The model must be built; the optimizer's slots are created here if needed, so that a
    worker that joins later holds the same variables.
    """

    def __init__(self, model: keras.Model, optimizer: Optional[keras.optimizers.Optimizer] = None,
                 **kwargs):
        module = hvd()
        clash = sorted(set(kwargs) & _RESERVED)
        if clash:
            raise ValueError(f"KerasState: {clash} are taken by the state itself; rename them")
        optimizer = optimizer if optimizer is not None else getattr(model, "optimizer", None)
        if optimizer is None:
            raise ValueError(
                "KerasState needs the optimizer: pass it or compile the model first"
            )
        self.model = model
        self.optimizer = optimizer
        self._variables: List[tf.Variable] = state_variables(model, optimizer)
        self._values = self._snapshot()
        self.restores = 0
        self.syncs = 0
        super().__init__(bcast_object=module.broadcast_object, get_rank=module.rank, **kwargs)

    @property
    def variables(self) -> List[tf.Variable]:
        """The tf.Variables this state commits (model's, then optimizer's)."""
        return list(self._variables)

    def _snapshot(self) -> List[np.ndarray]:
        return [np.array(v.numpy(), copy=True) for v in self._variables]

    def save(self) -> None:
        self._values = self._snapshot()
        super().save()

    def restore(self) -> None:
        for var, value in zip(self._variables, self._values):
            var.assign(value)
        super().restore()
        self.restores += 1

    def sync(self) -> None:
        with _collective_failures_as_internal_errors():
            broadcast_state(self.model, self.optimizer, root_rank=0)
            super().sync()
        self._values = self._snapshot()
        self.syncs += 1

    def reset(self) -> None:
        """After Horovod was re-initialised: drop Keras' traced train/test/predict functions
        so that ``fit`` traces them again at the new size."""
        for name in ("train_function", "test_function", "predict_function"):
            if hasattr(self.model, name):
                setattr(self.model, name, None)


class CommitState(keras.callbacks.Callback):
    """For ``model.fit`` in an elastic ``run``: commit at the end of every epoch.

    Sets ``state.epoch`` to the number of finished epochs (Keras passes the absolute epoch
    index, ``initial_epoch`` included) before committing, so the next attempt is
    ``model.fit(..., initial_epoch=state.epoch)`` and no epoch is repeated or skipped. A
    failure mid-epoch repeats that epoch from its start (the last commit); with
    ``epochs_per_commit=k`` only every k-th epoch end commits, trading work lost on a failure
    for commit time (added hosts are then also noticed only at those commits). Records
    ``state.last_commit_seconds``. The state must have been created with ``epoch=0``.
    """

    def __init__(self, state: KerasState, epochs_per_commit: int = 1):
        super().__init__()
        if isinstance(epochs_per_commit, bool) or int(epochs_per_commit) != epochs_per_commit \
                or epochs_per_commit < 1:
            raise ValueError(
                f"epochs_per_commit must be a positive integer, got {epochs_per_commit!r}"
            )
        if not isinstance(state, KerasState) or "epoch" not in state._saved_state:
            raise ValueError(
                "CommitState needs a KerasState created with an epoch counter: "
                "KerasState(model, optimizer, epoch=0)"
            )
        self.state = state
        self.epochs_per_commit = int(epochs_per_commit)

    def on_epoch_end(self, epoch, logs=None):
        done = int(epoch) + 1
        if done % self.epochs_per_commit:
            return
        self.state.epoch = done
        start = time.monotonic()
        self.state.commit()
        self.state.last_commit_seconds = time.monotonic() - start
