"""`RerankService`: the one object the HTTP layer (and the CLI, and a notebook) talks to.

It owns the models' lifetime (loaded by `start`, released by `close`), admission and the worker
pool, the request limits, cancellation and the drain before shutdown; it answers `RerankJob`s
with `RerankOutcome`s (each with its own stage timings, queue wait and plan) and reports
`status()`: a frozen snapshot of the models served, devices, GPU gate, schedulers and cache. It
holds one engine per named cascade (cascade_file.py) and runs each job on the cascade its `model`
picks. Nothing outside it touches the engines or the devices.

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

from .admission import built_jobs, check_job, check_totals
from .devices import cuda_runtime_available
from .engine.cascades import Cascades, ServedCascade
from .engine.engine import Engine
from .engine.pool import InferencePool
from .errors import (
    InvalidRequestError,
    ModelNotFoundError,
    NotReadyError,
    RequestCancelledError,
    ShuttingDownError,
    cut,
    shown,
)
from .runners.base import score
from .settings import Settings
from .types import (
    Cancellation,
    CascadeStatus,
    RerankJob,
    RerankOutcome,
    RerankWork,
    ServiceStatus,
)

logger = logging.getLogger(__name__)

# Builds the engines from the settings: several cascades, or one engine (the `default` cascade).
EngineFactory = Callable[[Settings], Cascades | Engine]

READY_TIMEOUT_S = 10.0
SHUTDOWN_REASON = "the server is shutting down"
# While draining: how often the drain looks at the requests in progress, and how long requests
# cut off at the drain timeout get to answer their 503 (their threads stop within a scheduler
# poll; only tokenization or a model call made without the scheduler runs longer).
DRAIN_POLL_S = 0.05
CUT_OFF_GRACE_S = 10.0
# A 404 for an unknown model lists at most this many valid names, each cut to this length.
MAX_LISTED_NAMES = 20
MAX_NAME_CHARS = 80


class RerankService:
    """See the module docstring. `engine_factory` builds the engines from the settings (default:
    the cascades the settings name, engine/loader.py; tests hand in engines with fake runners)."""

    def __init__(self, settings: Settings, engine_factory: EngineFactory | None = None) -> None:
        if engine_factory is None:
            from .engine.loader import load_cascades

            engine_factory = load_cascades
        self.settings = settings
        self._engine_factory = engine_factory
        self._cascades: Cascades | None = None
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
        built = await asyncio.to_thread(self._engine_factory, self.settings)
        self._cascades = Cascades.single(built) if isinstance(built, Engine) else built
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
        cascades, self._cascades = self._cascades, None
        if cascades is not None:
            await asyncio.to_thread(cascades.close)

    @property
    def cascades(self) -> Cascades:
        if self._cascades is None:
            raise NotReadyError("models are not loaded yet; retry shortly")
        return self._cascades

    # --- answering

    async def answer(self, work: RerankWork) -> list[RerankOutcome]:
        """Admit a request's work as a whole (admission.py: totals, then each job and its model),
        then run its jobs as one unit of work in a worker thread (one queue slot), each on the
        cascade its `model` picks; the outcomes come back in the jobs' order. Every error names
        the request's own field (`work.fields`)."""
        self._check_open()
        check_totals(work, self.settings)
        self.cascade_for(work.model)
        jobs = built_jobs(work)
        cascades = []
        for position, job in enumerate(jobs):
            try:
                check_job(job, self.settings)
                cascades.append(self.cascade_for(job.model))
            except InvalidRequestError as exc:
                raise exc.renamed(work.fields(position)) from exc
        admitted = self._admit(jobs)

        def run() -> list[RerankOutcome]:
            outcomes = []
            for position, (cascade, job) in enumerate(zip(cascades, admitted, strict=True)):
                try:
                    outcomes.append(_answer(cascade, job))
                except InvalidRequestError as exc:
                    raise exc.renamed(work.fields(position)) from exc
            return outcomes

        return await self._run(run, admitted)

    async def rerank(self, job: RerankJob) -> RerankOutcome:
        """One job (the CLI, a notebook): `answer` with work of this job alone."""
        (outcome,) = await self.answer(RerankWork.of([job]))
        return outcome

    async def rerank_batch(self, jobs: Sequence[RerankJob]) -> list[RerankOutcome]:
        """Several jobs as one unit of work, answered in order (errors name `jobs[i]`)."""
        return await self.answer(RerankWork.of(jobs, batch=True))

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
        """Run `work` in a request thread; the first outcome's queue wait gets the time the
        request waited for that thread (the later jobs of a batch waited for their elders only)."""
        submitted = time.perf_counter()
        started: list[float] = []

        def timed() -> list[RerankOutcome]:
            started.append(time.perf_counter())
            return work()

        handles = {job.cancel for job in jobs if job.cancel is not None}
        self._active |= handles
        try:
            outcomes = await self.pool.run(timed, jobs[0].deadline if jobs else None)
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
        if outcomes and started:
            first = outcomes[0]
            waited = first.queue_wait_s + started[0] - submitted
            outcomes[0] = dataclasses.replace(first, queue_wait_s=waited)
        return outcomes

    def cascade_for(self, model: str | None) -> ServedCascade:
        """The cascade a request's `model` picks: by cascade name, alias or model name, else the
        default one; when the settings restrict the names (`accepted_models`), an unknown name
        is refused (ModelNotFoundError, 404)."""
        cascades = self.cascades
        found = cascades.find(model)
        if found is not None:
            return found
        accepted = self.settings.accepted_model_names()
        if model is None or not accepted or model in accepted or model in self._setting_models():
            return cascades.default
        names = self.model_names()
        listed = ", ".join(cut(name, MAX_NAME_CHARS) for name in names[:MAX_LISTED_NAMES])
        more = f" and {len(names) - MAX_LISTED_NAMES} more" if len(names) > MAX_LISTED_NAMES else ""
        raise ModelNotFoundError(
            f"model {shown(model)} is not served here; ask for one of: {listed}{more} "
            "(GET /v1/models lists them: the cascades, their models and accepted_models)",
            field="model",
        )

    def _setting_models(self) -> set[str]:
        """The stage settings' model names, when they are what the server runs (no cascades
        file: its cascades say which models run, and the stage settings are unused)."""
        if self.settings.cascades is not None:
            return set()
        return {self.settings.stage1_model, self.settings.stage2_model}

    def served_model(self, outcome: RerankOutcome) -> str:
        """The model that produced the final order."""
        return outcome.stages[-1].name if outcome.stages else self.final_model(outcome.cascade)

    def final_model(self, model: str | None = None) -> str:
        """The model that orders the answers of the cascade `model` picks when it can run:
        stage 2, else stage 1."""
        status = self.cascades.pick(model).engine.status()
        return (status.stage2 or status.stage1).name

    def final_precision(self, model: str | None = None) -> str:
        status = self.cascades.pick(model).engine.status()
        return (status.stage2 or status.stage1).precision

    def model_names(self) -> list[str]:
        """Names requests may send as `model`: cascade names and aliases, the models served,
        and the accepted names."""
        return sorted(self.cascades.names() | self.settings.accepted_model_names())

    # --- reporting

    def status(self, read_gpu_memory: bool = False) -> ServiceStatus:
        """A frozen snapshot. Cheap: reads counters, runs no model; touches the device only with
        `read_gpu_memory` (then call it off the event loop, as `snapshot` does)."""
        cascades = self._cascades
        if cascades is None:
            return ServiceStatus(
                loaded=False,
                cuda_available=self._cuda_available,
                model_load_seconds=self._load_seconds,
                in_flight=self.pool.pending,
                running=self.pool.running,
                queued=self.pool.queued,
                engine=None,
            )
        per_cascade = tuple(
            CascadeStatus(c.name, c.aliases, c is cascades.default, c.engine.status())
            for c in cascades
        )
        return ServiceStatus(
            loaded=True,
            cuda_available=self._cuda_available,
            model_load_seconds=self._load_seconds,
            in_flight=self.pool.pending,
            running=self.pool.running,
            queued=self.pool.queued,
            engine=per_cascade[0].engine,
            cascades=per_cascade,
            schedulers=tuple(s.status(name) for name, s in cascades.schedulers().items()),
            gpu=cascades.default.engine.gate.snapshot(read_memory=read_gpu_memory),
        )

    async def snapshot(self) -> ServiceStatus:
        """`status` with the GPU's memory read, in a thread (a wedged CUDA context must not
        freeze the event loop)."""
        return await asyncio.to_thread(self.status, True)

    async def check_ready(self) -> None:
        """One pair through each stage-1 model, not through the request queue (a busy server is
        still ready). Raises NotReadyError, or ShuttingDownError once draining."""
        self._check_open()
        stage1 = {id(c.engine.stage1): c.engine.stage1 for c in self.cascades}
        try:
            await asyncio.wait_for(
                asyncio.to_thread(
                    lambda: [score(runner, "ready", ["ready"]) for runner in stage1.values()]
                ),
                READY_TIMEOUT_S,
            )
        except TimeoutError as exc:
            raise NotReadyError(f"stage 1 did not answer within {READY_TIMEOUT_S:g} s") from exc


def _answer(cascade: ServedCascade, job: RerankJob) -> RerankOutcome:
    """The job run on the cascade's engine; the outcome names the cascade."""
    return dataclasses.replace(cascade.engine.rerank(job), cascade=cascade.name)
