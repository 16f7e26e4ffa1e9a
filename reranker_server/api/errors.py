"""The one error table: exception -> HTTP status, and the JSON error body.

Body: `{"error": message, "error_type": kind, "field": name or null, "detail": message}` -- TEI's
shape, plus the field, plus `detail`, which Jina-style clients read. Unknown exceptions answer a
generic 500 (api/telemetry.py answers it, so that it carries X-Request-ID); the traceback goes to
the log once, never to the client.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import (
    InferenceError,
    InvalidRequestError,
    ModelLoadError,
    ModelNotFoundError,
    NotReadyError,
    OverloadedError,
    RequestTimeoutError,
    RerankerError,
    UnauthorizedError,
)
from .schemas import BODY_SHAPE_TAGS

logger = logging.getLogger(__name__)

STATUS_BY_ERROR: dict[type[RerankerError], int] = {
    InvalidRequestError: 422,
    ModelNotFoundError: 404,
    UnauthorizedError: 401,
    OverloadedError: 429,
    RequestTimeoutError: 503,
    NotReadyError: 503,
    ModelLoadError: 503,
    InferenceError: 500,
}


def error_response(
    status: int,
    message: str,
    error_type: str,
    field: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    body = {"error": message, "error_type": error_type, "field": field, "detail": message}
    return JSONResponse(body, status_code=status, headers=headers)


def status_of(exc: RerankerError) -> int:
    """The HTTP status of an error: its own class's entry, else the nearest base class's."""
    for cls in type(exc).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return 500


def _location(loc: tuple[int | str, ...]) -> str:
    # "body" and the tag that says which request shape was read are not part of the field name.
    parts = [p for p in loc if p != "body" and p not in BODY_SHAPE_TAGS]
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "body"


async def _on_reranker_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RerankerError)
    status = status_of(exc)
    headers = None
    retry_after = getattr(exc, "retry_after_s", None)
    if retry_after is not None:
        headers = {"Retry-After": str(retry_after)}
    if status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    if status == 500:
        logger.error("%s: %s", exc.error_type, exc, exc_info=exc.__cause__ is not None)
    elif status == 503:  # an expected outcome under load (timeout) or while loading
        logger.warning("%s: %s", exc.error_type, exc)
    return error_response(status, str(exc), exc.error_type, getattr(exc, "field", None), headers)


def _error_loc(error: Any) -> tuple[int | str, ...]:
    """The error's location; a fail-fast list check (schemas.fail_fast) adds the item's index."""
    loc = tuple(error.get("loc", ("body",)))
    if error.get("type") == "list_item_type":
        loc += (error["ctx"]["index"],)
    return loc


async def _on_validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    if any(e.get("type") == "json_invalid" for e in errors):
        return error_response(400, "request body is not valid JSON", "invalid_json")
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
    field = _location(_error_loc(first))
    message = "; ".join(f"{_location(_error_loc(e))}: {e['msg']}" for e in errors[:5])
    return error_response(422, message, "invalid_request", field)


async def _on_http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400:  # FastAPI could not decode the body (bad bytes, nested too deep)
        return error_response(
            400,
            "request body is not valid JSON (undecodable bytes or nested too deeply)",
            "invalid_json",
        )
    return error_response(exc.status_code, str(exc.detail), "http_error", headers=exc.headers)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RerankerError, _on_reranker_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
