"""The error hierarchy. Each error has a stable `error_type`; api/errors.py maps them to HTTP."""

from __future__ import annotations


class RerankerError(Exception):
    """Base of every error this package raises on purpose."""

    error_type = "internal_error"


class InvalidRequestError(RerankerError):
    """The request breaks a documented rule (a field, a limit)."""

    error_type = "invalid_request"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class ModelNotFoundError(InvalidRequestError):
    """The request names a model this server does not serve (only when names are restricted)."""

    error_type = "model_not_found"


class UnauthorizedError(RerankerError):
    """An API key is required and the request did not bring the right one."""

    error_type = "unauthorized"


class OverloadedError(RerankerError):
    """The queue is full; the client should retry after `retry_after_s`."""

    error_type = "overloaded"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestTimeoutError(RerankerError):
    """The request waited plus ran longer than the server's timeout."""

    error_type = "timeout"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NotReadyError(RerankerError):
    """Models are not loaded (yet, or any more)."""

    error_type = "not_ready"


class ModelLoadError(RerankerError):
    """A model can't be found, fetched or loaded. The message is one line: model, where, fix."""

    error_type = "model_load_error"


class InferenceError(RerankerError):
    """A model failed while scoring (not a recoverable GPU fault)."""

    error_type = "inference_error"
