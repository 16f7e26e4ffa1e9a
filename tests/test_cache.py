"""Score cache: the memory backend, keys, and the engine running only the pairs it has not seen."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from reranker_server.devices import GpuGate
from reranker_server.engine.cache import MemoryScoreCache, namespace, pair_keys, redact_url
from reranker_server.engine.engine import Engine
from reranker_server.engine.loader import fingerprint, load_engine
from reranker_server.model_generator import TestModelPaths
from reranker_server.settings import Settings
from reranker_server.types import RerankJob

from .fakes import FakeClock, KeywordRunner

QUERY = "capital of france"
DOCS = [
    "paris is the capital of france",
    "berlin is the capital of germany",
    "the eiffel tower is in paris",
    "bananas are yellow",
    "france has a capital city",
    "rome is old",
]


def keyword_engine(cache: MemoryScoreCache | None) -> tuple[Engine, KeywordRunner, KeywordRunner]:
    stage1, stage2 = KeywordRunner("kw1"), KeywordRunner("kw2", weight=lambda d: 1 / (1 + len(d)))
    engine = Engine(stage1, gate=GpuGate(None, 0, 0), stage2_cpu=stage2, candidates=3, cache=cache)
    return engine, stage1, stage2


# --- memory backend ---------------------------------------------------------------------------


def test_memory_cache_round_trip_and_lru_bound() -> None:
    one_entry = len("k0") + 200
    cache = MemoryScoreCache(max_bytes=3 * one_entry)
    cache.set_many({"k0": 0.1, "k1": 0.2, "k2": 0.3})
    assert cache.get_many(["k0", "k1", "k2", "nope"]) == [0.1, 0.2, 0.3, None]
    cache.get_many(["k0"])  # k0 is now the most recently used
    cache.set_many({"k3": 0.4})
    assert cache.get_many(["k0", "k1", "k2", "k3"]) == [0.1, None, 0.3, 0.4]
    assert cache.stats()["entries"] == 3
    assert cache.stats()["bytes"] <= 3 * one_entry


def test_memory_cache_ttl_expires_entries() -> None:
    clock = FakeClock()
    cache = MemoryScoreCache(max_bytes=10_000, ttl_s=60, clock=clock)
    cache.set_many({"a": 0.5})
    clock.now += 59
    assert cache.get_many(["a"]) == [0.5]
    clock.now += 2
    assert cache.get_many(["a"]) == [None]
    assert cache.stats()["entries"] == 0


def test_keys_depend_on_namespace_query_and_document() -> None:
    ns1 = namespace("stage1", "m@abc", "cpu", max_length=512)
    ns2 = namespace("stage1", "m@abc", "cpu", max_length=256)
    ns3 = namespace("stage2", "m@abc", "cpu", max_length=512)
    base = pair_keys(ns1, "q", ["d"])[0]
    assert len({base, pair_keys(ns2, "q", ["d"])[0], pair_keys(ns3, "q", ["d"])[0]}) == 3
    assert pair_keys(ns1, "q2", ["d"])[0] != base
    assert pair_keys(ns1, "q", ["d2"])[0] != base
    # no ambiguity between where the query ends and the document starts
    assert pair_keys(ns1, "ab", ["c"])[0] != pair_keys(ns1, "a", ["bc"])[0]
    assert pair_keys(ns1, "q", ["d"])[0] == base


def test_fingerprint_changes_with_model_files(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"weights v1")
    (tmp_path / ".complete").write_text("marker")
    first = fingerprint(tmp_path)
    (tmp_path / ".complete").write_text("other marker")  # hidden files do not count
    assert fingerprint(tmp_path) == first
    (tmp_path / "model.onnx").write_bytes(b"weights v2")
    assert fingerprint(tmp_path) != first


def test_redact_url_hides_the_password() -> None:
    assert redact_url("redis://:s3cret@cache:6379/0") == "redis://:***@cache:6379/0"
    assert redact_url("redis://user:s3cret@cache/1") == "redis://user:***@cache/1"
    assert redact_url("redis://cache:6379") == "redis://cache:6379"


# --- engine with the cache --------------------------------------------------------------------


def test_engine_runs_only_pairs_it_has_not_seen() -> None:
    engine, stage1, stage2 = keyword_engine(MemoryScoreCache(1 << 20))
    first = engine.rerank(RerankJob(QUERY, DOCS[:4], top_k=3))
    assert [s.cached for s in first.stages] == [0, 0]
    stage1.calls.clear()
    stage2.calls.clear()

    second = engine.rerank(RerankJob(QUERY, DOCS[2:], top_k=3))  # DOCS[2:4] seen, DOCS[4:] new
    assert stage1.calls == [DOCS[4:]]
    assert second.stages[0].cached == 2 and second.stages[0].documents == 4
    assert second.cache_hits >= 2

    # A batch-independent scorer: scores with the cache equal a fresh engine's, exactly.
    fresh_engine, _, _ = keyword_engine(None)
    fresh = fresh_engine.rerank(RerankJob(QUERY, DOCS[2:], top_k=3))
    assert second.results == fresh.results


def test_repeated_request_is_served_from_the_cache() -> None:
    engine, stage1, stage2 = keyword_engine(MemoryScoreCache(1 << 20))
    first = engine.rerank(RerankJob(QUERY, DOCS, top_k=2))
    calls = (len(stage1.calls), len(stage2.calls))
    again = engine.rerank(RerankJob(QUERY, DOCS, top_k=2))
    assert (len(stage1.calls), len(stage2.calls)) == calls  # no model ran
    assert again.results == first.results
    assert [s.cached for s in again.stages] == [len(DOCS), 3]
    assert again.cache_misses == 0


def test_use_cache_false_neither_reads_nor_writes() -> None:
    cache = MemoryScoreCache(1 << 20)
    engine, stage1, _ = keyword_engine(cache)
    outcome = engine.rerank(RerankJob(QUERY, DOCS, top_k=2, use_cache=False))
    assert cache.stats()["entries"] == 0
    assert all(s.cached is None for s in outcome.stages)
    engine.rerank(RerankJob(QUERY, DOCS, top_k=2))
    engine.rerank(RerankJob(QUERY, DOCS, top_k=2, use_cache=False))
    assert len(stage1.calls) == 3


def test_stage_namespaces_are_separate() -> None:
    """The same (query, document) pair scored by stage 1 must not answer stage 2."""
    cache = MemoryScoreCache(1 << 20)
    engine, _, _ = keyword_engine(cache)
    engine.rerank(RerankJob(QUERY, DOCS[:3], top_k=3))
    assert cache.stats()["entries"] == 6  # 3 pairs x 2 stages
    outcome = engine.rerank(RerankJob(QUERY, DOCS[:3], top_k=3))
    by_index = {r.index: r.score for r in outcome.results}
    assert by_index == {i: 1 / (1 + len(DOCS[i])) for i in range(3)}  # stage 2's scores


# --- real models --------------------------------------------------------------------------------


@pytest.fixture
def cached_and_fresh(
    make_settings: Callable[..., Settings],
) -> tuple[Engine, Engine]:
    common = {"stage2_on_cpu": True, "candidates": 4, "warmup": False}
    return (
        load_engine(make_settings(cache_enabled=True, **common)),
        load_engine(make_settings(cache_enabled=False, **common)),
    )


def test_real_models_cached_scores_equal_fresh_ones(
    cached_and_fresh: tuple[Engine, Engine],
) -> None:
    cached, fresh = cached_and_fresh
    first = cached.rerank(RerankJob(QUERY, DOCS, top_k=4))
    again = cached.rerank(RerankJob(QUERY, DOCS, top_k=4))
    reference = fresh.rerank(RerankJob(QUERY, DOCS, top_k=4))
    assert [s.cached for s in again.stages] == [len(DOCS), 4]
    assert again.results == first.results == reference.results  # exact floats, same order


def test_real_models_partial_overlap_scores_new_pairs_alone(
    cached_and_fresh: tuple[Engine, Engine],
) -> None:
    """With a partly-seen request, cached pairs keep the score they were computed with and the new
    pairs get exactly what the model gives them when scored together (the same batch)."""
    cached, fresh = cached_and_fresh
    cached.rerank(RerankJob(QUERY, DOCS[:4], top_k=4))
    outcome = cached.rerank(RerankJob(QUERY, DOCS[2:], top_k=4))
    assert outcome.stages[0].cached == 2
    seen = fresh.stage1.score(QUERY, DOCS[:4])
    new = fresh.stage1.score(QUERY, DOCS[4:])
    keys = pair_keys(cached._namespaces["stage1"], QUERY, DOCS[2:])
    assert cached.cache is not None
    assert cached.cache.get_many(keys) == seen[2:] + new


def test_loader_namespaces_name_model_fingerprint_and_settings(
    make_settings: Callable[..., Settings], tiny_models: TestModelPaths
) -> None:
    engine = load_engine(make_settings(stage2_on_cpu=True, warmup=False, max_length=128))
    stage1_ns = engine._namespaces["stage1"]
    assert fingerprint(tiny_models.stage1) in stage1_ns
    assert "max_length=128" in stage1_ns
    assert fingerprint(tiny_models.stage2) in engine._namespaces["stage2_cpu"]
    assert load_engine(make_settings(cache_enabled=False, warmup=False)).cache is None
