"""The optional API key: `Authorization: Bearer <key>` on every POST route.

Checked once, by the ASGI guard (api/guard.py), before the body is read. With no key configured
any bearer token (or none) is accepted, since the cohere SDK and mem0 always send one. The key is
compared in constant time and never logged or echoed. `API_KEY_DOCUMENTED` only declares the
scheme in the OpenAPI docs (the "Authorize" button of /docs); it checks nothing.
"""

from __future__ import annotations

import hashlib
import hmac

from fastapi import Security
from fastapi.security import HTTPBearer

_bearer = HTTPBearer(
    auto_error=False,
    description="Required only when the server sets RERANKER_API_KEY (or RERANKER_API_KEY_FILE).",
)

API_KEY_DOCUMENTED = [Security(_bearer)]


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
