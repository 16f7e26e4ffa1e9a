"""The cascade's logic with deterministic scorers (right answers known by construction)."""

from __future__ import annotations

import math

import pytest

from reranker_server.devices import GpuGate
from reranker_server.engine.engine import Engine
from reranker_server.errors import InferenceError
from reranker_server.types import RerankJob

from .fakes import FakeAccelerator, FakeClock, KeywordRunner

QUERY = "capital of france"
DOCS = [
    "berlin is the capital of germany",  # 0: 2 of 3 words (capital, of)
    "paris is the capital of france",  # 1: all 3 words
    "the eiffel tower",  # 2: none
    "france has wine",  # 3: 1 word
    "capital of france: paris",  # 4: all 3 words, shorter than 1
]


def by_length(doc: str) -> float:
    """A stage-2 scorer that disagrees with stage 1: longer is better."""
    return len(doc) / 100


def engine(
    candidates: int = 3,
    gpu: bool = True,
    accelerator: FakeAccelerator | None = None,
    clock: FakeClock | None = None,
    cpu2: bool = False,
) -> Engine:
    acc = accelerator or (FakeAccelerator() if gpu else None)
    gate = GpuGate(acc, min_free_vram_mb=512, cooldown_s=30, clock=clock or FakeClock())
    return Engine(
        KeywordRunner("stage1"),
        gate=gate,
        stage2_gpu=KeywordRunner("stage2", device="cuda:0", weight=by_length) if acc else None,
        stage2_cpu=KeywordRunner("stage2-cpu", weight=by_length) if cpu2 else None,
        candidates=candidates,
    )


def test_stage1_order_when_no_gpu() -> None:
    out = engine(gpu=False).rerank(RerankJob(QUERY, DOCS, top_k=5))
    assert [r.index for r in out.results] == [4, 1, 0, 3, 2]
    assert out.backend == "cpu" and out.fallback == "no_gpu"
    assert [s.name for s in out.stages] == ["stage1"]


def test_stage2_reorders_only_the_stage1_candidates() -> None:
    e = engine(candidates=3)
    out = e.rerank(RerankJob(QUERY, DOCS, top_k=3))
    # stage 1 keeps 4, 1, 0; stage 2 (longer first) orders them 0, 1, 4
    assert [r.index for r in out.results] == [0, 1, 4]
    assert out.backend == "gpu" and out.fallback is None
    assert sorted(e.stage2_gpu.calls[0]) == sorted(DOCS[i] for i in (4, 1, 0))  # type: ignore[union-attr]
    assert [r.score for r in out.results] == [by_length(DOCS[i]) for i in (0, 1, 4)]


def test_candidates_never_fewer_than_top_k() -> None:
    out = engine(candidates=2).rerank(RerankJob(QUERY, DOCS, top_k=4))
    assert len(out.results) == 4
    assert [r.index for r in out.results] == [0, 1, 4, 3]


def test_top_k_larger_than_documents_returns_all() -> None:
    out = engine().rerank(RerankJob(QUERY, DOCS[:2], top_k=50))
    assert sorted(r.index for r in out.results) == [0, 1]


def test_empty_documents() -> None:
    out = engine().rerank(RerankJob(QUERY, [], top_k=3))
    assert out.results == [] and out.backend == "cpu"


def test_duplicates_map_back_by_index_and_input_is_not_mutated() -> None:
    docs = ["paris capital of france", "other", "paris capital of france"]
    frozen = list(docs)
    out = engine(gpu=False).rerank(RerankJob(QUERY, docs, top_k=3))
    assert docs == frozen
    assert [r.index for r in out.results] == [0, 2, 1]  # tie keeps request order
    assert all(isinstance(r.score, float) for r in out.results)


def test_low_vram_falls_back_to_stage1() -> None:
    out = engine(accelerator=FakeAccelerator(free_mb=100)).rerank(RerankJob(QUERY, DOCS, top_k=3))
    assert out.backend == "cpu" and out.fallback == "low_vram"
    assert [r.index for r in out.results] == [4, 1, 0]


def test_gpu_fault_falls_back_then_cools_down_then_recovers() -> None:
    clock = FakeClock()
    acc = FakeAccelerator()
    e = engine(accelerator=acc, clock=clock)
    boom = RuntimeError("CUDA error: an illegal memory access was encountered")

    def failing(query: str, documents: object) -> list[float]:
        raise boom

    good_score = e.stage2_gpu.score  # type: ignore[union-attr]
    e.stage2_gpu.score = failing  # type: ignore[method-assign,union-attr]
    out = e.rerank(RerankJob(QUERY, DOCS, top_k=3))
    assert (out.backend, out.fallback) == ("cpu", "cuda_error")
    assert [r.index for r in out.results] == [4, 1, 0]
    assert acc.cache_emptied == 1

    e.stage2_gpu.score = good_score  # type: ignore[method-assign,union-attr]
    clock.now += 29
    assert e.rerank(RerankJob(QUERY, DOCS, top_k=3)).fallback == "cooldown"
    clock.now += 2
    out = e.rerank(RerankJob(QUERY, DOCS, top_k=3))
    assert (out.backend, out.fallback) == ("gpu", None)


def test_cpu_stage2_after_gpu_failure_when_enabled() -> None:
    acc = FakeAccelerator(free_mb=10)
    out = engine(accelerator=acc, cpu2=True).rerank(RerankJob(QUERY, DOCS, top_k=3))
    assert out.backend == "cpu" and out.fallback == "low_vram"
    assert [s.name for s in out.stages] == ["stage1", "stage2-cpu"]
    assert [r.index for r in out.results] == [0, 1, 4]


def test_non_device_error_is_an_inference_error() -> None:
    e = engine()

    def broken(query: str, documents: object) -> list[float]:
        raise ValueError("bad weights")

    e.stage2_gpu.score = broken  # type: ignore[method-assign,union-attr]
    with pytest.raises(InferenceError):
        e.rerank(RerankJob(QUERY, DOCS, top_k=3))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_scores_never_leave_the_engine(bad: float) -> None:
    e = engine(gpu=False)
    e.stage1.score = lambda q, d: [bad] * len(d)  # type: ignore[method-assign]
    with pytest.raises(InferenceError):
        e.rerank(RerankJob(QUERY, DOCS, top_k=3))
