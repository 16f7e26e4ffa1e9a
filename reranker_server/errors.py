"""The error hierarchy. Each error has a stable `error_type`; api/errors.py maps every one of them
to its HTTP status in one table. Nothing here speaks HTTP: an input error names the part of the
job it is about (`query`, `documents[3]`, `candidates`), and the HTTP layer renames that to the
request's own field (`texts[3]` in TEI's body, `requests[2].documents[3]` in a batch)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .types import Cancellation

# Most characters of a client's value an error message repeats (a 1 MB `model` name is cut).
MAX_ECHO_CHARS = 100


def cut(text: str, limit: int = MAX_ECHO_CHARS) -> str:
    """`text` for an error message: at most `limit` characters, then `...` and its length."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def shown(value: object, limit: int = MAX_ECHO_CHARS) -> str:
    """A client's value in an error message: its `repr`, cut (see `cut`)."""
    return cut(repr(value), limit)


class RerankerError(Exception):
    """Base of every error this package raises on purpose."""

    error_type = "internal_error"


class InvalidRequestError(RerankerError):
    """The request breaks a documented rule (a field, a limit)."""

    error_type = "invalid_request"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field

    def renamed(self, names: Mapping[str, str]) -> InvalidRequestError:
        """The same error with the job's part names (keys: `documents`, `query`, ...) replaced by
        the request's field paths, in the message and the field."""
        if not names:
            return self
        keys = sorted(names, key=len, reverse=True)  # `documents[0]` before `documents`
        pattern = re.compile(r"(?<![\w.\]])(" + "|".join(re.escape(k) for k in keys) + r")(?![\w])")

        def swap(text: str) -> str:
            return pattern.sub(lambda m: names[m.group(1)], text)

        copy = type(self).__new__(type(self))
        copy.__dict__.update(self.__dict__)
        copy.args = (swap(str(self)),)
        copy.field = swap(self.field) if self.field is not None else None
        return copy


class AnswerTooLargeError(InvalidRequestError):
    """The answer the request asks for would be over `max_answer_bytes` (refused before any
    work runs)."""

    error_type = "answer_too_large"


class InvalidJsonError(InvalidRequestError):
    """The body is not JSON (bad syntax, undecodable bytes, nested too deeply)."""

    error_type = "invalid_json"


class ModelNotFoundError(InvalidRequestError):
    """The request names a model this server does not serve (only when names are restricted)."""

    error_type = "model_not_found"


class RouteNotFoundError(RerankerError):
    """No route at this path (or not with this method)."""

    error_type = "not_found"


class MethodNotAllowedError(RerankerError):
    error_type = "method_not_allowed"


class UnauthorizedError(RerankerError):
    """An API key is required and the request did not bring the right one."""

    error_type = "unauthorized"
    field = "authorization"


class PayloadTooLargeError(InvalidRequestError):
    """The body is over `max_body_bytes`."""

    error_type = "payload_too_large"


class UnsupportedMediaTypeError(InvalidRequestError):
    """The body is not plain JSON (another Content-Type, or compressed)."""

    error_type = "unsupported_media_type"


class OverloadedError(RerankerError):
    """The queue is full; the client should retry after `retry_after_s`."""

    error_type = "overloaded"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TooManyConnectionsError(RerankerError):
    """More connections are open than `max_connections`; the client should retry later."""

    error_type = "too_many_connections"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestTimeoutError(RerankerError):
    """The request waited plus ran longer than the server's timeout."""

    error_type = "timeout"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestCancelledError(RerankerError):
    """Nobody waits for the answer any more (the client closed the connection): the work was
    dropped. Never sent to anyone; counted and logged as 499."""

    error_type = "client_closed_request"


class ShuttingDownError(RerankerError):
    """The server is draining before it exits (SIGTERM): it admits no new work, and work still
    running at the end of the drain timeout is cut off. Retry after `retry_after_s` (a load
    balancer sends the retry to another replica)."""

    error_type = "shutting_down"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def raise_if_cancelled(cancel: Cancellation | None) -> None:
    """Raise `RequestCancelledError` when the request's handle is set (checked between steps of
    the work, so a request nobody waits for stops at the next one)."""
    if cancel is not None and cancel.cancelled:
        raise RequestCancelledError(f"request cancelled: {cancel.reason}")


class NotReadyError(RerankerError):
    """Models are not loaded (yet, or any more)."""

    error_type = "not_ready"


class ModelLoadError(RerankerError):
    """A model can't be found, fetched or loaded. The message is one line: model, where, fix."""

    error_type = "model_load_error"


class InferenceError(RerankerError):
    """A model failed while scoring (not a recoverable GPU fault)."""

    error_type = "inference_error"
