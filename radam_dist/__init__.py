"""radam_dist: RectifiedAdam and Lookahead for Keras 3, from one GPU to many machines.

The public API is what this module exports; see README.md.
"""

from radam_dist.callbacks import EffectiveLearningRate
from radam_dist.optimizers import Lookahead, RectifiedAdam

__version__ = "0.1.0"

__all__ = ["EffectiveLearningRate", "Lookahead", "RectifiedAdam", "__version__"]
