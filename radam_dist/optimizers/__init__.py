"""Keras 3 optimizers: RectifiedAdam and the Lookahead wrapper."""

from radam_dist._requirements import require_tensorflow_keras

require_tensorflow_keras()  # too old a TensorFlow / Keras: one clear error first

from radam_dist.optimizers.lookahead import Lookahead  # noqa: E402
from radam_dist.optimizers.rectified_adam import RectifiedAdam  # noqa: E402

__all__ = ["Lookahead", "RectifiedAdam"]
