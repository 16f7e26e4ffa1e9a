"""The two-stage cascade: stage 1 scores everything, stage 2 reorders the best candidates.

Synchronous and HTTP-free: a test, the CLI or a notebook can drive it directly. The HTTP layer runs
it in a request thread through `engine.pool.InferencePool`. With a `Scheduler` (the loader builds
one) model calls go through its FIFO queue and worker threads, batched with other requests' pairs;
without one the runners are called directly in the caller's thread.

With a score cache (engine/cache.py) each stage looks its pairs up first and sends only the missing
ones to its model; stage 1 and stage 2 (per device) are separate cache namespaces.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence

from ..devices import GpuGate
from ..errors import InferenceError, RerankerError
from ..runners.base import Runner
from ..types import (
    Backend,
    FallbackReason,
    LongDocPolicy,
    RerankOutcome,
    ScoredDocument,
    StageReport,
)
from .cache import ScoreCache, namespace, pair_keys
from .scheduler import BatchRunner, Lane, PairRunner, Scheduler
from .trace import current_trace
from .windows import Windower, WindowPlan

TokenCounter = Callable[[str, Sequence[str]], int]

logger = logging.getLogger(__name__)

PROBE_QUERY = "probe"
PROBE_DOCUMENT = "a one-pair forward pass to see whether the GPU works again"


def _rank(scores: Sequence[float]) -> list[int]:
    """Positions best first; ties keep request order."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


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
        count_tokens: TokenCounter | None = None,
        windows: Windower | None = None,
        long_documents: LongDocPolicy | None = None,
        scheduler: Scheduler | None = None,
        gpu_scheduler: Scheduler | None = None,
        lanes: Mapping[str, Lane] | None = None,
    ) -> None:
        """`cache`: score cache (None: none). `cache_namespaces`: "stage1", "stage2_gpu",
        "stage2_cpu" -> namespace naming the model identity and its settings (the loader passes
        file fingerprints; by default the runner's name and device). `count_tokens(query, docs)`:
        tokens of the pairs stage 1 scores, for metrics and logs (None: not counted; with a
        scheduler, the tokenizer's count comes for free). `windows`: cuts long documents per
        `LongDocPolicy` (engine/windows.py; it also counts the tokens); None: documents go to the
        runners whole. `long_documents`: the policy of requests that bring none. `scheduler`:
        runs the CPU stages (None: call runners directly); `gpu_scheduler`: runs stage 2 on the
        GPU (None: the CPU one). `lanes`: role -> batch policy (default: from the runner's
        `max_pairs` and `batch_tokens`, else one pair per call)."""
        self.stage1 = stage1
        self.stage2_gpu = stage2_gpu
        self.stage2_cpu = stage2_cpu
        self.gate = gate
        self.candidates = candidates
        self.cache = cache
        self._count_tokens = count_tokens
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

    def _lane(self, role: str, runner: Runner) -> Lane:
        lane = self._lanes.get(role)
        if lane is None:
            batch_runner: BatchRunner = (
                runner  # type: ignore[assignment]
                if all(hasattr(runner, a) for a in ("prepare", "length", "run"))
                else PairRunner(runner)
            )
            lane = Lane(
                role,
                batch_runner,
                max_pairs=int(getattr(runner, "max_pairs", 1)),
                batch_tokens=int(getattr(runner, "batch_tokens", 8192)),
            )
            self._lanes[role] = lane
        return lane

    def _score(
        self, runner: Runner, role: str, query: str, texts: Sequence[str]
    ) -> tuple[list[float], int | None]:
        """Scores of `texts` from `runner` (through the scheduler when there is one), and their
        tokens when the scheduler tokenized them."""
        scheduler = self.gpu_scheduler if role == "stage2_gpu" else self.scheduler
        if scheduler is None:
            return runner.score(query, texts), None
        scores, tokens = scheduler.score(self._lane(role, runner), [(query, t) for t in texts])
        return scores, tokens if role == "stage1" and self._lanes[role].runner is runner else None

    def close(self) -> None:
        """Stop the scheduler threads (queued work finishes first)."""
        for scheduler in {self.scheduler, self.gpu_scheduler} - {None}:
            scheduler.close()  # type: ignore[union-attr]

    def rerank(
        self,
        query: str,
        documents: Sequence[str],
        top_k: int,
        *,
        use_cache: bool = True,
        policy: LongDocPolicy | None = None,
    ) -> RerankOutcome:
        """Best `min(top_k, len(documents))` documents, best first.

        `use_cache=False` (or a request trace that opted out) neither reads nor writes the cache.
        `policy`: what to do with documents too long for the model (None: the engine's default).
        """
        trace = current_trace.get()
        if trace is not None:
            use_cache = use_cache and trace.use_cache
            trace.top_k, trace.query, trace.documents = top_k, query, documents
        plan = (
            self.windows.plan(query, documents, policy or self.long_documents)
            if self.windows is not None and documents
            else WindowPlan.whole(query, documents)
        )
        outcome = self._rerank(plan, documents, top_k, use_cache and self.cache is not None)
        if trace is not None:
            trace.outcomes.append(outcome)
        return outcome

    def _rerank(
        self, plan: WindowPlan, documents: Sequence[str], top_k: int, use_cache: bool
    ) -> RerankOutcome:
        """The cascade over `plan`'s windows; a document's score is its best window's."""
        if not documents:
            return RerankOutcome(results=[], backend="cpu")
        query = plan.query
        window_scores, report, tokens = self._run(
            self.stage1, "stage1", query, plan.texts, use_cache, plan.pair_tokens
        )
        stages = [report]
        best = plan.best(range(len(plan.texts)), window_scores)

        keep = _rank([best[i][0] for i in range(len(documents))])[: max(self.candidates, top_k)]
        picked = [w for i in keep for w in plan.windows_of[i]]  # every window of each candidate
        scores, fallback = self._stage2(query, [plan.texts[w] for w in picked], stages, use_cache)
        if scores is None:  # stage 1's order is the answer
            order = keep
        else:
            best = plan.best(picked, scores)
            order = [keep[j] for j in _rank([best[i][0] for i in keep])]

        results = [
            ScoredDocument(i, documents[i], best[i][0], plan.spans[best[i][1]])
            for i in order[:top_k]
        ]
        backend: Backend = "gpu" if scores is not None and fallback is None else "cpu"
        return RerankOutcome(
            results=results,
            backend=backend,
            stages=stages,
            fallback=fallback,
            documents=len(documents),
            tokens=tokens,
            windows=len(plan.texts),
            pair_tokens=sum(plan.pair_tokens or ()),
        )

    def rerank_many(
        self,
        jobs: Sequence[tuple[str, Sequence[str], int]],
        policies: Sequence[LongDocPolicy | None] | None = None,
    ) -> list[RerankOutcome]:
        """`rerank` for several (query, documents, top_k) in one call, answered in order
        (`policies`: one per job, None: the engine's default).

        The HTTP batch route runs this as one unit of work in the pool, so a batch takes one queue
        slot and one worker instead of competing with itself.
        """
        each = policies if policies is not None else [None] * len(jobs)
        return [
            self.rerank(query, documents, top_k, policy=policy)
            for (query, documents, top_k), policy in zip(jobs, each, strict=True)
        ]

    def _stage2(
        self, query: str, texts: list[str], stages: list[StageReport], use_cache: bool
    ) -> tuple[list[float] | None, FallbackReason | None]:
        """Scores from the GPU cross-encoder if usable, else from the CPU one if configured.

        Returns the scores (None when stage 2 did not run) and why the GPU was not used.
        """
        fallback: FallbackReason | None = "no_gpu"
        if self.stage2_gpu is not None:
            gpu = self.stage2_gpu
            # the probe queues like any pair: never two threads in the GPU model at once
            fallback = self.gate.check(
                probe=lambda: self._score(gpu, "stage2_gpu", PROBE_QUERY, [PROBE_DOCUMENT])
            )
            if fallback is None:
                try:
                    scores, report, _ = self._run(
                        self.stage2_gpu, "stage2_gpu", query, texts, use_cache
                    )
                    stages.append(report)
                    return scores, None
                except InferenceError as exc:  # NaN / inf from the GPU (fp16 overflow, say)
                    logger.warning("stage 2 on the GPU: %s; answering without it", exc)
                    self.gate.record_failure("invalid_scores")
                    fallback = "invalid_scores"
                except RerankerError:  # the request's own limits (its deadline): as they are
                    raise
                except Exception as exc:
                    fallback = self._device_fault(exc)
        if self.stage2_cpu is None:
            return None, fallback
        scores, report, _ = self._run(self.stage2_cpu, "stage2_cpu", query, texts, use_cache)
        stages.append(report)
        return scores, fallback

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
        pair_tokens: Sequence[int] | None = None,
    ) -> tuple[list[float], StageReport, int]:
        """Scores of `texts` (cached ones looked up, the rest from `runner`), the stage's report
        and the tokens the model processed (stage 1 only, when counted; `pair_tokens`: each
        pair's tokens, already counted)."""
        started = time.perf_counter()
        keys: list[str] = []
        found: list[float | None] = [None] * len(texts)
        if use_cache and self.cache is not None:
            keys = pair_keys(self._namespaces[role], query, texts)
            found = self.cache.get_many(keys)
        missing = [i for i, score in enumerate(found) if score is None]
        tokens = 0
        if missing:
            todo = [texts[i] for i in missing]
            try:
                found_scores, counted = self._score(runner, role, query, todo)
                fresh = _checked(found_scores, len(todo), runner)
            except RerankerError:  # ours already (invalid scores, a timeout): as it is
                raise
            except Exception as exc:
                if runner is self.stage2_gpu:
                    raise  # a device fault, perhaps: _stage2 decides
                raise InferenceError(
                    f"the {runner.name} model failed: {type(exc).__name__}"
                ) from exc
            if role == "stage1" and pair_tokens is not None:
                tokens = sum(pair_tokens[i] for i in missing)
            elif counted is not None:
                tokens = counted
            elif role == "stage1" and self._count_tokens is not None:
                tokens = self._count_tokens(query, todo)
            if keys and self.cache is not None:
                self.cache.set_many({keys[i]: s for i, s in zip(missing, fresh, strict=True)})
            for i, score in zip(missing, fresh, strict=True):
                found[i] = score
        scores = [s for s in found if s is not None]
        cached = len(texts) - len(missing) if keys else None
        stage = "stage1" if role == "stage1" else "stage2"
        seconds = time.perf_counter() - started
        report = StageReport(runner.name, runner.device, len(texts), seconds, stage, cached)
        return scores, report, tokens
