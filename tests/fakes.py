"""Fakes at the narrowest seams: a deterministic scorer behind the runner contract, and a fake
GPU behind the `Accelerator` protocol that injects the faults this machine can't cause."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from reranker_server.devices import FailureKind, classify_torch_failure
from reranker_server.runners.base import Pair, PairwiseRunner


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


class KeywordRunner(PairwiseRunner):
    """Score = share of the query's words found in the document (ties broken by shorter text).

    The right answer is known by construction, so ranking tests can assert order. `calls`: the
    documents of each model call.
    """

    def __init__(
        self,
        name: str = "keyword",
        device: str = "cpu",
        weight: Callable[[str], float] | None = None,
    ) -> None:
        self.name = name
        self.device = device
        self.calls: list[list[str]] = []
        self._weight = weight

    def score_pairs(self, pairs: Sequence[Pair]) -> list[float]:
        """Pairs of one query per call, as the engine and scheduler send them."""
        scores: list[float] = []
        for query in dict.fromkeys(q for q, _ in pairs):
            scores += self.score(query, [d for q, d in pairs if q == query])
        return scores

    def score(self, query: str, documents: Sequence[str]) -> list[float]:
        self.calls.append(list(documents))
        wanted = _words(query)
        scores = []
        for doc in documents:
            overlap = len(wanted & _words(doc)) / max(1, len(wanted))
            score = 0.9 * overlap + 0.1 / (1 + len(doc))
            if self._weight is not None:
                score = self._weight(doc)
            scores.append(score)
        return scores


class FakeAccelerator:
    """Pretends to be a CUDA device while torch computes on the CPU.

    `oom_at_pairs`: a forward pass of at least this many pairs raises torch's real
    `OutOfMemoryError`; `cuda_error`: the next forward raises a CUDA RuntimeError.
    """

    def __init__(self, free_mb: float = 4096.0, total_mb: float = 4096.0) -> None:
        self.free_mb = free_mb
        self.total_mb = total_mb
        self.oom_at_pairs: int | None = None
        self.cuda_error = False
        self.forwards: list[int] = []
        self.cache_emptied = 0

    @property
    def torch_device(self) -> str:
        return "cpu"

    def name(self) -> str:
        return "Fake GTX 1650"

    def free_memory_mb(self) -> float:
        return self.free_mb

    def total_memory_mb(self) -> float:
        return self.total_mb

    def empty_cache(self) -> None:
        self.cache_emptied += 1

    def before_forward(self, pairs: int) -> None:
        import torch

        self.forwards.append(pairs)
        if self.oom_at_pairs is not None and pairs >= self.oom_at_pairs:
            raise torch.cuda.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 3.82 GiB total capacity)"
            )
        if self.cuda_error:
            self.cuda_error = False
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def classify_failure(self, exc: BaseException) -> FailureKind | None:
        return classify_torch_failure(exc)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now
