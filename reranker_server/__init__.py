"""reranker-server: two-stage reranking (FlashRank on the CPU, a cross-encoder on the GPU).

Importing the package is cheap: no model, no torch. `reranker_server.app` (what
`uvicorn reranker_server:app` asks for) is built on first access from the `RERANKER_*`
environment; the models load in its lifespan, before the server listens.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "app"]


def __getattr__(name: str) -> Any:
    if name == "app":
        from .app import create_app
        from .logs import configure_logging
        from .settings import Settings

        settings = Settings()
        configure_logging(settings.log_level, settings.log_format)
        application = create_app(settings)
        globals()["app"] = application
        return application
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
