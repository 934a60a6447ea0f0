"""Keras 3 optimizers: RectifiedAdam and the Lookahead wrapper."""

from radam_dist.optimizers.lookahead import Lookahead
from radam_dist.optimizers.rectified_adam import RectifiedAdam

__all__ = ["Lookahead", "RectifiedAdam"]
