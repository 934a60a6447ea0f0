"""Optimizer configs as they travel: JSON of a Keras-serialized RectifiedAdam / Lookahead.

The server builds its optimizer from the config with Keras' own deserialization, so it runs
exactly ``radam_dist.RectifiedAdam`` (and ``radam_dist.Lookahead``) -- the same update code as
a worker would, never a second copy of the math. Two configs are "the same" when the
optimizers they build serialize identically.
"""

from __future__ import annotations

import json
import math
from typing import Any, Dict, Union

import keras

from radam_dist import Lookahead, RectifiedAdam, radam_math
from radam_dist.ps.errors import PSError

ConfigLike = Union[Dict[str, Any], str, keras.optimizers.Optimizer]


def to_config(optimizer: ConfigLike) -> Dict[str, Any]:
    """A JSON-able dict for ``optimizer``: an optimizer instance, a Keras-serialized dict
    ({"class_name": ..., "config": ...}), plain RectifiedAdam keyword arguments, or JSON."""
    if isinstance(optimizer, keras.optimizers.Optimizer):
        return keras.optimizers.serialize(optimizer)
    if isinstance(optimizer, str):
        optimizer = json.loads(optimizer)
    if not isinstance(optimizer, dict):
        raise TypeError(f"optimizer config must be a dict, JSON or an optimizer, got {type(optimizer)}")
    return dict(optimizer)


def build_optimizer(config: ConfigLike) -> keras.optimizers.Optimizer:
    """RectifiedAdam or Lookahead(RectifiedAdam) from ``config``; PSError(INVALID_ARGUMENT)
    for anything else or for bad hyperparameters."""
    try:
        config = to_config(config)
        if "class_name" in config:
            optimizer = keras.optimizers.deserialize(config)
        else:
            optimizer = RectifiedAdam.from_config(config)
    except PSError:
        raise
    except Exception as err:  # noqa: BLE001 -- any construction error is the caller's input
        raise PSError("INVALID_ARGUMENT", f"cannot build the optimizer from its config: {err}") from err
    inner = optimizer.inner_optimizer if isinstance(optimizer, Lookahead) else optimizer
    if isinstance(inner, RectifiedAdam):
        check_hyperparameters(optimizer, inner)
    if not isinstance(inner, RectifiedAdam):
        raise PSError(
            "INVALID_ARGUMENT",
            "the parameter server runs radam_dist.RectifiedAdam, optionally inside "
            f"radam_dist.Lookahead; got {type(optimizer).__name__}"
            + (f"({type(inner).__name__})" if inner is not optimizer else ""),
        )
    return optimizer


def _number(optimizer, name: str):
    value = getattr(optimizer, name, None)
    if value is None:
        return None
    if hasattr(value, "numpy"):
        value = value.numpy()
    try:
        return float(value)
    except (TypeError, ValueError):
        return None  # a schedule: checked by Keras when it is called


def check_hyperparameters(optimizer, inner) -> None:
    """INVALID_ARGUMENT for values that would turn the parameters into NaN at the first push:
    the checks ``radam_math`` applies to both optimizers, plus finite, non-negative rates."""
    try:
        radam_math.check_hyperparameters(inner.beta_1, inner.beta_2, inner.total_steps,
                                         inner.warmup_proportion)
    except (ValueError, TypeError) as err:
        raise PSError("INVALID_ARGUMENT", f"bad RectifiedAdam hyperparameter: {err}") from err
    checks = [(inner, "learning_rate", False), (inner, "epsilon", True), (inner, "min_lr", False),
              (inner, "radam_weight_decay", False), (inner, "beta_1", False), (inner, "beta_2", False)]
    if optimizer is not inner:
        checks += [(optimizer, "slow_step_size", False)]
    for owner, name, positive in checks:
        value = _number(owner, name)
        if value is None:
            continue
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            raise PSError("INVALID_ARGUMENT",
                          f"bad hyperparameter {name}={value}: must be finite and "
                          f"{'> 0' if positive else '>= 0'}")
    slow = _number(optimizer, "slow_step_size") if optimizer is not inner else None
    if slow is not None and slow > 1:
        raise PSError("INVALID_ARGUMENT", f"bad hyperparameter slow_step_size={slow}: must be in [0, 1]")
    period = getattr(optimizer, "sync_period", 1) if optimizer is not inner else 1
    if isinstance(period, (int, float)) and period < 1:
        raise PSError("INVALID_ARGUMENT", f"bad hyperparameter sync_period={period}: must be >= 1")


def canonical_json(config: ConfigLike) -> str:
    """The config after a build / serialize round trip, as sorted JSON (for comparisons)."""
    return json.dumps(keras.optimizers.serialize(build_optimizer(config)), sort_keys=True)
