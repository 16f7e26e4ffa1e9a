"""The optional API key: `Authorization: Bearer <key>` on every rerank route.

With no key configured any bearer token (or none) is accepted, since the cohere SDK and mem0 always
send one. The key is compared in constant time and never logged or echoed.
"""

from __future__ import annotations

import hashlib
import hmac

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..errors import UnauthorizedError

_bearer = HTTPBearer(
    auto_error=False,
    description="Required only when the server sets RERANKER_API_KEY (or RERANKER_API_KEY_FILE).",
)


def _digest(text: str) -> bytes:
    # Hash first so that the comparison takes the same time whatever the lengths.
    return hashlib.sha256(text.encode("utf-8")).digest()


def key_matches(given: str, expected: str) -> bool:
    """Constant-time comparison of a presented key with the configured one."""
    return hmac.compare_digest(_digest(given), _digest(expected))


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header value, else None."""
    if authorization is None:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def require_api_key(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)
) -> None:
    """Let the request through when no key is set, or when it brings the key."""
    expected = request.app.state.settings.required_api_key()
    if expected is None:
        return
    given = credentials.credentials if credentials is not None else ""
    if not key_matches(given, expected):
        reason = "missing" if credentials is None else "invalid"
        raise UnauthorizedError(
            f"{reason} API key: send the header 'Authorization: Bearer <key>' with the key the "
            "server was started with (RERANKER_API_KEY)"
        )


API_KEY_REQUIRED = [Depends(require_api_key)]
