"""One exception type for refusals, carrying the gRPC status code name it maps to."""

from __future__ import annotations


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
