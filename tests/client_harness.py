"""For tests that drive real client packages: what the client really sent (an ASGI wrapper that
records each request's method, path, Authorization header and JSON body before the app answers),
and a guard that fails any connection that is not to loopback (clients that phone home)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

LOOPBACK = {"127.0.0.1", "::1", "localhost"}


@dataclass
class Sent:
    method: str
    path: str
    authorization: str | None
    body: Any  # the parsed JSON body, None when empty
    status: int | None = None  # set when the app starts its answer


class Recorder:
    """Wraps an ASGI app; `requests` lists every HTTP request in arrival order."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.requests: list[Sent] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        auth = headers.get(b"authorization")
        entry = Sent(scope["method"], scope["path"], auth.decode() if auth else None, None)
        chunks: list[bytes] = []

        async def receive_and_record() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    body = b"".join(chunks)
                    entry.body = json.loads(body) if body else None
            return message

        async def send_and_record(message: Message) -> None:
            if message["type"] == "http.response.start":
                entry.status = message["status"]
            await send(message)

        # recorded before the app runs, so it is there by the time the client has its answer
        self.requests.append(entry)
        await self.app(scope, receive_and_record, send_and_record)

    def only(self) -> Sent:
        """The one request since the last `clear()`."""
        assert len(self.requests) == 1, [(r.method, r.path) for r in self.requests]
        return self.requests[0]

    def clear(self) -> None:
        self.requests.clear()


@contextmanager
def loopback_only() -> Iterator[list[Any]]:
    """Refuse (and list) every name lookup or connection to anything but loopback."""
    attempts: list[Any] = []
    connect, getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def guarded_connect(sock: socket.socket, address: Any) -> Any:
        if isinstance(address, tuple) and address[0] not in LOOPBACK:
            attempts.append(address)
            raise OSError(f"test guard: no connections off loopback ({address})")
        return connect(sock, address)

    def guarded_getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else host
        if name is not None and name not in LOOPBACK:
            attempts.append(name)
            raise OSError(f"test guard: no name lookups off loopback ({name})")
        return getaddrinfo(host, *args, **kwargs)

    socket.socket.connect = guarded_connect  # type: ignore[method-assign]
    socket.getaddrinfo = guarded_getaddrinfo
    try:
        yield attempts
    finally:
        socket.socket.connect = connect  # type: ignore[method-assign]
        socket.getaddrinfo = getaddrinfo
