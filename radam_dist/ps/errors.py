"""One exception type for refusals, carrying the gRPC status code name it maps to, and the
helper that keeps the names in a refusal short."""

from __future__ import annotations

from typing import Sequence


class PSError(Exception):
    """A refused request. ``code`` is a ``grpc.StatusCode`` name such as "INVALID_ARGUMENT".

    Every refusal is raised before any state changes, so the server is left exactly as it was.
    """

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


def name_list(names: Sequence[str], limit: int = 5) -> str:
    """At most ``limit`` names and a count: error messages stay small for any request."""
    names = list(names)
    shown = ", ".join(repr(n[:100]) for n in names[:limit])
    return f"[{shown}{f', ... {len(names) - limit} more' if len(names) > limit else ''}] ({len(names)})"
