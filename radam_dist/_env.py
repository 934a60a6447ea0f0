"""radam_dist's environment variables, parsed in one place: the switches of the fast paths
(``RADAM_DIST_FUSED=0`` and its kin) take the same words, and every timeout the same numbers
and the same error."""

import os

OFF_WORDS = ("0", "false", "no", "off")


def switched_on(name: str) -> bool:
    """False where the environment sets ``name`` to 0, false, no or off; on otherwise."""
    return os.environ.get(name, "1").strip().lower() not in OFF_WORDS


def seconds(name: str, default: float, zero_means: str = "") -> float:
    """``$name`` as a number of seconds, ``default`` where it is unset or empty. ValueError
    naming the variable for anything else than a number > 0 (or >= 0 where ``zero_means``
    says what 0 does, e.g. "wait forever")."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"${name}={raw!r} is not a number of seconds") from None
    if not (value >= 0 if zero_means else value > 0):
        bound = f">= 0 (0: {zero_means})" if zero_means else "> 0"
        raise ValueError(f"${name} must be a number of seconds {bound}, got {raw!r}")
    return value
