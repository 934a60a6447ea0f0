"""The environment switches of the fast paths (``RADAM_DIST_FUSED=0`` and its kin): one
parse for all of them, so that every switch takes the same words."""

import os

OFF_WORDS = ("0", "false", "no", "off")


def switched_on(name: str) -> bool:
    """False where the environment sets ``name`` to 0, false, no or off; on otherwise."""
    return os.environ.get(name, "1").strip().lower() not in OFF_WORDS
