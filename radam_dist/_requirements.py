"""What radam_dist needs at run time, checked once, with one error that says what to install.

pyproject.toml declares the same floors (tests/test_packaging.py keeps the two in step). No
TensorFlow distribution is a dependency of the package (tensorflow, tensorflow-cpu,
tensorflow[and-cuda] are all fine), so a missing or too old one is reported here instead of by pip.
"""

from __future__ import annotations

import importlib.util
import re
from typing import Tuple

# Lowest versions the test suite passes on (README "Supported versions" says how they were found).
MIN_TENSORFLOW = "2.21"
MIN_KERAS = "3.9.2"  # 3.8.0 fails a core test (LossScaleOptimizer inside Lookahead), 3.7.0 three
MIN_GRPCIO = "1.85.1"  # the generated stubs refuse older grpcio (they are built with grpcio-tools 1.85.1)
MIN_PROTOBUF = "7.35.1"  # protobuf gencode 7.35.1 needs a 7.x runtime at least this new
MAX_PROTOBUF_MAJOR = 7

INSTALL_TF = ("pip install 'radam-dist[cpu]' (tensorflow-cpu) or 'radam-dist[gpu]' "
              "(tensorflow[and-cuda]), or any TensorFlow distribution >= " + MIN_TENSORFLOW)
INSTALL_PS = "pip install 'radam-dist[ps]'"


def _version_tuple(version: str) -> Tuple[int, ...]:
    """'2.21.0rc1' -> (2, 21, 0); enough for floors (pre-releases count as their release)."""
    parts = []
    for piece in version.split(".")[:3]:
        match = re.match(r"\d+", piece)
        parts.append(int(match.group()) if match else 0)
    return tuple(parts)


def at_least(version: str, floor: str) -> bool:
    return _version_tuple(version) >= _version_tuple(floor)


def require_installed() -> None:
    """Cheap (no import): TensorFlow and Keras must at least be installed."""
    missing = [name for name in ("tensorflow", "keras") if importlib.util.find_spec(name) is None]
    if "tensorflow" in missing:
        raise ImportError(f"radam_dist needs TensorFlow, which is not installed: {INSTALL_TF}")
    if missing:
        raise ImportError(f"radam_dist needs Keras >= {MIN_KERAS}, which is not installed: "
                          f"pip install 'keras>={MIN_KERAS}'")


def require_tensorflow_keras() -> None:
    """Import TensorFlow and Keras and refuse versions older than the tested floors."""
    require_installed()
    import tensorflow as tf
    import keras

    tf_version = getattr(tf, "__version__", "0")
    if not at_least(tf_version, MIN_TENSORFLOW):
        raise ImportError(
            f"radam_dist needs TensorFlow >= {MIN_TENSORFLOW}; this environment has {tf_version}: "
            f"{INSTALL_TF}")
    keras_version = getattr(keras, "__version__", "0")
    if not at_least(keras_version, MIN_KERAS) or _version_tuple(keras_version)[0] != 3:
        raise ImportError(
            f"radam_dist needs Keras 3 >= {MIN_KERAS}; this environment has Keras {keras_version}: "
            f"pip install 'keras>={MIN_KERAS},<4'")


def require_grpc() -> None:
    """The parameter server: grpcio, grpcio-health-checking and protobuf new enough for our stubs."""
    for module, dist in (("grpc", "grpcio"), ("grpc_health", "grpcio-health-checking"),
                         ("google.protobuf", "protobuf"), ("prometheus_client", "prometheus-client")):
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # the parent package (google) is missing
            found = False
        if not found:
            raise ImportError(f"the radam_dist parameter server needs {dist}, which is not "
                              f"installed: {INSTALL_PS}")
    import grpc
    from google import protobuf

    if not at_least(grpc.__version__, MIN_GRPCIO):
        raise ImportError(f"the radam_dist parameter server needs grpcio >= {MIN_GRPCIO}; this "
                          f"environment has {grpc.__version__}: {INSTALL_PS}")
    pb_version = protobuf.__version__
    if not at_least(pb_version, MIN_PROTOBUF) or _version_tuple(pb_version)[0] > MAX_PROTOBUF_MAJOR:
        raise ImportError(
            f"the radam_dist parameter server needs protobuf >= {MIN_PROTOBUF}, < "
            f"{MAX_PROTOBUF_MAJOR + 1}; this environment has {pb_version}: {INSTALL_PS}")
