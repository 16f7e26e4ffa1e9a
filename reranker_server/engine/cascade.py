"""The two-stage cascade: stage 1 scores everything, stage 2 reorders the best candidates.

Synchronous and HTTP-free: a test, the CLI or a notebook can drive it directly. The HTTP layer runs
it in a worker thread through `engine.pool.InferencePool`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence

from ..devices import GpuGate
from ..errors import InferenceError
from ..runners.base import Runner
from ..types import Backend, FallbackReason, RerankOutcome, ScoredDocument, StageReport

logger = logging.getLogger(__name__)

PROBE_QUERY = "probe"
PROBE_DOCUMENT = "a one-pair forward pass to see whether the GPU works again"


def _rank(scores: Sequence[float]) -> list[int]:
    """Positions best first; ties keep request order."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


def _checked(scores: list[float], expected: int, runner: Runner) -> list[float]:
    if len(scores) != expected or not all(math.isfinite(s) for s in scores):
        raise InferenceError(f"model {runner.name} returned invalid scores")
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
    ) -> None:
        self.stage1 = stage1
        self.stage2_gpu = stage2_gpu
        self.stage2_cpu = stage2_cpu
        self.gate = gate
        self.candidates = candidates

    def rerank(self, query: str, documents: Sequence[str], top_k: int) -> RerankOutcome:
        """Best `min(top_k, len(documents))` documents, best first."""
        if not documents:
            return RerankOutcome(results=[], backend="cpu")
        first, report = self._run(self.stage1, query, documents)
        stages = [report]

        keep = _rank(first)[: max(self.candidates, top_k)]
        texts = [documents[i] for i in keep]
        scores, fallback = self._stage2(query, texts, stages)
        if scores is None:  # stage 1's order is the answer
            order, by_index = keep, {i: first[i] for i in keep}
        else:
            order, by_index = [keep[j] for j in _rank(scores)], dict(zip(keep, scores, strict=True))

        results = [ScoredDocument(i, documents[i], by_index[i]) for i in order[:top_k]]
        backend: Backend = "gpu" if scores is not None and fallback is None else "cpu"
        return RerankOutcome(results=results, backend=backend, stages=stages, fallback=fallback)

    def rerank_many(
        self, jobs: Sequence[tuple[str, Sequence[str], int]]
    ) -> list[RerankOutcome]:
        """`rerank` for several (query, documents, top_k) in one call, answered in order.

        The HTTP batch route runs this as one unit of work in the pool, so a batch takes one queue
        slot and one worker instead of competing with itself.
        """
        return [self.rerank(query, documents, top_k) for query, documents, top_k in jobs]

    def _stage2(
        self, query: str, texts: list[str], stages: list[StageReport]
    ) -> tuple[list[float] | None, FallbackReason | None]:
        """Scores from the GPU cross-encoder if usable, else from the CPU one if configured.

        Returns the scores (None when stage 2 did not run) and why the GPU was not used.
        """
        fallback: FallbackReason | None = "no_gpu"
        if self.stage2_gpu is not None:
            gpu = self.stage2_gpu
            fallback = self.gate.check(probe=lambda: gpu.score(PROBE_QUERY, [PROBE_DOCUMENT]))
            if fallback is None:
                try:
                    scores, report = self._run(self.stage2_gpu, query, texts)
                    stages.append(report)
                    return scores, None
                except InferenceError:
                    raise
                except Exception as exc:
                    fallback = self._device_fault(exc)
        if self.stage2_cpu is None:
            return None, fallback
        scores, report = self._run(self.stage2_cpu, query, texts)
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

    @staticmethod
    def _run(runner: Runner, query: str, texts: Sequence[str]) -> tuple[list[float], StageReport]:
        started = time.perf_counter()
        scores = _checked(runner.score(query, texts), len(texts), runner)
        report = StageReport(runner.name, runner.device, len(texts), time.perf_counter() - started)
        return scores, report
