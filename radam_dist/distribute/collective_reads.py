"""Every worker must read: a handshake before each collective read of ZeRO-1 state under MWMS.

Under MultiWorkerMirroredStrategy the whole ZeRO-1 state (``shard_optimizer_state=True``) is
spread over the workers, so reading it (``model.save``, ``save_weights``, Keras'
``ModelCheckpoint``, ``tf.train.Checkpoint``, ``get_weights``, ``get_slot``) is a collective
that every worker must issue in the same order. The usual Keras pattern of saving on the chief
only used to kill both workers at the first save with TensorFlow's ``Collective instance 600
expected type 0 and data_type 1 but got type 2 and data_type 3`` (the chief's gather met the
other worker's next training all-reduce).

Before each such read, each worker now posts "read #c" in the coordination service's
key-value store (which MWMS starts) and waits for every other worker's "read #c". If a worker
does not arrive within ``RADAM_DIST_ZERO_READ_TIMEOUT`` seconds (default 30), or has exited,
the waiting worker raises ``EveryWorkerMustSave`` and posts the refusal; a watchdog thread on
every worker (started with the sharded state) sees it within a second and aborts that
worker's collectives with the same message, so the training step it is blocked in fails
with it. Nothing is exchanged by collectives until every worker has arrived.

Reads traced inside a ``tf.function`` are not coordinated (they run at trace time only).
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from typing import List, Optional, Tuple

import tensorflow as tf
from tensorflow.python.eager import context

from radam_dist import _env

TIMEOUT_ENV = "RADAM_DIST_ZERO_READ_TIMEOUT"
DEFAULT_TIMEOUT_S = 30.0
_PREFIX = "radam_dist/zero_read"
_REFUSED = f"{_PREFIX}/refused"
_POLL_MS = 500

_log = logging.getLogger(__name__)
_lock = threading.Lock()
_count = 0
_watchdog: Optional["_Watchdog"] = None
_me: Optional[str] = None
_peers: List[str] = []


class EveryWorkerMustSave(RuntimeError):
    """A collective read of ZeRO-1 state under MWMS that not every worker made."""


def message(me: str, missing: str, why: str, timeout: float) -> str:
    return (
        f"shard_optimizer_state=True under MultiWorkerMirroredStrategy: every worker must "
        f"save. The optimizer state is sharded over the workers, so model.save / save_weights "
        f"/ ModelCheckpoint / tf.train.Checkpoint / get_weights / get_slot gather it with "
        f"collectives that every worker must call, in the same order; {me} started one, "
        f"{missing} {why}. Use radam_dist.callbacks.ModelCheckpoint on every worker (the chief "
        f"writes the file, the others a scratch copy they delete), or call the save on every "
        f"worker, the non-chief ones to a temporary path. (Workers that reach the save more "
        f"than {timeout:g} s apart: raise {TIMEOUT_ENV}.)"
    )


def timeout_s() -> float:
    """How long a worker waits for the others to join a read (``$RADAM_DIST_ZERO_READ_TIMEOUT``)."""
    return _env.seconds(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)


def _tasks(strategy) -> Tuple[str, List[str]]:
    """(this task, every task that takes part in the collectives) as 'job-index' names."""
    resolver = strategy.cluster_resolver
    spec = resolver.cluster_spec().as_dict()
    tasks = []
    for job in ("chief", "worker"):
        entries = spec.get(job) or []  # a list of addresses, or {index: address}
        indices = sorted(entries) if isinstance(entries, dict) else range(len(entries))
        tasks += [f"{job}-{i}" for i in indices]
    return f"{resolver.task_type}-{int(resolver.task_id)}", tasks


def _coordinated(strategy) -> bool:
    return (strategy.extended._in_multi_worker_mode() and tf.executing_eagerly()
            and context.context().coordination_service is not None)


def _try_get(key: str, timeout_ms: int) -> Optional[str]:
    try:
        return context.context().get_config_key_value(key, timeout_ms)
    except (tf.errors.DeadlineExceededError, tf.errors.NotFoundError):
        return None


def _refuse(text: str) -> None:
    try:
        context.context().set_config_key_value(_REFUSED, text)
    except tf.errors.OpError:  # already refused by another worker
        pass
    # give the other workers' watchdogs time to read it before this process goes away
    time.sleep(2 * _POLL_MS / 1000)


def before_read(strategy, what: str = "the optimizer state") -> None:
    """Wait until every worker starts this collective read (see the module docstring)."""
    global _count
    if not _coordinated(strategy):
        return
    start_watchdog(strategy)
    me, tasks = _tasks(strategy)
    limit = timeout_s()
    with _lock:
        _count += 1
        number = _count
    ctx = context.context()
    ctx.set_config_key_value(f"{_PREFIX}/{number}/{me}", what)
    if number > 2:  # every worker has passed read number - 2: nobody waits for that key
        try:
            ctx.delete_config_key_value(f"{_PREFIX}/{number - 2}/{me}")
        except tf.errors.OpError:
            pass
    deadline = time.monotonic() + limit
    for task in tasks:
        if task == me:
            continue
        while _try_get(f"{_PREFIX}/{number}/{task}", _POLL_MS) is None:
            refused = _try_get(_REFUSED, 1)
            if refused is not None:
                raise EveryWorkerMustSave(refused)
            exited = _try_get(f"{_PREFIX}/exited/{task}", 1)
            if exited is not None or time.monotonic() > deadline:
                why = (f"finished without it (after {exited} such reads)" if exited is not None
                       else f"did not join it within {limit:g} s (it went on training, or "
                            f"saves on the chief only)")
                text = message(me, task, why, limit)
                _refuse(text)
                raise EveryWorkerMustSave(text)


class _Watchdog(threading.Thread):
    """Aborts this worker's collectives (with the refusal's message) once a worker refuses."""

    def __init__(self):
        super().__init__(name="radam_dist-zero-read-watchdog", daemon=True)
        self.stop = threading.Event()

    def run(self):
        ctx = context.context()
        while not self.stop.is_set():
            try:
                text = ctx.get_config_key_value(_REFUSED, _POLL_MS)
            except (tf.errors.DeadlineExceededError, tf.errors.NotFoundError):
                continue
            except Exception:  # the service went away (shutdown): nothing more to watch
                return
            if self.stop.is_set():
                return
            _log.error("%s", text)
            try:
                ctx.abort_collective_ops(tf.errors.FAILED_PRECONDITION, text)
            except Exception:  # pragma: no cover - the context is going away
                pass
            return


def start_watchdog(strategy) -> None:
    """Start the watchdog once per process (ZeRO-1 under MWMS, eager)."""
    global _watchdog, _me, _peers
    if not _coordinated(strategy):
        return
    with _lock:
        if _watchdog is not None:
            return
        _me, tasks = _tasks(strategy)
        _peers = [task for task in tasks if task != _me]
        _watchdog = _Watchdog()
        _watchdog.start()
    atexit.register(_at_exit)


_EXIT_WAIT_S = 5.0


def _peer_started_a_read_we_skip(limit: float) -> bool:
    """True once a peer has posted read number ``_count + 1``; False when every peer has
    exited first, or after ``limit`` seconds."""
    pending = set(_peers)
    deadline = time.monotonic() + limit
    while pending:
        for task in sorted(pending):
            if _try_get(f"{_PREFIX}/{_count + 1}/{task}", 1) is not None:
                return True
            if _try_get(f"{_PREFIX}/exited/{task}", 1) is not None:
                pending.discard(task)
        if not pending or time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return False


def _at_exit() -> None:
    """Say this worker made its last read (a peer waiting for it refuses at once), and stop
    the watchdog before TensorFlow tears the context down."""
    watchdog = _watchdog
    if watchdog is None:
        return
    watchdog.stop.set()
    ctx = context.context()
    try:
        ctx.set_config_key_value(f"{_PREFIX}/exited/{_me}", str(_count))
        # A peer that starts a read this worker never makes (a chief-only save after fit)
        # refuses at once now; say so here too. The workers end fit together, so wait (a few
        # seconds at most) until every peer has either exited or started such a read.
        if _peer_started_a_read_we_skip(min(_EXIT_WAIT_S, timeout_s())):
            text = _try_get(_REFUSED, 5000) or message(
                _me, "this worker", "finished without it", timeout_s())
            _log.error("%s", text)
    except Exception:
        pass
    watchdog.join(timeout=2 * _POLL_MS / 1000 + 1)
