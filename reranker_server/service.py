"""`RerankService`: the one object the HTTP layer (and the CLI, and a notebook) talks to.

It owns the models' lifetime (loaded by `start`, released by `close`), admission and the worker
pool, the request limits, cancellation and the drain before shutdown; it answers `RerankJob`s
with `RerankOutcome`s and reports `status()` (models served, devices, GPU gate, schedulers,
cache). Nothing outside it touches the engine or the devices.

    service = RerankService(Settings())
    await service.start()
    outcome = await service.rerank(RerankJob("capital of France?", ["Paris ...", "Berlin ..."], 1))
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .devices import cuda_runtime_available
from .engine.engine import Engine, EngineStatus
from .engine.pool import InferencePool
from .engine.trace import current_trace
from .errors import (
    InvalidRequestError,
    ModelNotFoundError,
    NotReadyError,
    RequestCancelledError,
    ShuttingDownError,
)
from .settings import Settings
from .types import Cancellation, RerankJob, RerankOutcome, job_part_names

logger = logging.getLogger(__name__)

EngineFactory = Callable[[Settings], Engine]

READY_TIMEOUT_S = 10.0
SHUTDOWN_REASON = "the server is shutting down"
# While draining: how often the drain looks at the requests in progress, and how long requests
# cut off at the drain timeout get to answer their 503 (their threads stop within a scheduler
# poll; only tokenization or a model call made without the scheduler runs longer).
DRAIN_POLL_S = 0.05
CUT_OFF_GRACE_S = 10.0


@dataclass(frozen=True)
class ServiceStatus:
    """A snapshot for /health and /metrics."""

    loaded: bool
    cuda_available: bool
    model_load_seconds: float | None
    in_flight: int  # requests admitted, running or queued
    running: int  # requests in a worker thread now
    queued: int  # requests admitted and waiting for a worker
    engine: EngineStatus | None  # None until the models are loaded


class RerankService:
    """See the module docstring. `engine_factory` builds the engine from the settings (default:
    the models the settings name, engine/loader.py; tests hand in engines with fake runners)."""

    def __init__(self, settings: Settings, engine_factory: EngineFactory | None = None) -> None:
        if engine_factory is None:
            from .engine.loader import load_engine

            engine_factory = load_engine
        self.settings = settings
        self._engine_factory = engine_factory
        self._engine: Engine | None = None
        self.pool = InferencePool(settings.runs(), settings.max_queue, settings.request_timeout_s)
        self._cuda_available = False
        self._load_seconds: float | None = None
        self._draining = False
        self._active: set[Cancellation] = set()  # handles of the requests in progress

    # --- lifetime

    async def start(self) -> None:
        """Load and warm up the models (in a thread: the event loop stays free)."""
        self._cuda_available = await asyncio.to_thread(cuda_runtime_available)
        started = time.perf_counter()
        self._engine = await asyncio.to_thread(self._engine_factory, self.settings)
        self._load_seconds = time.perf_counter() - started

    async def drain(self, timeout_s: float) -> None:
        """Stop admitting (new requests get `ShuttingDownError`: 503 + Retry-After, and so does
        readiness), give the requests in progress up to `timeout_s` to finish, then cancel the
        rest: their queued pairs are dropped and they answer `ShuttingDownError` too."""
        if not self._draining:
            self._draining = True
            logger.info(
                "draining: no new requests; %d in progress get up to %g s",
                len(self._active),
                timeout_s,
            )
        deadline = time.monotonic() + timeout_s
        while self._active and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        if not self._active:
            return
        logger.warning(
            "drain timeout: %d requests still in progress are cut off (503)", len(self._active)
        )
        for cancel in list(self._active):
            cancel.cancel(SHUTDOWN_REASON)
        deadline = time.monotonic() + CUT_OFF_GRACE_S
        while self._active and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)

    @property
    def draining(self) -> bool:
        return self._draining

    async def close(self) -> None:
        """Cut off what is still running (see `drain`), then release the models."""
        await self.drain(0)
        await asyncio.to_thread(self.pool.shutdown)
        engine, self._engine = self._engine, None
        if engine is not None:
            await asyncio.to_thread(engine.close)

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise NotReadyError("models are not loaded yet; retry shortly")
        return self._engine

    # --- answering

    async def rerank(self, job: RerankJob) -> RerankOutcome:
        """Check the job against the limits, then run the cascade in a worker thread."""
        self._check_open()
        engine = self.engine
        self.check(job)
        (job,) = self._admit([job])
        outcomes = await self._run(lambda: [engine.rerank(job)], [job])
        return outcomes[0]

    async def rerank_batch(self, jobs: Sequence[RerankJob]) -> list[RerankOutcome]:
        """Several jobs as one unit of work (one queue slot), answered in order."""
        self._check_open()
        engine = self.engine
        for position, job in enumerate(jobs):
            try:
                self.check(job)
            except InvalidRequestError as exc:
                raise exc.renamed(job_part_names(position)) from exc
        admitted = self._admit(jobs)
        return await self._run(lambda: engine.rerank_many(admitted), admitted)

    def _check_open(self) -> None:
        if self._draining:
            raise ShuttingDownError(
                "server is shutting down and takes no new requests; retry (another replica "
                "answers)",
            )

    def _admit(self, jobs: Sequence[RerankJob]) -> list[RerankJob]:
        """The jobs with the request's deadline and a cancellation handle."""
        deadline = self.pool.deadline_for()
        return [
            dataclasses.replace(job, deadline=deadline, cancel=job.cancel or Cancellation())
            for job in jobs
        ]

    async def _run(
        self, work: Callable[[], list[RerankOutcome]], jobs: Sequence[RerankJob]
    ) -> list[RerankOutcome]:
        trace = current_trace.get()
        if trace is not None and jobs:
            trace.use_cache = jobs[0].use_cache
            trace.top_k, trace.query, trace.documents = jobs[0].top_k, jobs[0].query, jobs[0].texts
        handles = {job.cancel for job in jobs if job.cancel is not None}
        self._active |= handles
        try:
            outcomes = await self.pool.run(work, jobs[0].deadline if jobs else None)
        except RequestCancelledError as exc:
            if any(cancel.reason == SHUTDOWN_REASON for cancel in handles):
                raise ShuttingDownError(
                    "server shut down before the request finished (drain timeout); retry"
                ) from exc
            raise
        except BaseException as exc:  # a timeout, or the caller went away: drop queued work
            gone = isinstance(exc, asyncio.CancelledError)
            reason = "client closed the connection" if gone else type(exc).__name__
            for cancel in handles:
                cancel.cancel(reason)
            raise
        finally:
            self._active -= handles
        if trace is not None:
            trace.outcomes.extend(outcomes)
        return outcomes

    def check(self, job: RerankJob) -> None:
        """Raise InvalidRequestError naming the job's part and the limit it breaks."""
        limits = self.settings
        if not job.query.strip():
            raise InvalidRequestError("query must not be empty", field="query")
        if len(job.query) > limits.max_query_chars:
            raise InvalidRequestError(
                f"query has {len(job.query)} characters; the limit is {limits.max_query_chars} "
                "(max_query_chars)",
                field="query",
            )
        if len(job.texts) > limits.max_documents:
            raise InvalidRequestError(
                f"documents has {len(job.texts)} items; the limit is {limits.max_documents} "
                "(max_documents)",
                field="documents",
            )
        for i, text in enumerate(job.texts):
            if len(text) > limits.max_document_chars:
                raise InvalidRequestError(
                    f"documents[{i}] has {len(text)} characters; the limit is "
                    f"{limits.max_document_chars} (max_document_chars)",
                    field=f"documents[{i}]",
                )
        if job.candidates is not None and job.candidates > limits.max_candidates:
            raise InvalidRequestError(
                f"candidates is {job.candidates}; the limit is {limits.max_candidates} "
                "(RERANKER_MAX_CANDIDATES)",
                field="candidates",
            )

    def check_model(self, name: str | None) -> None:
        """Refuse a model name only when the settings restrict the names (`accepted_models`)."""
        accepted = self.settings.accepted_model_names()
        if name is None or not accepted:
            return
        served = accepted | {self.settings.stage1_model, self.settings.stage2_model}
        served |= self.engine.status().model_names()
        if name not in served:
            raise ModelNotFoundError(
                f"model {name!r} is not served here; ask for one of: "
                f"{', '.join(sorted(accepted))} (accepted_models)",
                field="model",
            )

    def served_model(self, outcome: RerankOutcome) -> str:
        """The model that produced the final order."""
        return outcome.stages[-1].name if outcome.stages else self.final_model()

    def final_model(self) -> str:
        """The model that orders answers when it can run: stage 2, else stage 1."""
        status = self.engine.status()
        return (status.stage2 or status.stage1).name

    def final_precision(self) -> str:
        status = self.engine.status()
        return (status.stage2 or status.stage1).precision

    def model_names(self) -> list[str]:
        """Names requests may send as `model`: the models served, and the accepted aliases."""
        names = self.engine.status().model_names() | self.settings.accepted_model_names()
        return sorted(names)

    # --- reporting

    def status(self) -> ServiceStatus:
        """Cheap: reads counters, runs no model, touches no device."""
        return ServiceStatus(
            loaded=self._engine is not None,
            cuda_available=self._cuda_available,
            model_load_seconds=self._load_seconds,
            in_flight=self.pool.pending,
            running=self.pool.running,
            queued=self.pool.queued,
            engine=self._engine.status() if self._engine is not None else None,
        )

    async def gpu_state(self) -> dict[str, Any]:
        """The GPU gate's state (device memory is read off the event loop: a wedged CUDA
        context must not freeze the server)."""
        engine = self._engine
        if engine is None:
            return {}
        return await asyncio.to_thread(engine.gate.state)

    async def check_ready(self) -> None:
        """One pair through stage 1, not through the request queue (a busy server is still
        ready). Raises NotReadyError, or ShuttingDownError once draining."""
        self._check_open()
        engine = self.engine
        try:
            await asyncio.wait_for(
                asyncio.to_thread(engine.stage1.score, "ready", ["ready"]), READY_TIMEOUT_S
            )
        except TimeoutError as exc:
            raise NotReadyError(f"stage 1 did not answer within {READY_TIMEOUT_S:g} s") from exc
