"""`DrainingServer`: uvicorn's server with a drain between the stop signal and the shutdown.

uvicorn alone, on SIGTERM, closes the port at once, waits `timeout_graceful_shutdown` for the
requests in progress and then cancels them with a plain-text 500. Here the port stays open while
the service drains (`RerankService.drain`): readiness and new requests answer 503 + Retry-After at
once (a load balancer stops sending), requests in progress get `drain_timeout_s` to finish, the
rest are cut off with a JSON 503 and their queued pairs dropped. Only then does uvicorn's own
shutdown run: close the port and the connections, and release the models in the lifespan.

A second Ctrl-C during the drain stops at once (uvicorn's `force_exit`).
"""

from __future__ import annotations

import asyncio
import logging
import socket

import uvicorn

from .service import RerankService

logger = logging.getLogger(__name__)

# uvicorn's own wait for connections after the drain: only answers being written, and requests
# that arrived in the last instant (refused at once), are left by then.
SHUTDOWN_GRACE_S = 10


class DrainingServer(uvicorn.Server):
    def __init__(
        self, config: uvicorn.Config, service: RerankService, drain_timeout_s: float
    ) -> None:
        super().__init__(config)
        self.service = service
        self.drain_timeout_s = drain_timeout_s

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # Connections close after their current answer (idle keep-alive ones at once), so
        # clients reconnect, through the load balancer, to a replica that is not stopping.
        for connection in list(self.server_state.connections):
            connection.shutdown()
        drain = asyncio.ensure_future(self.service.drain(self.drain_timeout_s))
        while not drain.done() and not self.force_exit:
            await asyncio.wait({drain}, timeout=0.1)
        if not drain.done():
            drain.cancel()
        await super().shutdown(sockets)


def serve(config: uvicorn.Config, service: RerankService, drain_timeout_s: float) -> int:
    """Run until SIGTERM / SIGINT, drain, shut down. 0 when it stopped, 3 (uvicorn's startup
    failure) when it never started (a model that can't be loaded)."""
    server = DrainingServer(config, service, drain_timeout_s)
    server.run()
    return 0 if server.started else 3
