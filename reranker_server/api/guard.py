"""ASGI middleware that checks a request before anything parses it.

- With an API key set, a POST without the right bearer token gets 401 before its body is read.
- A body over `max_body_bytes` gets 413 (from Content-Length at once, else while reading).
- Beyond `max_connections` open connections (server.HttpProtocol marks the request), a POST gets
  a JSON 503 with `Retry-After` and `Connection: close`.
- A POST whose Content-Type is not JSON gets 415 (a missing Content-Type is read as JSON), and so
  does a compressed body (Content-Encoding other than identity: nothing is ever inflated).
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import (
    PayloadTooLargeError,
    RerankerError,
    TooManyConnectionsError,
    UnauthorizedError,
    UnsupportedMediaTypeError,
    shown,
)
from .auth import bearer_token, key_matches
from .errors import error_response

# ASGI scope extension server.HttpProtocol sets on a request that arrived beyond
# `max_connections` open connections (value: the cap); rerank requests then get a JSON 503.
OVER_CONNECTION_CAP = "reranker.over_connection_cap"


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


class RequestGuard:
    def __init__(self, app: ASGIApp, max_body_bytes: int, api_key: str | None = None) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        cap = scope.get("extensions", {}).get(OVER_CONNECTION_CAP)
        if cap is not None:  # marked by server.HttpProtocol
            await _reply(
                send,
                TooManyConnectionsError(
                    f"too many open connections: the limit is {cap} (max_connections); retry later"
                ),
                close=True,
            )
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key is not None:  # every POST route reranks: no key, no body read
            token = bearer_token(headers.get("authorization"))
            if token is None or not key_matches(token, self.api_key):
                await _reply(
                    send,
                    UnauthorizedError(
                        f"{'missing' if token is None else 'invalid'} API key: send the header "
                        "'Authorization: Bearer <key>' with the key the server was started with "
                        "(RERANKER_API_KEY)"
                    ),
                )
                return
        content_type = headers.get("content-type")
        if content_type is None:  # curl -d without -H, some scripts: read the body as JSON
            scope = {
                **scope,
                "headers": [*scope["headers"], (b"content-type", b"application/json")],
            }
        elif not _is_json(content_type):
            await _reply(
                send,
                UnsupportedMediaTypeError(
                    f"Content-Type must be application/json, got {shown(content_type)}",
                    field="content-type",
                ),
            )
            return
        encoding = headers.get("content-encoding", "identity").strip().lower()
        if encoding != "identity":  # never inflate: no decompression bombs
            await _reply(
                send,
                UnsupportedMediaTypeError(
                    f"Content-Encoding {shown(encoding)} is not accepted; send plain JSON",
                    field="content-encoding",
                ),
            )
            return
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            await _reply(send, self._too_large())
            return

        # Read the body here (bounded), then replay it to the app.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await _reply(send, self._too_large())
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        del chunks  # one copy of the body while the request runs, not two
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _too_large(self) -> PayloadTooLargeError:
        return PayloadTooLargeError(
            f"request body exceeds the limit of {self.max_body_bytes} bytes (max_body_bytes)",
            field="body",
        )


async def _reply(send: Send, error: RerankerError, close: bool = False) -> None:
    response = error_response(error)
    if close:
        response.headers["Connection"] = "close"
    await response({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}
