"""`Connection: close` on every answer sent while the server drains (server.py).

While draining, each connection ends after its next answer (none is closed under a request it
carries), so a kept-alive client must learn from that answer that the connection ends: a 200
finished during the drain, a liveness probe, a metrics scrape carry the header as the drain's 503s
do. Without it the client's next request on the same socket meets a closed connection
(BrokenPipe) instead of an answer.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..service import RerankService

CLOSE = (b"connection", b"close")


class CloseWhileDraining:
    """ASGI middleware: adds `Connection: close` to answers started while `service.draining`."""

    def __init__(self, app: ASGIApp, service: RerankService) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_closing(message: Message) -> None:
            if message["type"] == "http.response.start" and self.service.draining:
                headers = [
                    (name, value)
                    for name, value in message.get("headers", [])
                    if name.lower() != b"connection"
                ]
                message = {**message, "headers": [*headers, CLOSE]}
            await send(message)

        await self.app(scope, receive, send_closing)
