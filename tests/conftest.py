"""Session setup shared by all tests: quiet TensorFlow and two logical CPU devices.

The two logical devices let MirroredStrategy tests run in-process; everything else
runs on the first device as usual. Device configuration must happen before TensorFlow
initialises its devices, hence at import time here.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

_cpus = tf.config.list_physical_devices("CPU")
try:
    tf.config.set_logical_device_configuration(
        _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
    )
except RuntimeError:  # devices already initialised by an earlier import
    pass
