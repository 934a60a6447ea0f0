"""Bearer-token authentication for the parameter server.

Every call except the standard health service must carry ``authorization: Bearer <token>``;
the token is compared in constant time (``hmac.compare_digest``). A refused call gets
UNAUTHENTICATED before its handler runs, so it changes nothing. The health service stays open
so that Kubernetes' gRPC probes, which cannot send a token, work.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path
from typing import Optional

import grpc

from radam_dist.ps.admission import HEALTH_PREFIX, refusing_handler

TOKEN_ENV = "RADAM_PS_TOKEN"
PLACEHOLDER_PREFIX = "REPLACE"  # what example manifests put where a real token belongs


def check_token(token: str, source: str) -> str:
    """Refuse a placeholder copied from an example (``REPLACE-WITH-...``): it is public."""
    if token.upper().startswith(PLACEHOLDER_PREFIX):
        raise ValueError(
            f"the token in {source} is the placeholder {token[:40]!r} from an example, not a "
            "secret: generate one (python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return token


def load_token(token_file: Optional[str] = None, env: str = TOKEN_ENV) -> Optional[str]:
    """The token from ``token_file`` (surrounding whitespace stripped) or the environment."""
    if token_file:
        token = Path(token_file).read_text().strip()
        if not token:
            raise ValueError(f"token file {token_file} is empty")
        return check_token(token, token_file)
    token = os.environ.get(env, "").strip()
    return check_token(token, f"${env}") if token else None


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Rejects calls without the right bearer token with UNAUTHENTICATED."""

    def __init__(self, token: str):
        check_token(token, "the server options")
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method or ""
        if method.startswith(HEALTH_PREFIX):
            return continuation(handler_call_details)
        supplied = b""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                supplied = value.encode() if isinstance(value, str) else value
                break
        if hmac.compare_digest(supplied, self._expected):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        message = "missing bearer token" if not supplied else "invalid bearer token"
        return refusing_handler(handler, grpc.StatusCode.UNAUTHENTICATED, message)
