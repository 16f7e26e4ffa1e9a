"""`create_app(settings)`: the FastAPI application around one `RerankService`, whose models load
in the app's lifespan (before the server listens)."""

from __future__ import annotations

import logging
import traceback

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.types import Receive, Scope, Send

from . import __version__
from .api import health, playground, routes
from .api import metrics as metrics_route
from .api.docs_pages import install_docs
from .api.drain_close import CloseWhileDraining
from .api.errors import install_error_handlers
from .api.guard import RequestGuard
from .api.telemetry import RequestTelemetry
from .errors import ModelLoadError
from .metrics import Metrics, StateCollector
from .service import EngineFactory, RerankService
from .settings import Settings

logger = logging.getLogger(__name__)


class RerankerApp(FastAPI):
    """FastAPI with a lifespan that loads the engine before the server listens.

    The lifespan protocol is answered here rather than by Starlette so that a model that can't be
    loaded stops startup with its one-line message instead of a traceback.
    """

    def __init__(self, settings: Settings, engine_factory: EngineFactory | None = None) -> None:
        super().__init__(
            title="reranker-server",
            version=__version__,
            description="Two-stage reranking: FlashRank on the CPU, then a cross-encoder on GPU.",
            docs_url=None,  # api/docs_pages.py serves /docs and /redoc with bundled assets
            redoc_url=None,
        )
        self.settings = settings
        self.service = RerankService(settings, engine_factory)
        self.state.settings = settings
        self.state.service = self.service
        self.state.metrics = Metrics()  # a registry per app: apps in one process never collide
        self.state.metrics.registry.register(
            StateCollector(lambda: self.service.status(read_gpu_memory=True))
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        else:
            await super().__call__(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        await receive()  # lifespan.startup
        try:
            await self.startup()
        except ModelLoadError as exc:
            await send({"type": "lifespan.startup.failed", "message": str(exc)})
            return
        except Exception:
            await send({"type": "lifespan.startup.failed", "message": traceback.format_exc()})
            return
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        await self.shutdown()
        await send({"type": "lifespan.shutdown.complete"})

    async def startup(self) -> None:
        """Load and warm up the models; the server listens only after this returns."""
        await self.service.start()
        if self.settings.required_api_key() is not None:
            logger.info("API key required on rerank routes (Authorization: Bearer)")

    async def shutdown(self) -> None:
        """Let running inference finish, then release the models."""
        await self.service.close()


def create_app(
    settings: Settings | None = None, engine_factory: EngineFactory | None = None
) -> RerankerApp:
    """Build the app. `engine_factory` defaults to loading the models the settings name."""
    settings = settings or Settings()
    app = RerankerApp(settings, engine_factory)
    install_error_handlers(app)
    for router in routes.ROUTERS:
        app.include_router(router)
    app.include_router(health.router)
    app.include_router(metrics_route.router)
    install_docs(app)
    app.include_router(playground.router)
    app.add_middleware(
        RequestGuard,
        max_body_bytes=settings.max_body_bytes,
        api_key=settings.required_api_key(),
    )
    if settings.cors_origin_list():
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origin_list(),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID", "X-Process-Time", "Retry-After"],
        )
    app.add_middleware(  # outermost: sees every answer, the guard's 413/415 included
        RequestTelemetry,
        metrics=app.state.metrics,
        routes=app.router.routes,
        log_payloads=settings.log_payloads,
    )
    app.add_middleware(CloseWhileDraining, service=app.service)  # every answer while draining
    return app
