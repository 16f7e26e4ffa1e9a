"""reranker-server: two-stage reranking (FlashRank on the CPU, a cross-encoder on the GPU).

Importing the package is cheap: no model, no torch. `reranker_server.app` (what
`uvicorn reranker_server:app` asks for) is built on first access from the `RERANKER_*`
environment; the models load in its lifespan, before the server listens.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "app"]

# Under an ASGI server (uvicorn ...) the server's own options decide where it listens.
SERVER_OWNED_SETTINGS = ("host", "port")


def __getattr__(name: str) -> Any:
    if name == "app":
        application = _app_from_environment()
        globals()["app"] = application
        return application
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _app_from_environment() -> Any:
    """The app for `uvicorn reranker_server:app`: an invalid setting is one line on stderr and
    exit status 2 (not a pydantic traceback); RERANKER_HOST / RERANKER_PORT are not used."""
    import logging
    import sys

    from .app import create_app
    from .logs import configure_logging
    from .settings import SettingsError, load_settings, setting_source

    try:
        settings, notes = load_settings(unused=SERVER_OWNED_SETTINGS)
    except SettingsError as exc:
        for line in exc.lines:
            print(f"reranker-server: invalid setting {line}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(settings.log_level, settings.log_format)
    for note in notes:  # an unknown RERANKER_* variable, with the closest real name
        logging.getLogger(__name__).warning("%s", note)
    for setting in SERVER_OWNED_SETTINGS:
        variable, value = setting_source(setting)
        if value is not None:
            logging.getLogger(__name__).warning(
                "%s=%r is not used: the ASGI server's own options (uvicorn --%s) decide",
                variable,
                value,
                setting,
            )
    # One access line per request: the app logs each request itself (api/telemetry.py), so
    # uvicorn's own access log is turned off, as `uvicorn --no-access-log` does.
    uvicorn_access = logging.getLogger("uvicorn.access")
    uvicorn_access.handlers = []
    uvicorn_access.propagate = False
    if settings.log_format == "json":
        # uvicorn's lines ("Started server process", errors) as JSON too, through our handler
        uvicorn_logger = logging.getLogger("uvicorn")
        uvicorn_logger.handlers = []
        uvicorn_logger.propagate = True
    logging.getLogger(__name__).warning(UNPROTECTED_WARNING)
    return create_app(settings)


# What `reranker-server serve` (server.py) adds to uvicorn, said once at startup by the other way
# to start the app (README: "Quick start"; docs/reliability.md).
UNPROTECTED_WARNING = (
    "started by the ASGI server directly, not by `reranker-server serve`: no drain on SIGTERM "
    "(the port closes at once, readiness never answers 503); header, body and write timeouts, "
    "the JSON 503 connection cap and `Upgrade: h2c` requests keeping their body only with "
    "`--http reranker_server.server:HttpProtocol`. `reranker-server serve` has all of them."
)
