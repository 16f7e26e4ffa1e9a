"""What one request did, collected on the way without threading it through every signature.

The HTTP middleware opens a `RequestTrace` in a context variable; the answer path names the
dialect; `InferencePool.run` carries the context into its worker thread and records the queue
wait; the service records the job and its outcome. So every dialect gets logs, metrics and timing
headers without doing anything. Tracing only: nothing the work depends on travels here. Outside
HTTP (tests, notebooks) there is no trace and nothing is recorded.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field

from ..types import RerankOutcome


@dataclass
class RequestTrace:
    """Mutable record of one request, filled by the answer path, the pool and the service."""

    dialect: str | None = None  # set by the answer path (native, tei, cohere, batch)
    use_cache: bool = True
    queue_wait_s: float | None = None
    top_k: int | None = None
    query: str | None = None  # kept for debug logs only (Settings.log_payloads)
    documents: Sequence[str] = ()
    outcomes: list[RerankOutcome] = field(default_factory=list)


current_trace: ContextVar[RequestTrace | None] = ContextVar("reranker_trace", default=None)
