"""A gRPC parameter server for RectifiedAdam / Lookahead.

Workers pull parameters, compute gradients and push them; servers (``radam-ps serve``) apply
``radam_dist.RectifiedAdam`` (optionally inside ``radam_dist.Lookahead``) and serve the new
parameters. See docs/PS.md.

Importing this package is cheap; ``PSClient`` and the Keras integration load on first use.
"""

from __future__ import annotations

__all__ = ["PSClient", "PSError", "StaleGradientError", "RoundIncompleteError", "DataLossError",
           "PSConfigError", "AuthenticationError", "TLSMismatchError", "OptimizerConfigError",
           "ParameterServerOptimizer"]


def __getattr__(name):
    if name in ("PSClient", "StaleGradientError", "RoundIncompleteError", "DataLossError",
                "PSConfigError", "AuthenticationError", "TLSMismatchError", "OptimizerConfigError"):
        from radam_dist.ps import client

        return getattr(client, name)
    if name == "PSError":
        from radam_dist.ps.errors import PSError

        return PSError
    if name == "ParameterServerOptimizer":
        from radam_dist.ps.keras_integration import ParameterServerOptimizer

        return ParameterServerOptimizer
    raise AttributeError(f"module 'radam_dist.ps' has no attribute {name!r}")
