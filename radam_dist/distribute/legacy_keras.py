"""The former path of ``LegacyRectifiedAdam`` (the tf_keras RAdam), kept for existing imports.

It lives in ``radam_dist.optimizers.legacy_keras``, beside the Keras 3 optimizers; this
module only forwards to it, on first use (no import runs from this package back up to the
optimizers').
"""

import importlib
import warnings

__all__ = ["LegacyRectifiedAdam"]


def __getattr__(name: str):
    if name == "LegacyRectifiedAdam":
        warnings.warn("radam_dist.distribute.legacy_keras moved: import LegacyRectifiedAdam "
                      "from radam_dist.optimizers.legacy_keras", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module("radam_dist.optimizers.legacy_keras"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
