"""The one error table: every status the server sends comes from an error class (errors.py)
through `STATUS_BY_ERROR`, and every error body from `error_response`.

Body: `{"error": message, "error_type": kind, "field": name or null, "detail": message}` -- TEI's
shape, plus the field, plus `detail`, which Jina-style clients read. Unknown exceptions answer a
generic 500 (api/telemetry.py answers it, so that it carries X-Request-ID); the traceback goes to
the log once, never to the client.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import (
    InferenceError,
    InvalidJsonError,
    InvalidRequestError,
    MethodNotAllowedError,
    ModelLoadError,
    ModelNotFoundError,
    NotReadyError,
    OverloadedError,
    PayloadTooLargeError,
    RequestCancelledError,
    RequestTimeoutError,
    RerankerError,
    RouteNotFoundError,
    ShuttingDownError,
    TooManyConnectionsError,
    UnauthorizedError,
    UnsupportedMediaTypeError,
)
from .schemas import BODY_SHAPE_TAGS

logger = logging.getLogger(__name__)

# 499: nginx's "client closed request"; only ever seen in metrics and logs (nobody is listening).
STATUS_BY_ERROR: dict[type[RerankerError], int] = {
    InvalidJsonError: 400,
    UnauthorizedError: 401,
    ModelNotFoundError: 404,
    RouteNotFoundError: 404,
    MethodNotAllowedError: 405,
    PayloadTooLargeError: 413,
    UnsupportedMediaTypeError: 415,
    InvalidRequestError: 422,
    OverloadedError: 429,
    RequestCancelledError: 499,
    InferenceError: 500,
    RerankerError: 500,  # anything else of ours, and unexpected exceptions
    RequestTimeoutError: 503,
    TooManyConnectionsError: 503,
    ShuttingDownError: 503,
    NotReadyError: 503,
    ModelLoadError: 503,
}


def status_of(exc: RerankerError) -> int:
    """The HTTP status of an error: its own class's entry, else the nearest base class's."""
    return next(STATUS_BY_ERROR[cls] for cls in type(exc).__mro__ if cls in STATUS_BY_ERROR)


def error_response(exc: RerankerError) -> JSONResponse:
    """The answer to an error: its status, the JSON body, and the headers it calls for."""
    status = status_of(exc)
    message = str(exc)
    headers: dict[str, str] = {}
    retry_after = getattr(exc, "retry_after_s", None)
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    if isinstance(exc, UnauthorizedError):
        headers["WWW-Authenticate"] = "Bearer"
    if isinstance(exc, ShuttingDownError):  # this process is going away: reconnect elsewhere
        headers["Connection"] = "close"
    body = {
        "error": message,
        "error_type": exc.error_type,
        "field": getattr(exc, "field", None),
        "detail": message,
    }
    return JSONResponse(body, status_code=status, headers=headers or None)


def _location(loc: tuple[int | str, ...]) -> str:
    # "body" and the tag that says which request shape was read are not part of the field name.
    parts = [p for p in loc if p != "body" and p not in BODY_SHAPE_TAGS]
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "body"


# Errors raised for a list as a whole that name one of its items (`ctx["index"]`).
ITEM_ERRORS = frozenset({"list_item_type", "list_item_unicode"})


def _error_loc(error: Any) -> tuple[int | str, ...]:
    """The error's location; a fail-fast list check (schemas.fail_fast) adds the item's index."""
    loc = tuple(error.get("loc", ("body",)))
    if error.get("type") in ITEM_ERRORS:
        loc += (error["ctx"]["index"],)
    return loc


def from_validation(exc: RequestValidationError) -> RerankerError:
    """FastAPI's validation errors as ours: bad JSON (400) or the first bad field (422)."""
    errors = list(exc.errors())
    if any(e.get("type") == "json_invalid" for e in errors):
        return InvalidJsonError("request body is not valid JSON", field="body")
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
    message = "; ".join(f"{_location(_error_loc(e))}: {e['msg']}" for e in errors[:5])
    return InvalidRequestError(message, field=_location(_error_loc(first)))


def from_http(exc: StarletteHTTPException) -> RerankerError:
    """Starlette's own HTTP errors (no route, wrong method, undecodable body) as ours."""
    if exc.status_code == 400:  # FastAPI could not decode the body (bad bytes, nested too deep)
        return InvalidJsonError(
            "request body is not valid JSON (undecodable bytes or nested too deeply)", field="body"
        )
    if exc.status_code == 405:
        return MethodNotAllowedError(str(exc.detail))
    if exc.status_code == 404:
        return RouteNotFoundError(str(exc.detail))
    logger.warning("unexpected HTTP error %d: %s", exc.status_code, exc.detail)
    return RerankerError(str(exc.detail))


async def _on_reranker_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RerankerError)
    status = status_of(exc)
    if isinstance(exc, ShuttingDownError):  # expected while draining: not an error
        logger.info("%s: %s", exc.error_type, exc)
    elif status == 500:
        logger.error("%s: %s", exc.error_type, exc, exc_info=exc.__cause__ is not None)
    elif status == 503:  # an expected outcome under load (timeout) or while loading
        logger.warning("%s: %s", exc.error_type, exc)
    return error_response(exc)


async def _on_validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(from_validation(exc))


async def _on_http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    response = error_response(from_http(exc))
    if exc.headers:  # 405's Allow
        response.headers.update(exc.headers)
    return response


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RerankerError, _on_reranker_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
