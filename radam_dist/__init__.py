"""radam_dist: RectifiedAdam and Lookahead for Keras 3, from one GPU to many machines.

The public API is what this module exports; see README.md.

Importing radam_dist is cheap: it does not import TensorFlow (so ``radam-ps --help`` answers at
once). The exports load on first use (PEP 562 ``__getattr__``). Keras still finds our optimizers
by name after a plain ``import radam_dist``: ``keras.optimizers.deserialize`` of
``Addons>RectifiedAdam`` / ``Addons>Lookahead`` / ``radam_dist>...`` configs and
``keras.models.load_model`` need them registered before Keras looks them up. So they are
registered right away when Keras is already imported, and otherwise the moment the import of
Keras (and of TensorFlow, which imports Keras half-way through its own import) completes.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
import threading
import warnings

from radam_dist import _requirements

__version__ = "0.1.0"

__all__ = ["EffectiveLearningRate", "Lookahead", "ModelCheckpoint", "RectifiedAdam",
           "__version__"]

_EXPORTS = {
    "EffectiveLearningRate": "radam_dist.callbacks",
    "Lookahead": "radam_dist.optimizers",
    "ModelCheckpoint": "radam_dist.callbacks",
    "RectifiedAdam": "radam_dist.optimizers",
}
_SUBPACKAGES = ("callbacks", "distribute", "horovod", "launch", "optimizers", "ps", "radam_math",
                "fused", "native")

_requirements.require_installed()  # a missing TensorFlow / Keras: one clear error, now


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if name in _SUBPACKAGES:
        return importlib.import_module(f"radam_dist.{name}")
    raise AttributeError(f"module 'radam_dist' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__) | set(_SUBPACKAGES))


# --- Keras registration -------------------------------------------------------------------------

_registered = False
_register_lock = threading.RLock()


def _initializing(module_name: str) -> bool:
    """True while ``module_name`` is being imported (importlib's own "partially initialized")."""
    module = sys.modules.get(module_name)
    spec = getattr(module, "__spec__", None)
    return module is not None and bool(getattr(spec, "_initializing", False))


def _register_with_keras(just_imported: str = "") -> None:
    """Import our optimizers once Keras and TensorFlow are usable: that registers them.

    ``just_imported`` finished executing but importlib still marks it as initializing.
    """
    global _registered
    with _register_lock:
        if _registered or any(_initializing(name) for name in ("keras", "tensorflow")
                              if name != just_imported):
            return
        importlib.import_module("radam_dist.optimizers")  # registers on import
        _registered = True


class _AfterImport:  # a sys.meta_path finder (importlib.abc would cost 16 ms of imports)
    """Runs _register_with_keras after ``keras`` or ``tensorflow`` finishes importing.

    It finds nothing itself: it asks the other finders, then wraps the module's loader.
    """

    WATCHED = ("keras", "tensorflow")

    def __init__(self):
        self._searching = threading.local()

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.WATCHED or getattr(self._searching, "active", False):
            return None
        self._searching.active = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._searching.active = False
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _RegisteringLoader(spec.loader)
        return spec


class _RegisteringLoader:  # an importlib loader
    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):  # get_resource_reader, is_package, get_code, ...
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        module.__spec__.loader = module.__loader__ = self._loader  # hide the wrapper afterwards
        _after_import(module.__name__)


def _after_import(name: str) -> None:
    try:
        _register_with_keras(just_imported=name)
    except ImportError as err:  # too old a TensorFlow / Keras: say so, but keep `import keras` working
        warnings.warn(f"radam_dist's optimizers are not registered with Keras: {err}",
                      RuntimeWarning, stacklevel=2)
    except Exception as err:  # never break someone's `import keras`, but say why load_model will fail
        logging.getLogger(__name__).debug("registering radam_dist with Keras failed", exc_info=True)
        warnings.warn(f"radam_dist's optimizers are not registered with Keras "
                      f"({type(err).__name__}: {err}); `import radam_dist.optimizers` shows the "
                      f"whole error", RuntimeWarning, stacklevel=2)
    if _registered:
        _uninstall_hook()


def _uninstall_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _AfterImport)]


if "keras" in sys.modules and not _initializing("keras") and not _initializing("tensorflow"):
    _register_with_keras()
elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _AfterImport())
