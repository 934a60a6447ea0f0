"""One-pass CPU kernels for the dense RAdam step and Lookahead's synchronisation, compiled on
this machine on first use.

Why: XLA:CPU compiles ``radam_math.apply_dense`` into three loops (m, v, then the variable),
48 bytes of memory traffic per float32 parameter where one loop needs 28; on a large model
the step is that traffic. ``radam_kernel.cc`` is the one loop, a TensorFlow custom op
(``RadamDistApplyDense``) that updates var, m, v (and vhat) in place. It is
``radam_math.apply_dense`` operation by operation, compiled without fused multiply-adds, so
its bits are the per-variable path's (``tests/test_native_kernel.py``); ``radam_math`` stays
the one specification of the math. ``RadamDistLookaheadPullBack`` is
``radam_math.lookahead_pull_back`` the same way (16 bytes per parameter, one pass).

How: the source ships in the package; the first step that can use it compiles it with the
C++ compiler (``$CXX``, else ``g++``) against the installed TensorFlow's headers
(``tf.sysconfig``), about 10 s, into a cache keyed by the source, TensorFlow's version, the
compiler and the CPU (``-march=native``): ``$RADAM_DIST_NATIVE_CACHE``, else
``~/.cache/radam_dist/native``. A lock serializes concurrent builders; a SHA-256 recorded
beside the library is checked before every load, and a damaged or cut file is rebuilt.
``python -m radam_dist.native`` builds it ahead of time (``make`` does).

Where there is no compiler or the build fails, one warning says why and the dense steps run
as XLA chunks (``radam_dist.fused``): the same bits, slower. ``RADAM_DIST_NATIVE=0``
switches the kernel off. It serves float32 and float64 variables on CPU devices, outside a
caller's ``jit_compile`` (XLA cannot compile a custom op).
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from radam_dist._env import switched_on
from radam_dist._files import fsync_path, write_atomic

log = logging.getLogger(__name__)

ENV_SWITCH = "RADAM_DIST_NATIVE"
CACHE_ENV = "RADAM_DIST_NATIVE_CACHE"
SOURCE = Path(__file__).with_name("radam_kernel.cc")
LIBRARY_NAME = "radam_kernel.so"
BUILD_TIMEOUT_S = 600

# -ffp-contract=off: no fused multiply-adds (each product rounded, as TF's kernels round it);
# no -ffast-math. -fno-math-errno lets sqrt vectorize (a negative argument cannot occur, and
# would give NaN either way); -march=native: the cache key holds the CPU's flags.
CXX_FLAGS = ("-std=c++17", "-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno",
             "-fPIC", "-shared", "-Wno-deprecated-declarations", "-Wno-interference-size")

# GCC 12+ with -march=native on a CPU with AVX512-FP16 (Sapphire Rapids and later) turns on
# Eigen's AVX512 half-precision packets, whose header TensorFlow ships does not compile with it
# ("expected initializer before '<'" in PacketMathFP16.h). The kernel has no half-precision
# code, so those instructions are switched off wherever the compiler knows the switch.
NO_FP16_FLAG = "-mno-avx512fp16"

SUPPORTED_DTYPES = ("float32", "float64")


class BuildError(RuntimeError):
    """The kernel could not be compiled or loaded; the message says why and what to do."""


_lock = threading.Lock()
_library = None
_failure: Optional[str] = None


def enabled() -> bool:
    """False where the environment switched the kernel off (``RADAM_DIST_NATIVE=0``)."""
    return switched_on(ENV_SWITCH)


def library(switched_on: Optional[bool] = None):
    """The loaded op library, built first if needed; None where it is switched off or cannot
    be built here (logged once, as a warning, with the reason). ``switched_on``: the
    caller's reading of ``RADAM_DIST_NATIVE`` (a step plan's), else the environment's now."""
    global _library, _failure
    if not (enabled() if switched_on is None else switched_on):
        return None
    with _lock:
        if _library is None and _failure is None:
            try:
                _library = _load(build())
            except BuildError as error:
                _failure = str(error)
                log.warning("radam_dist: the one-pass CPU kernel is not available, so dense "
                            "steps run as XLA chunks (the same results, slower): %s. Set %s=0 "
                            "to skip the kernel.", error, ENV_SWITCH)
        return _library


def unavailable_reason() -> Optional[str]:
    """Why ``library()`` returned None in this process, or None."""
    return _failure


