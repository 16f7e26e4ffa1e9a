"""`Engine`: the two-stage cascade. Stage 1 scores everything, stage 2 reorders the best
candidates. Under `RERANKER_STAGE1=auto` a request may skip stage 1 and have stage 2 on the GPU
score every document when that is estimated to be sooner (the plan: engine/plan.py).

Synchronous and HTTP-free: it takes a `RerankJob` (types.py) and returns a `RerankOutcome`; a test,
the CLI or a notebook can drive it directly. The service (service.py) runs it in a request thread
through `engine.pool.InferencePool`. With a `Scheduler` (the loader builds one) model calls go
through its FIFO queue and worker threads, batched with other requests' pairs, in the job's place
in line and within its deadline; without one the runners are called directly in the caller's
thread.

With a score cache (engine/cache.py) each stage looks its pairs up first and sends only the missing
ones to its model; stage 1 and stage 2 (per device) are separate cache namespaces.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from ..devices import GpuGate
from ..errors import InferenceError, InvalidRequestError, RerankerError, raise_if_cancelled
from ..runners.base import Runner, runner_stats, score
from ..types import (
    Backend,
    CacheStatus,
    EngineStatus,
    FallbackReason,
    LongDocPolicy,
    RerankJob,
    RerankOutcome,
    RunnerStatus,
    ScoredDocument,
    StageReport,
    job_part_names,
)
from .cache import ScoreCache, namespace, pair_keys
from .plan import (
    ALWAYS,
    CALIBRATION_QUERY,
    CPU_ROLE,
    GPU_ROLE,
    NO_GPU,
    Plan,
    Stage1Mode,
    StageCosts,
    calibration_texts,
    choose,
    failed,
    word_tokens,
)
from .scheduler import Lane, Scheduler, Scored
from .stage1_stream import Stage1Stream
from .windows import Windower, WindowPlan

logger = logging.getLogger(__name__)

PROBE_QUERY = "probe"
PROBE_DOCUMENT = "a one-pair forward pass to see whether the GPU works again"


def _rank(scores: Sequence[float]) -> list[int]:
    """Positions best first; ties keep request order."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


def _runner_status(runner: Runner) -> RunnerStatus:
    stats = tuple(runner_stats(runner).items())
    return RunnerStatus(runner.name, runner.device, runner.precision, stats)


def _checked(scores: list[float], expected: int, runner: Runner) -> list[float]:
    if len(scores) != expected or not all(math.isfinite(s) for s in scores):
        raise InferenceError(f"the {runner.name} model returned invalid scores")
    return scores


