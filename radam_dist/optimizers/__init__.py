"""Keras 3 optimizers: RectifiedAdam and the Lookahead wrapper."""

from radam_dist._requirements import require_tensorflow_keras

require_tensorflow_keras()  # too old a TensorFlow / Keras: one clear error first

from radam_dist.distribute import collective_keys  # noqa: E402

# Every MirroredStrategy / MWMS made from now on gets collective keys of its own, so several
# strategy objects can live in one process (collective_keys.py says why this is a patch).
collective_keys.install()

from radam_dist.optimizers.lookahead import Lookahead  # noqa: E402
from radam_dist.optimizers.rectified_adam import RectifiedAdam  # noqa: E402

__all__ = ["Lookahead", "RectifiedAdam"]
