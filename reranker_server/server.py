"""How `reranker-server serve` runs uvicorn: connection limits, and a drain before shutdown.

uvicorn's HTTP/1.1 protocol with the connection limits a public server needs.

`HttpProtocol` is uvicorn's h11 protocol plus:

- **header timeout**: a request's headers must arrive within `header_timeout_s` of the connection
  opening (or of the request's first byte on a kept-alive connection); else the connection is
  closed. Stock uvicorn waits forever for a connection that sends nothing or half a header.
- **body timeout**: its body within `body_timeout_s` after the headers.
- **keep-alive timeout**: an idle kept-alive connection closes after `keep_alive_timeout_s`
  (uvicorn's own timer, set from the setting).
- **write timeout**: once the send buffer is full (asyncio's `pause_writing`), the client must
  take some of the answer every `write_timeout_s` (like nginx's `send_timeout`: between two
  successful writes, not for the whole answer); else the connection is cut (`abort`: the unsent
  bytes are dropped, not flushed, which `close` would wait for forever) and malloc's arenas
  trimmed (memory.py), counted in `reranker_connections_closed_total{reason}` with the header
  and body timeouts. Stock uvicorn keeps such a client, and its answer, as long as the socket
  lives.
- **connection cap**: beyond `max_connections` open connections a rerank request (a POST) is
  answered with a JSON 503 (`Retry-After`, `Connection: close`) instead of uvicorn's plain-text
  one; health and metrics stay answered (a liveness probe must not fail because of load).
- **`Upgrade: h2c` ignored**: the request is read as HTTP/1.1, body included, as RFC 9110 allows.
  This is why the base is h11: httptools (uvicorn's default when installed) stops parsing at an
  upgrade request's headers and drops its body (uvicorn issue #2722, httptools issue #124).

`reranker-server serve` uses it (`uvicorn_options`); with uvicorn's own CLI pass
`--http reranker_server.server:HttpProtocol` (settings come from the `RERANKER_*` environment).
All of it is event-loop timers and counters: a slow client costs a socket, never a thread.

`DrainingServer` is uvicorn's server with a drain between the stop signal and the shutdown.

uvicorn alone, on SIGTERM, closes the port at once, waits `timeout_graceful_shutdown` for the
requests in progress and then cancels them with a plain-text 500. Here the port stays open while
the service drains (`RerankService.drain`): readiness and new requests answer 503 + Retry-After at
once (a load balancer stops sending), requests in progress get `drain_timeout_s` to finish, the
rest are cut off with a JSON 503 and their queued pairs dropped. Only then does uvicorn's own
shutdown run: close the port and the connections, and release the models in the lifespan.

A second SIGTERM or Ctrl-C during the drain is logged and cuts the drain short: the requests in
progress are cancelled at once and answer their JSON 503, then the shutdown runs as usual (never
uvicorn's `force_exit`, which cancels handlers mid-answer: plain-text 500s and an abort while
inference threads still run). Further signals are logged and ignored.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from dataclasses import dataclass
from types import FrameType
from typing import Any, ClassVar

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .api.guard import OVER_CONNECTION_CAP
from .memory import MemoryTrimmer
from .metrics import CLOSED_CONNECTIONS
from .service import RerankService
from .settings import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    keep_alive_timeout_s: float = 5.0
    write_timeout_s: float = 60.0
    max_connections: int = 512  # 0: no cap

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionLimits:
        return cls(
            header_timeout_s=settings.header_timeout_s,
            body_timeout_s=settings.body_timeout_s,
            keep_alive_timeout_s=settings.keep_alive_timeout_s,
            write_timeout_s=settings.write_timeout_s,
            max_connections=settings.max_connections,
        )


# Gives an aborted answer's pages back to the system (one per process, like malloc's arenas).
TRIMMER = MemoryTrimmer(min_bytes=0)
READ_TIMEOUT_REASONS = {"headers": "header_timeout", "body": "body_timeout"}


class HttpProtocol(H11Protocol):
    """One HTTP/1.1 connection (see the module docstring). `limits` None: from the environment."""

    limits: ClassVar[ConnectionLimits | None] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        limits = type(self).limits
        if limits is None:
            limits = type(self).limits = ConnectionLimits.from_settings(Settings())
        self._limits = limits
        self.timeout_keep_alive = limits.keep_alive_timeout_s  # type: ignore[assignment]
        self.limit_concurrency = None  # the cap is ours (a JSON 503), not uvicorn's plain text
        self._real_app = self.app
        self.app = self._app_or_busy
        self._read_timer: asyncio.TimerHandle | None = None
        self._reading: str | None = None  # "headers", "body" or None: what the timer bounds
        self._write_timer: asyncio.TimerHandle | None = None
        self._unsent = 0  # the send buffer's size when the write timer was armed

    # --- read timeouts
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self._arm("headers")

    def connection_lost(self, exc: Exception | None) -> None:
        self._arm(None)
        self._stop_write_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._follow_request(data_arrived=True)

    def on_response_complete(self) -> None:
        super().on_response_complete()  # arms uvicorn's keep-alive timer, runs a pipelined request
        self._follow_request(data_arrived=False)

    def _follow_request(self, data_arrived: bool) -> None:
        """Point the read timer at what the client owes now: headers, a body, or nothing."""
        if self.transport is None or self.transport.is_closing():
            return
        state = self.conn.their_state
        between_requests = self.cycle is None or self.cycle.response_complete
        if state is h11.SEND_BODY:
            self._arm("body")
        elif state is h11.IDLE and between_requests:
            started = data_arrived or bool(self.conn.trailing_data[0])
            # a request has begun (bytes, no complete header yet); else the line is idle and
            # uvicorn's keep-alive timer is in charge
            self._arm("headers" if started or self._reading == "headers" else None)
        else:
            self._arm(None)  # the request is in; the answer is the server's business

    def _arm(self, reading: str | None) -> None:
        if self._reading == reading and self._read_timer is not None:
            return
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None
        self._reading = reading
        if reading is not None:
            seconds = (
                self._limits.header_timeout_s
                if reading == "headers"
                else self._limits.body_timeout_s
            )
            self._read_timer = self.loop.call_later(seconds, self._read_timed_out)

    def _read_timed_out(self) -> None:
        self._read_timer = None
        if self.transport.is_closing():
            return
        logger.info(
            "closed a connection that sent no complete request %s in time",
            self._reading,
            extra={"fields": {"client": self.client[0] if self.client else None}},
        )
        if self._reading is not None:
            CLOSED_CONNECTIONS.add(READ_TIMEOUT_REASONS[self._reading])
        self.transport.close()

    # --- write timeout: asyncio calls pause_writing when the send buffer passes its high-water
    # mark and resume_writing once it has drained below the low one
    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            self._arm_write_timer()

    def _arm_write_timer(self) -> None:
        self._unsent = self.transport.get_write_buffer_size()
        self._write_timer = self.loop.call_later(
            self._limits.write_timeout_s, self._write_timed_out
        )

    def resume_writing(self) -> None:
        super().resume_writing()
        self._stop_write_timer()

    def _stop_write_timer(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _write_timed_out(self) -> None:
        self._write_timer = None
        unsent = self.transport.get_write_buffer_size()
        if not unsent:
            return
        if unsent < self._unsent:  # the client took some: a slow reader, not a stalled one
            self._arm_write_timer()
            return
        logger.warning(
            "cut a connection that read nothing of its answer for %g s (%d bytes unsent)",
            self._limits.write_timeout_s,
            unsent,
            extra={"fields": {"client": self.client[0] if self.client else None}},
        )
        CLOSED_CONNECTIONS.add("write_timeout")
        # abort, not close: close flushes first, i.e. waits for the client that does not read
        self.transport.abort()
        TRIMMER.after_request(unsent)

    # --- upgrade: ignored, quietly (h11 reads the body; the request is served as HTTP/1.1)
    def _unsupported_upgrade_warning(self) -> None:
        logger.debug("ignored an Upgrade header; answering over HTTP/1.1")

    # --- connection cap: marked here, answered by the app's guard (api/guard.py) so that the
    # 503 is logged and counted like any answer
    async def _app_or_busy(self, scope: Any, receive: Any, send: Any) -> None:
        cap = self._limits.max_connections
        if cap and len(self.connections) > cap:
            extensions = {**scope.get("extensions", {}), OVER_CONNECTION_CAP: cap}
            scope = {**scope, "extensions": extensions}
        await self._real_app(scope, receive, send)


def http_protocol(limits: ConnectionLimits) -> type[HttpProtocol]:
    """`HttpProtocol` with these limits (for uvicorn.Config's `http=`)."""
    return type("HttpProtocol", (HttpProtocol,), {"limits": limits})


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """The uvicorn.Config arguments that apply the connection settings."""
    limits = ConnectionLimits.from_settings(settings)
    return {
        "http": http_protocol(limits),
        "timeout_keep_alive": limits.keep_alive_timeout_s,
        "limit_concurrency": None,
    }


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
        self.cut_short = False  # a second signal came during the drain

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """The first SIGTERM / SIGINT starts the drain (uvicorn's `should_exit`); a second one
        cuts the drain short; later ones are logged and ignored. Never `force_exit`."""
        if not self.should_exit:
            super().handle_exit(sig, frame)
            return
        self._captured_signals.append(sig)  # re-raised by uvicorn on exit, as for the first
        name = signal.Signals(sig).name
        if not self.cut_short:
            self.cut_short = True
            logger.warning("%s during the drain: requests in progress are cut off now (503)", name)
        else:
            logger.warning("%s ignored: the server is already stopping", name)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # Connections close after their next answer (api/drain_close.py: `Connection: close`),
        # so clients reconnect, through the load balancer, to a replica that is not stopping; an
        # idle one closes at the keep-alive timeout. None is closed here: a connection accepted
        # an instant ago, or a kept-alive one, may hold a request that has not been read yet,
        # and closing it would reset that request instead of answering it (503).
        drain = asyncio.ensure_future(self.service.drain(self.drain_timeout_s))
        while not drain.done() and not self.cut_short:
            await asyncio.wait({drain}, timeout=0.1)
        if not drain.done():
            # cut short: what is still running answers its 503 now, as at the drain timeout
            drain.cancel()
            await self.service.drain(0)
        await super().shutdown(sockets)


def serve(
    config: uvicorn.Config,
    service: RerankService,
    drain_timeout_s: float,
    sockets: list[socket.socket] | None = None,
) -> int:
    """Run until SIGTERM / SIGINT, drain, shut down. 0 when it stopped, 3 (uvicorn's startup
    failure) when it never started (a model that can't be loaded). `sockets`: already bound
    (cli.py binds the port before the models load)."""
    server = DrainingServer(config, service, drain_timeout_s)
    server.run(sockets=sockets)
    return 0 if server.started else 3
