"""Import ``horovod.tensorflow`` once, with an error that says how to get it."""

from __future__ import annotations

import functools
from types import ModuleType


@functools.lru_cache(maxsize=None)
def hvd() -> ModuleType:
    """``horovod.tensorflow``; raises ImportError naming the build recipe if it is missing."""
    try:
        import horovod.tensorflow as module
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "radam_dist.horovod needs Horovod built with TensorFlow (no wheel exists for "
            "TF 2.21): run `make horovod` or deploy/horovod/build_horovod.sh "
            f"(see docs/HOROVOD.md). Original error: {exc}"
        ) from exc
    return module


def require_initialized() -> ModuleType:
    """``horovod.tensorflow`` after checking that ``hvd.init()`` was called."""
    module = hvd()
    if not module.is_initialized():
        raise RuntimeError(
            "Horovod is not initialized: call `hvd.init()` (import horovod.tensorflow as hvd) "
            "at the start of the training script, before building the model"
        )
    return module