class Engine:
    """Runs the cascade. Never mutates its inputs; scores leave as Python floats."""

    def __init__(
        self,
        stage1: Runner,
        *,
        gate: GpuGate,
        stage2_gpu: Runner | None = None,
        stage2_cpu: Runner | None = None,
        candidates: int = 10,
        cache: ScoreCache | None = None,
        cache_namespaces: Mapping[str, str] | None = None,
        windows: Windower | None = None,
        long_documents: LongDocPolicy | None = None,
        scheduler: Scheduler | None = None,
        gpu_scheduler: Scheduler | None = None,
        lanes: Mapping[str, Lane] | None = None,
        stage1_mode: Stage1Mode = "always",
        costs: StageCosts | None = None,
        stage2_home: Literal["gpu", "cpu"] | None = "gpu",
    ) -> None:
        """`cache`: score cache (None: none). `cache_namespaces`: "stage1", "stage2_gpu",
        "stage2_cpu" -> namespace naming the model identity and its settings (the loader passes
        file fingerprints; by default the runner's name and device). `windows`: cuts long
        documents per `LongDocPolicy` (engine/windows.py; it also counts the tokens); None:
        documents go to the runners whole. `long_documents`: the policy of requests that bring
        none. `scheduler`: runs the CPU stages (None: call runners directly); `gpu_scheduler`:
        runs stage 2 on the GPU (None: the CPU one). `lanes`: role -> batch policy (default:
        the runner's own `max_pairs` and `batch_tokens`). `stage1_mode`: `always` runs the
        cascade, `auto` lets each request skip stage 1 when the GPU is estimated sooner, from
        `costs` (seconds per token per stage, fed by every request; engine/plan.py).
        `stage2_home`: where the configuration means stage 2 to run ("cpu": an answer from
        `stage2_cpu` is no fallback; "gpu": not running there is one, `no_gpu` and the rest;
        None: no stage 2 is configured, so stage 1 alone is no fallback)."""
        self.stage1 = stage1
        self.stage2_gpu = stage2_gpu
        self.stage2_cpu = stage2_cpu
        self.gate = gate
        self.candidates = candidates
        self.cache = cache
        self.windows = windows
        self.long_documents = long_documents or LongDocPolicy()
        self._namespaces = {
            role: namespace(role, runner.name, runner.device)
            for role, runner in (
                ("stage1", stage1),
                ("stage2_gpu", stage2_gpu),
                ("stage2_cpu", stage2_cpu),
            )
            if runner is not None
        }
        self._namespaces.update(cache_namespaces or {})
        self.scheduler = scheduler
        self.gpu_scheduler = gpu_scheduler or scheduler
        self._lanes = dict(lanes or {})
        self.stage1_mode = stage1_mode
        self.costs = costs if costs is not None else StageCosts()
        self.stage2_home = stage2_home

    def _lane(self, role: str, runner: Runner) -> Lane:
        if role not in self._lanes:
            self._lanes[role] = Lane.of(role, runner)
        return self._lanes[role]

    def _score(
        self,
        runner: Runner,
        role: str,
        query: str,
        texts: Sequence[str],
        job: RerankJob | None,
        items: Sequence[Any] | None = None,
    ) -> Scored:
        """Scores of `texts` from `runner` (through the scheduler when there is one, in the
        job's place in line), the tokens the model read and how long they waited. `items`: the
        pairs as the runner prepared them already (the window plan's, for stage 1); None:
        tokenized here."""
        raise_if_cancelled(job.cancel if job else None)
        pairs = [(query, t) for t in texts]
        scheduler = self.gpu_scheduler if role == "stage2_gpu" else self.scheduler
        if scheduler is None:  # the runner's own count of the tokens, as the scheduler's
            tokens = sum(runner.length(item) for item in runner.prepare(pairs))
            return Scored(score(runner, query, list(texts)), tokens, 0.0)
        return scheduler.score(
            self._lane(role, runner),
            pairs,
            order=job.order if job else None,
            deadline=job.deadline if job else None,
            cancel=job.cancel if job else None,
            items=items,
        )

    def schedulers(self) -> dict[str, Scheduler]:
        """The schedulers it uses: "cpu", and "gpu" when stage 2 on the GPU has its own."""
        found = {"cpu": self.scheduler, "gpu": self.gpu_scheduler}
        return {
            name: s
            for name, s in found.items()
            if s is not None and (name == "cpu" or s is not self.scheduler)
        }

    def status(self) -> EngineStatus:
        """What it serves and how busy it is, as data (reads counters only)."""
        cache = None
        if self.cache is not None:
            stats = self.cache.stats()
            cache = CacheStatus(
                self.cache.kind,
                bool(stats["available"]),
                int(stats["errors"]),
                stats.get("entries"),
                stats.get("bytes"),
            )
        return EngineStatus(
            stage1=_runner_status(self.stage1),
            stage2_gpu=_runner_status(self.stage2_gpu) if self.stage2_gpu else None,
            stage2_cpu=_runner_status(self.stage2_cpu) if self.stage2_cpu else None,
            cache=cache,
            candidates=self.candidates,
            schedulers=tuple(s.status(name) for name, s in self.schedulers().items()),
        )

    def close(self) -> None:
        """Stop the scheduler threads (queued pairs are dropped; a running batch finishes)."""
        for scheduler in {self.scheduler, self.gpu_scheduler} - {None}:
            scheduler.close()  # type: ignore[union-attr]

    def rerank(self, job: RerankJob) -> RerankOutcome:
        """The job's best `min(top_k, len(texts))` documents, best first."""
        documents = job.texts
        policy = job.policy or self.long_documents
        if self.windows is None or not documents:
            return self._rerank(WindowPlan.whole(job.query, documents), job)
        if self.scheduler is None or self.stage1_mode == "auto":  # the plan decides first
            return self._rerank(self.windows.plan(job.query, documents, policy, job.cancel), job)
        # Stage 1 starts on each group of windows as soon as it is tokenized.
        use_cache = job.use_cache and self.cache is not None
        stream = Stage1Stream(
            self.scheduler.open(
                self._lane(CPU_ROLE, self.stage1),
                order=job.order,
                deadline=job.deadline,
                cancel=job.cancel,
            ),
            self.cache if use_cache else None,
            self._namespaces["stage1"],
        )
        try:
            plan = self.windows.plan(job.query, documents, policy, job.cancel, sink=stream)
            return self._rerank(plan, job, stream)
        except BaseException:
            stream.drop()  # nobody waits for what was queued
            raise

    def rerank_many(self, jobs: Sequence[RerankJob]) -> list[RerankOutcome]:
        """`rerank` for several jobs in one call, answered in order.

        The batch route runs this as one unit of work in the pool, so a batch takes one queue
        slot and one worker instead of competing with itself.
        """
        outcomes = []
        for position, job in enumerate(jobs):
            try:
                outcomes.append(self.rerank(job))
            except InvalidRequestError as exc:
                raise exc.renamed(job_part_names(position)) from exc
        return outcomes

    def _rerank(
        self, plan: WindowPlan, job: RerankJob, stream: Stage1Stream | None = None
    ) -> RerankOutcome:
        """The request's plan over `plan`'s windows; a document's score is its best window's.
        `stream`: stage 1 already under way (the cascade, in `always` mode)."""
        if not job.texts:
            return RerankOutcome(results=[], backend="cpu")
        use_cache = job.use_cache and self.cache is not None
        choice = self._choose(plan)
        fault: FallbackReason | None = None
        if choice.name == "gpu_only":
            outcome, fault = self._gpu_only(plan, job, choice, use_cache)
            if outcome is not None:
                return outcome
            choice = failed(choice, fault or "cuda_error")
        return self._cascade(plan, job, choice, use_cache, fault, stream)

    def _choose(self, plan: WindowPlan) -> Plan:
        """`always`: the cascade. `auto`: skip stage 1 when the GPU is usable and estimated
        sooner over all the request's pairs (engine/plan.py)."""
        if self.stage1_mode != "auto":
            return ALWAYS
        if self.stage2_gpu is None:
            return NO_GPU
        tokens = plan.pair_tokens or word_tokens(plan.query, plan.texts)
        return choose(
            gate=self.gate.check(probe=self._probe),
            costs=self.costs,
            tokens=sum(tokens),
            pairs=len(plan.texts),
            gpu_queued=self.gpu_scheduler.queued if self.gpu_scheduler is not None else 0,
            cpu_queued=self.scheduler.queued if self.scheduler is not None else 0,
        )

    def _probe(self) -> None:
        """One pair through the GPU model; it queues like any pair: never two threads in the
        GPU model at once."""
        if self.stage2_gpu is not None:
            self._score(self.stage2_gpu, GPU_ROLE, PROBE_QUERY, [PROBE_DOCUMENT], None)

    def _gpu_only(
        self, plan: WindowPlan, job: RerankJob, choice: Plan, use_cache: bool
    ) -> tuple[RerankOutcome | None, FallbackReason | None]:
        """Stage 2 on the GPU scores every window, stage 1 does not run. Returns the outcome,
        or None and the device fault when the GPU failed (the caller runs the cascade)."""
        documents = job.texts
        stages: list[StageReport] = []
        scores, fault = self._try_gpu(
            plan.query, plan.texts, stages, use_cache, job, plan.pair_tokens
        )
        if scores is None:
            return None, fault
        best = plan.best(range(len(plan.texts)), scores)
        order = _rank([best[i][0] for i in range(len(documents))])
        results = [
            ScoredDocument(i, documents[i], best[i][0], plan.spans[best[i][1]])
            for i in order[: job.top_k]
        ]
        outcome = RerankOutcome(
            results=results,
            backend="gpu",
            stages=stages,
            documents=len(documents),
            tokens=0,  # stage 1 did not run
            windows=len(plan.texts),
            pair_tokens=sum(plan.pair_tokens or ()),
            plan=choice.name,
            plan_reason=choice.reason,
            plan_chosen=self.stage1_mode == "auto",
            queue_wait_s=sum(stage.queued_s for stage in stages),
        )
        return outcome, None

    def _cascade(
        self,
        plan: WindowPlan,
        job: RerankJob,
        choice: Plan,
        use_cache: bool,
        gpu_fault: FallbackReason | None = None,
        stream: Stage1Stream | None = None,
    ) -> RerankOutcome:
        """Stage 1 over every window, stage 2 over the candidates' windows. `gpu_fault`: the
        GPU already failed this request (stage 2 skips it). `stream`: stage 1 under way."""
        documents, top_k = job.texts, job.top_k
        query = plan.query
        window_scores, report, tokens = self._run(
            self.stage1,
            CPU_ROLE,
            query,
            plan.texts,
            use_cache,
            job,
            plan.pair_tokens,
            plan.items,
            stream,
        )
        stages = [report]
        first = plan.best(range(len(plan.texts)), window_scores)
        stage1_order = _rank([first[i][0] for i in range(len(documents))])
        stage1_rank = {doc: place for place, doc in enumerate(stage1_order, start=1)}

        depth = job.candidates if job.candidates is not None else self.candidates
        keep = stage1_order[: max(depth, top_k)]
        picked = [w for i in keep for w in plan.windows_of[i]]  # every window of each candidate
        picked_tokens = [plan.pair_tokens[w] for w in picked] if plan.pair_tokens else None
        scores, fallback = self._stage2(
            query,
            [plan.texts[w] for w in picked],
            stages,
            use_cache,
            job,
            picked_tokens,
            gpu_fault,
        )
        best = first
        if scores is None:  # stage 1's order is the answer
            order = keep
        else:
            best = plan.best(picked, scores)
            order = [keep[j] for j in _rank([best[i][0] for i in keep])]

        results = [
            ScoredDocument(
                i,
                documents[i],
                best[i][0],
                plan.spans[best[i][1]],
                stage1_score=first[i][0],
                stage1_rank=stage1_rank[i],
            )
            for i in order[:top_k]
        ]
        ran_on_gpu = scores is not None and fallback is None and self.stage2_home == "gpu"
        backend: Backend = "gpu" if ran_on_gpu else "cpu"
        return RerankOutcome(
            results=results,
            backend=backend,
            stages=stages,
            fallback=fallback,
            documents=len(documents),
            tokens=tokens,
            windows=len(plan.texts),
            pair_tokens=sum(plan.pair_tokens or ()),
            plan=choice.name,
            plan_reason=choice.reason,
            plan_chosen=self.stage1_mode == "auto",
            queue_wait_s=sum(stage.queued_s for stage in stages),
        )

    def _stage2(
        self,
        query: str,
        texts: list[str],
        stages: list[StageReport],
        use_cache: bool,
        job: RerankJob,
        pair_tokens: Sequence[int] | None = None,
        gpu_fault: FallbackReason | None = None,
    ) -> tuple[list[float] | None, FallbackReason | None]:
        """Scores from the GPU cross-encoder if usable, else from the CPU one if configured.

        Returns the scores (None when stage 2 did not run) and why the GPU was not used.
        `gpu_fault`: the GPU already failed this request; don't try it again.
        """
        fallback: FallbackReason | None = gpu_fault or (
            "no_gpu" if self.stage2_home == "gpu" else None
        )
        if gpu_fault is None and self.stage2_gpu is not None:
            fallback = self.gate.check(probe=self._probe)
            if fallback is None:
                scores, fallback = self._try_gpu(query, texts, stages, use_cache, job, pair_tokens)
                if scores is not None:
                    return scores, None
        if self.stage2_cpu is None:
            return None, fallback
        scores, report, _ = self._run(
            self.stage2_cpu, "stage2_cpu", query, texts, use_cache, job, pair_tokens
        )
        stages.append(report)
        return scores, fallback

    def _try_gpu(
        self,
        query: str,
        texts: list[str],
        stages: list[StageReport],
        use_cache: bool,
        job: RerankJob,
        pair_tokens: Sequence[int] | None,
    ) -> tuple[list[float] | None, FallbackReason | None]:
        """Stage 2 on the GPU (the gate said yes): its scores, or None and the device fault
        (the breaker opens). The request's own limits (its deadline) raise as they are."""
        gpu = self.stage2_gpu
        assert gpu is not None
        try:
            scores, report, _ = self._run(gpu, GPU_ROLE, query, texts, use_cache, job, pair_tokens)
        except InferenceError as exc:  # NaN / inf from the GPU (fp16 overflow, say)
            logger.warning("stage 2 on the GPU: %s; answering without it", exc)
            self.gate.record_failure("invalid_scores")
            return None, "invalid_scores"
        except RerankerError:
            raise
        except Exception as exc:
            return None, self._device_fault(exc)
        stages.append(report)
        return scores, None

    def calibrate(
        self, documents: int = 32, roles: Sequence[str] = (CPU_ROLE, GPU_ROLE)
    ) -> dict[str, float]:
        """Seed the plan's per-token costs (`costs`) on this host: one synthetic request of
        `documents` passages through each of `roles` that is loaded, via the schedulers as
        requests go. Run at warm-up under `RERANKER_STAGE1=auto`; returns the costs."""
        texts = calibration_texts(documents)
        plan = (
            self.windows.plan(CALIBRATION_QUERY, texts, self.long_documents)
            if self.windows is not None
            else WindowPlan.whole(CALIBRATION_QUERY, texts)
        )
        tokens = sum(plan.pair_tokens or word_tokens(plan.query, plan.texts))
        runners = {CPU_ROLE: self.stage1, GPU_ROLE: self.stage2_gpu, "stage2_cpu": self.stage2_cpu}
        for role in roles:
            runner = runners[role]
            if runner is None:
                continue
            started = time.perf_counter()
            self._score(runner, role, plan.query, plan.texts, None)
            self.costs.set(role, (time.perf_counter() - started) / max(1, tokens))
        return self.costs.snapshot()

    def _device_fault(self, exc: Exception) -> FallbackReason:
        """Turn a GPU fault into a fallback reason (and a cool-down); re-raise anything else."""
        accelerator = self.gate.accelerator
        kind = accelerator.classify_failure(exc) if accelerator is not None else None
        if kind is None:
            raise InferenceError(f"stage 2 failed: {type(exc).__name__}") from exc
        logger.warning("stage 2 on the GPU failed (%s: %s); answering from stage 1", kind, exc)
        self.gate.record_failure(kind)
        return kind

    def _run(
        self,
        runner: Runner,
        role: str,
        query: str,
        texts: Sequence[str],
        use_cache: bool,
        job: RerankJob,
        pair_tokens: Sequence[int] | None = None,
        items: Sequence[Any] | None = None,
        stream: Stage1Stream | None = None,
    ) -> tuple[list[float], StageReport, int]:
        """Scores of `texts` (cached ones looked up, the rest from `runner`), the stage's report
        and the tokens the model processed (`pair_tokens`: each pair's tokens as stage 1's
        tokenizer counted them; None: the runner's count). `items`: the runner's items of the
        pairs, made already (stage 1: the window plan's). `stream`: the lookups done and the
        rest queued already, while the plan was tokenizing (the stage's time starts with its
        first group). The model's time per token feeds the plan's cost estimates (`costs`)."""
        started = time.perf_counter()
        keys: list[str] = []
        found: list[float | None] = [None] * len(texts)
        if stream is not None:
            started = stream.started if stream.started is not None else started
            keys, found = stream.keys, list(stream.found)
        elif use_cache and self.cache is not None:
            keys = pair_keys(self._namespaces[role], query, texts)
            found = self.cache.get_many(keys)
        missing = [i for i, score in enumerate(found) if score is None]
        tokens = 0
        queued_s = 0.0
        if missing:
            todo = [texts[i] for i in missing]
            try:
                called = started if stream is not None else time.perf_counter()
                scored = (
                    stream.wait()
                    if stream is not None
                    else self._score(
                        runner,
                        role,
                        query,
                        todo,
                        job,
                        [items[i] for i in missing] if items is not None else None,
                    )
                )
                model_seconds = time.perf_counter() - called
                fresh = _checked(scored.scores, len(todo), runner)
            except RerankerError:  # ours already (invalid scores, a timeout): as it is
                raise
            except Exception as exc:
                if runner is self.stage2_gpu:
                    raise  # a device fault, perhaps: _stage2 decides
                raise InferenceError(
                    f"the {runner.name} model failed: {type(exc).__name__}"
                ) from exc
            tokens = sum(pair_tokens[i] for i in missing) if pair_tokens else scored.tokens
            queued_s = scored.queued_s
            self.costs.observe(role, tokens, model_seconds)  # the plan's live timings
            if keys and self.cache is not None:
                self.cache.set_many({keys[i]: s for i, s in zip(missing, fresh, strict=True)})
            for i, score in zip(missing, fresh, strict=True):
                found[i] = score
        scores = [s for s in found if s is not None]
        cached = len(texts) - len(missing) if keys else None
        stage = "stage1" if role == CPU_ROLE else "stage2"
        seconds = time.perf_counter() - started
        report = StageReport(
            runner.name, runner.device, len(texts), seconds, stage, cached, queued_s
        )
        return scores, report, tokens
