"""Value types shared by the engine and the HTTP layer. Imports nothing from the package."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Backend = Literal["gpu", "cpu"]
FallbackReason = Literal["no_gpu", "low_vram", "cooldown", "oom", "cuda_error", "invalid_scores"]


@dataclass(frozen=True)
class ScoredDocument:
    """One document of the answer: its position in the request, its text and its score in [0, 1]."""

    index: int
    text: str
    score: float


@dataclass(frozen=True)
class StageReport:
    """What one stage did for a request."""

    name: str  # "flashrank" | "cross-encoder"
    device: str  # "cpu" | "cuda:0" ...
    documents: int
    seconds: float
    stage: str = ""  # "stage1" | "stage2"
    cached: int | None = None  # documents answered from the score cache; None: cache not used

    @property
    def computed(self) -> int:
        """Documents the model scored."""
        return self.documents - (self.cached or 0)


@dataclass(frozen=True)
class RerankOutcome:
    """The engine's answer: results best first, and how they were produced."""

    results: list[ScoredDocument]
    backend: Backend
    stages: list[StageReport] = field(default_factory=list)
    fallback: FallbackReason | None = None
    documents: int = 0  # documents in the request
    tokens: int = 0  # tokens the stage-1 model processed (cache hits cost none)

    @property
    def cache_hits(self) -> int:
        return sum(s.cached or 0 for s in self.stages)

    @property
    def cache_misses(self) -> int:
        return sum(s.documents - s.cached for s in self.stages if s.cached is not None)