def cache_root() -> Path:
    """Where built kernels are kept: ``$RADAM_DIST_NATIVE_CACHE``, else the user's cache."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "radam_dist" / "native"


def build(cache: Optional[Path] = None) -> Path:
    """The path of a verified kernel library for this TensorFlow and CPU, compiled if the
    cache holds none (or a damaged one). Raises BuildError with the compiler's message."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    compiler = _compiler()
    key = _cache_key(tf, compiler)
    folder = (cache or cache_root()) / f"tf{tf.__version__}-{key[:16]}"
    library_path = folder / LIBRARY_NAME
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / ".lock", "a+b") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)  # one builder at a time, across processes
            if _verified(library_path):
                return library_path
            _compile(tf, compiler, library_path)
    except OSError as error:
        raise BuildError(f"cannot write the kernel cache {folder} ({error}); set {CACHE_ENV} "
                         "to a writable folder") from error
    return library_path


def _compiler() -> str:
    name = os.environ.get("CXX", "g++")
    path = shutil.which(name)
    if path is None:
        raise BuildError(f"no C++ compiler {name!r} on PATH (install g++, or set CXX)")
    return path


def _compiler_version(compiler: str) -> str:
    try:
        out = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                             timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError) as error:
        raise BuildError(f"{compiler} --version failed: {error}") from error
    return out.splitlines()[0] if out else compiler


def _cpu_flags() -> str:
    """The CPU's feature flags (``-march=native`` builds for them)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _tf_flags(tf) -> List[str]:
    return list(tf.sysconfig.get_compile_flags()) + list(tf.sysconfig.get_link_flags())


@functools.lru_cache(maxsize=None)
def _cxx_flags(compiler: str) -> Tuple[str, ...]:
    """CXX_FLAGS, plus NO_FP16_FLAG where the CPU has AVX512-FP16 and the compiler knows it."""
    if "avx512_fp16" not in _cpu_flags().split():
        return CXX_FLAGS
    try:
        probe = subprocess.run([compiler, NO_FP16_FLAG, "-x", "c++", "-fsyntax-only", os.devnull],
                               capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return CXX_FLAGS
    return CXX_FLAGS + ((NO_FP16_FLAG,) if probe.returncode == 0 else ())


def _cache_key(tf, compiler: str) -> str:
    digest = hashlib.sha256(SOURCE.read_bytes())
    # The include and library folders name one installation; the rest names the ABI.
    flags = [f for f in _tf_flags(tf) if not f.startswith(("-I", "-L"))]
    for part in [tf.__version__, _compiler_version(compiler), _cpu_flags(), platform.machine(),
                 *_cxx_flags(compiler), *flags]:
        digest.update(b"\0" + part.encode())
    return digest.hexdigest()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _verified(library_path: Path) -> bool:
    """True where the library is there and its bytes match the SHA-256 written beside it."""
    record = library_path.with_suffix(".sha256")
    if not library_path.exists() and not record.exists():
        return False
    try:
        if record.read_text().strip() == _digest(library_path):
            return True
    except (OSError, UnicodeDecodeError):
        pass
    log.warning("radam_dist: the cached kernel %s does not match its recorded SHA-256 "
                "(damaged or cut); rebuilding it", library_path)
    return False


def _compile(tf, compiler: str, library_path: Path) -> None:
    log.info("radam_dist: compiling the one-pass CPU kernel into %s (once per machine and "
             "TensorFlow version)", library_path.parent)
    started = time.monotonic()
    fd, temporary = tempfile.mkstemp(dir=library_path.parent, suffix=".so.partial")
    os.close(fd)
    command = [compiler, *_cxx_flags(compiler), str(SOURCE), "-o", temporary, *_tf_flags(tf)]
    try:
        try:
            done = subprocess.run(command, capture_output=True, text=True,
                                  timeout=BUILD_TIMEOUT_S)
        except (OSError, subprocess.SubprocessError) as error:
            raise BuildError(f"{compiler} did not run: {error}") from error
        if done.returncode != 0:
            raise BuildError(f"{compiler} failed (exit {done.returncode}): "
                             f"{done.stderr.strip()[-2000:]}")
        record = library_path.with_suffix(".sha256")
        record.unlink(missing_ok=True)  # a crash from here on leaves no record: rebuilt
        os.replace(temporary, library_path)
        fsync_path(library_path)
        write_atomic(record, (_digest(library_path) + "\n").encode())
    finally:
        Path(temporary).unlink(missing_ok=True)
    log.info("radam_dist: kernel compiled in %.1f s", time.monotonic() - started)


def _load(library_path: Path):
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    try:
        return tf.load_op_library(str(library_path))
    except (tf.errors.OpError, OSError) as error:
        raise BuildError(f"TensorFlow could not load {library_path}: {error}") from error


# -- the updates -------------------------------------------------------------------------------
def serves(update, device: Optional[str], switched_on: Optional[bool] = None) -> bool:
    """True where the kernel can apply ``update`` (a ``fused.DenseUpdate`` of a variable or of
    a ``radam_math.Rows``): float32 or float64 throughout, on a CPU device, outside an XLA
    computation. Builds the kernel on the first call that needs it. ``switched_on``: as in
    ``library``."""
    others = [update.m, update.v, *_parts(update.grad)] + (
        [update.vhat] if update.vhat is not None else [])
    return _serves(update.var, others, update.scalars.lr.dtype, device, switched_on)


def serves_pull_back(var, slow, device: Optional[str], switched_on: Optional[bool] = None) -> bool:
    """As ``serves``, for Lookahead's synchronisation of ``var`` with ``slow``."""
    return _serves(var, [slow], var.dtype, device, switched_on)


