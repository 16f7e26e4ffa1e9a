"""ASGI middleware: request id, timing headers, Prometheus metrics and one log line per request.

- `X-Request-ID`: a sane incoming value is kept, else one is generated; either way it is echoed,
  on every answer (an unexpected error's 500 is answered here, its traceback logged once).
- `X-Process-Time` (seconds to the response head) on every response; `Server-Timing` (queue wait
  and each stage, in ms) on every answer that ran jobs: one entry per stage name, summed over the
  request's jobs, so its size does not grow with the request's.
- Cache opt-out per request: `Cache-Control: no-cache` / `no-store` or `X-Reranker-Cache: off`.
- One log record per request on the `reranker_server.access` logger (health and metrics routes at
  DEBUG, the rest at INFO) with the route, status, documents, tokens, top_k, cascade, backend,
  plan (and why), stage timings, cache hits and the client address. Query and document text only
  with `log_payloads`.

After a request with a body of 1 MiB or more, malloc's free memory is returned to the system
(memory.py), so that one big request does not leave the RSS up.

Every dialect answers through one path (api/answer.py), which hands the middleware its jobs and
their outcomes as data (`Answered`, in the ASGI scope); each outcome carries its own stage
timings, queue wait and plan, and everything here is built from them.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Iterator, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

from starlette.routing import BaseRoute, compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import RerankerError
from ..memory import MemoryTrimmer
from ..metrics import Metrics
from ..types import RerankJob, RerankOutcome
from .errors import error_response

access_logger = logging.getLogger("reranker_server.access")
error_logger = logging.getLogger("reranker_server.api.errors")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
_QUIET_DIALECTS = ("health", "metrics")
_CACHE_OFF = ("off", "false", "0", "no", "bypass")
ANSWER_KEY = "reranker.answer"  # the ASGI scope's key for `Answered`


@dataclass(frozen=True)
class Answered:
    """What the answer path hands the middleware: the dialect that served the request, its jobs
    and their outcomes (none when it failed)."""

    dialect: str
    jobs: tuple[RerankJob, ...] = ()
    outcomes: tuple[RerankOutcome, ...] = ()


def record_answer(scope: MutableMapping[str, Any], answered: Answered) -> None:
    scope[ANSWER_KEY] = answered


def stage_seconds(outcomes: Sequence[RerankOutcome]) -> dict[str, float]:
    """Seconds per stage name ("stage1", "stage2"), summed over the outcomes, in the order the
    stages first ran."""
    totals: dict[str, float] = {}
    for outcome in outcomes:
        for stage in outcome.stages:
            totals[stage.stage] = totals.get(stage.stage, 0.0) + stage.seconds
    return totals


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


def cache_wanted(headers: dict[str, str]) -> bool:
    """False when the client opted out of the score cache for this request."""
    if headers.get("x-reranker-cache", "").strip().lower() in _CACHE_OFF:
        return False
    directives = {d.strip().lower() for d in headers.get("cache-control", "").split(",")}
    return not directives & {"no-cache", "no-store"}


def request_id(headers: dict[str, str]) -> str:
    incoming = headers.get("x-request-id", "").strip()
    return incoming if _REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex


def server_timing(outcomes: Sequence[RerankOutcome]) -> str:
    """`Server-Timing` value: queue wait and each stage, in milliseconds, summed over the
    outcomes (a batch's jobs, a score request's pairs): one entry per name, whatever the size."""
    if not outcomes:
        return ""
    queue = sum(o.queue_wait_s for o in outcomes)
    parts = [f"queue;dur={queue * 1000:.2f}"]
    parts += [f"{name};dur={s * 1000:.2f}" for name, s in stage_seconds(outcomes).items()]
    return ", ".join(parts)


def _dialect(route: object) -> str:
    """The dialect a route serves: its first OpenAPI tag ("native", "cohere", "health", ...),
    else "other". (A TEI body on /rerank is relabelled "tei" by the answer path.)"""
    tags = getattr(route, "tags", None)
    return str(tags[0]) if tags else "other"


def _route_table(
    routes: list[BaseRoute], prefix: str = ""
) -> Iterator[tuple[re.Pattern[str], str, str]]:
    """(path regex, route template, dialect) of every endpoint, included routers flattened."""
    for route in routes:
        inner = getattr(route, "original_router", None)  # FastAPI's included routers
        if inner is not None:
            context = getattr(route, "include_context", None)
            yield from _route_table(inner.routes, prefix + getattr(context, "prefix", ""))
        elif isinstance(getattr(route, "path", None), str) and hasattr(route, "endpoint"):
            template = prefix + route.path  # type: ignore[attr-defined]
            regex, _, _ = compile_path(template)
            yield regex, template, _dialect(route)


class RequestTelemetry:
    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        routes: list[BaseRoute],
        log_payloads: bool = False,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes
        self.log_payloads = log_payloads
        self._table: list[tuple[re.Pattern[str], str, str]] | None = None
        self.trimmer = MemoryTrimmer()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = _headers(scope)
        rid = request_id(headers)
        status = 500
        answered = client_gone = False
        received = 0

        async def receive_watching() -> Message:
            nonlocal client_gone, received
            message = await receive()
            received += len(message.get("body", b""))
            client_gone = client_gone or message["type"] == "http.disconnect"
            return message

        async def send_with_headers(message: Message) -> None:
            nonlocal status, answered
            if message["type"] == "http.response.start":
                status, answered = int(message["status"]), True
                extra = [
                    (b"x-request-id", rid.encode("latin-1")),
                    (b"x-process-time", f"{time.perf_counter() - started:.6f}".encode()),
                ]
                timing = server_timing(_answered(scope).outcomes)
                if timing:
                    extra.append((b"server-timing", timing.encode("latin-1")))
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        try:
            await self.app(scope, receive_watching, send_with_headers)
        except Exception:
            # The one traceback of an unexpected error; answered here, not by Starlette or
            # uvicorn (which would log it again and send a 500 without X-Request-ID).
            error_logger.error(
                "unhandled error", exc_info=True, extra={"fields": {"request_id": rid}}
            )
            if not answered:
                response = error_response(RerankerError("internal server error"))
                await response(scope, receive, send_with_headers)
            # else the answer was cut short: uvicorn closes the connection
        finally:
            if client_gone and not answered:  # left before any answer (mid-body, say)
                status = 499
            seconds = time.perf_counter() - started
            route, dialect = self._route(scope)
            record = _answered(scope)
            dialect = record.dialect or dialect
            self.metrics.observe_request(route, dialect, status, seconds, record.outcomes)
            self._log(scope, rid, route, dialect, status, seconds, record)
            self.trimmer.after_request(received)  # a big body: give the memory back

    def _route(self, scope: Scope) -> tuple[str, str]:
        """Route template and dialect (the api module that owns the route); bounded values."""
        route = scope.get("route")
        if route is not None and hasattr(route, "path"):
            return route.path, _dialect(route)
        # Answered before routing (the guard's 413 / 415): find the route it was meant for.
        if self._table is None:
            self._table = list(_route_table(self.routes))
        path = scope.get("path", "")
        for regex, template, dialect in self._table:
            if regex.match(path):
                return template, dialect
        return "unmatched", "none"

    def _log(
        self,
        scope: Scope,
        rid: str,
        route: str,
        dialect: str,
        status: int,
        seconds: float,
        record: Answered,
    ) -> None:
        level = logging.DEBUG if dialect in _QUIET_DIALECTS else logging.INFO
        if not access_logger.isEnabledFor(level):
            return
        client = scope.get("client")
        fields: dict[str, Any] = {
            "request_id": rid,
            "method": scope["method"],
            "route": route,
            "dialect": dialect,
            "status": status,
            "duration_ms": round(seconds * 1000, 3),
            "client": client[0] if client else None,
        }
        outcomes, jobs = record.outcomes, record.jobs
        if outcomes:
            fields.update(
                queue_wait_ms=round(sum(o.queue_wait_s for o in outcomes) * 1000, 3),
                documents=sum(o.documents for o in outcomes),
                tokens=sum(o.tokens for o in outcomes),
                top_k=jobs[0].top_k if jobs else None,
                cascade=outcomes[-1].cascade or None,
                backend=outcomes[-1].backend,
                fallback=outcomes[-1].fallback,
                plan=outcomes[-1].plan,
                plan_reason=outcomes[-1].plan_reason,
                stages_ms={k: round(v * 1000, 3) for k, v in stage_seconds(outcomes).items()},
                cache="on" if not jobs or jobs[0].use_cache else "off",
                cache_hits=sum(o.cache_hits for o in outcomes),
                cache_misses=sum(o.cache_misses for o in outcomes),
            )
            if self.log_payloads and jobs:
                fields["query"] = jobs[0].query
                fields["document_texts"] = list(jobs[0].texts)
        access_logger.log(
            level,
            "%s %s %d %.1f ms",
            scope["method"],
            route,
            status,
            seconds * 1000,
            extra={"fields": fields},
        )


def _answered(scope: Scope) -> Answered:
    found = scope.get(ANSWER_KEY)
    return found if isinstance(found, Answered) else _NOTHING


_NOTHING = Answered("")
