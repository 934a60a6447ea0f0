"""The ways durable state can be unusable, and the hint every refusal to start ends with."""

from __future__ import annotations

DISCARD_HINT = ("restore the file from a backup, or restart with --discard-damaged-state to "
                "move the damaged files aside and continue without the updates they hold")


class RecoveryError(RuntimeError):
    """Durable state is damaged or incomplete: starting would silently lose acknowledged updates."""


class WalBrokenError(RuntimeError):
    """An append failed and the log could not be brought back to its last complete record:
    the server must stop serving (a restart recovers from the directory)."""


class DirectoryLockedError(RuntimeError):
    """Another server holds the checkpoint directory."""