def _serves(var, others: Sequence, compute_dtype, device: Optional[str],
            switched_on: Optional[bool]) -> bool:
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    from radam_dist import radam_math  # pylint: disable=import-outside-toplevel

    if not (enabled() if switched_on is None else switched_on) or radam_math.in_xla_context():
        return False
    dtype = tf.as_dtype(var.dtype)
    if (dtype.name not in SUPPORTED_DTYPES or tf.as_dtype(compute_dtype) != dtype
            or any(tf.as_dtype(t.dtype) != dtype for t in others)):
        return False
    if not _on_cpu(device or _device_of(var)):
        return False
    return library(switched_on) is not None


def _loaded():
    """The library ``serves`` loaded (the updates below run only where it said yes)."""
    if _library is None:
        raise RuntimeError("radam_dist.native: the kernel is not loaded; ask serves() first")
    return _library


def _parts(grad) -> list:
    """The replicas' parts of a gradient whose sum the update computes, or the gradient."""
    return list(grad) if isinstance(grad, (tuple, list)) else [grad]


def _device_of(variable) -> str:
    try:
        return variable.handle.device
    except AttributeError:
        return getattr(variable, "device", "") or ""


def _on_cpu(device: str) -> bool:
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    if device:
        return tf.DeviceSpec.from_string(device).device_type == "CPU"
    return not tf.config.list_logical_devices("GPU")  # unplaced: where TF would place it


def apply_dense(update) -> None:
    """``radam_math.apply_dense`` on one ``fused.DenseUpdate``, by the kernel; call it only
    where ``serves`` said yes. A ``radam_math.Rows`` target (a ZeRO replica's rows, a tensor)
    gets its new value; m, v and vhat are updated in place either way."""
    from radam_dist import radam_math  # pylint: disable=import-outside-toplevel

    s = update.scalars
    slots = (update.m.handle, update.v.handle,
             [update.vhat.handle] if update.vhat is not None else [], _parts(update.grad),
             s.lr, s.weight_decay, s.beta_1, s.one_minus_beta_1, s.beta_2, s.one_minus_beta_2,
             s.m_correction, s.v_correction, s.r_t, s.rectified, s.epsilon)
    if isinstance(update.var, radam_math.Rows):
        update.var.value = _loaded().radam_dist_apply_dense_rows(
            update.var.value, *slots, has_weight_decay=s.has_weight_decay)
        return
    _loaded().radam_dist_apply_dense(update.var.handle, *slots,
                                     has_weight_decay=s.has_weight_decay)


def pull_back(var, slow, alpha) -> None:
    """``radam_math.lookahead_pull_back(var, slow, alpha)`` by the kernel (alpha held as
    float32, as there); call it only where ``serves_pull_back`` said yes."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    from radam_dist import radam_math  # pylint: disable=import-outside-toplevel

    _loaded().radam_dist_lookahead_pull_back(
        var.handle, slow.handle, radam_math.slow_step_size_as(alpha, tf.as_dtype(var.dtype)))
