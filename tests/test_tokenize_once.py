"""Tokenize once, overlap it with compute (issue 24): stage 1's pairs are built from the window
plan's own tokens (never tokenized again, cached or not), with exactly the ids FlashRank's
tokenizer gives the pair, and each group of windows is queued as soon as it is tokenized.

Real FlashRank runners on generated models (the tiny ones, and every FlashRank layout of the
coverage matrix); the scheduler is the real one."""

from __future__ import annotations

import random
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from flashrank import Ranker, RerankRequest

from reranker_server.devices import GpuGate
from reranker_server.engine import windows
from reranker_server.engine.cache import MemoryScoreCache
from reranker_server.engine.engine import Engine
from reranker_server.engine.scheduler import Scheduler
from reranker_server.engine.windows import FIRST_GROUP, Windower, group_bounds
from reranker_server.errors import InvalidRequestError
from reranker_server.model_generator import (
    STAGE1_FILE,
    WORDS,
    TestModelPaths,
    flashrank_pairwise_names,
)
from reranker_server.model_store import resolve_stage1
from reranker_server.runners.flashrank import FlashRankRunner
from reranker_server.runners.onnx_cross_encoder import OnnxCrossEncoderRunner
from reranker_server.types import LongDocPolicy, RerankJob, TextTokens

from .test_window_prefixes import POLICIES, documents

QUERY = "what is the capital of france"


class Counting(FlashRankRunner):
    """The real runner, counting what goes through its tokenizer seam: pairs (`prepare`) and
    texts alone (`encode_texts`, the window plan). `on_encode`: called before each plan call."""

    pairs_tokenized = 0
    texts_tokenized = 0
    on_encode: Any = None

    def prepare(self, pairs: Sequence[tuple[str, str]]) -> list[Any]:
        self.pairs_tokenized += len(pairs)
        return super().prepare(pairs)

    def encode_texts(self, texts: Sequence[str]) -> list[TextTokens]:
        if self.on_encode is not None:
            self.on_encode()
        self.texts_tokenized += len(texts)
        return super().encode_texts(texts)


class Gated(FlashRankRunner):
    """The real runner whose model calls wait for `gate`: what is queued stays queued."""

    gate: threading.Event

    def run(self, encodings: Sequence[Any]) -> list[float]:
        self.gate.wait(60)
        return super().run(encodings)


def runner(cls: type[FlashRankRunner], models: TestModelPaths) -> Any:
    return cls(models.stage1, models.stage1 / STAGE1_FILE)


def engine_with(stage1: FlashRankRunner, scheduler: Scheduler, **options: Any) -> Engine:
    return Engine(
        stage1,
        gate=GpuGate(None, 512, 30.0),
        windows=Windower(stage1),
        scheduler=scheduler,
        **options,
    )


def short_documents(count: int, seed: int = 5) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 60))) for _ in range(count)]


def same_pairs(made: Sequence[Any], expected: Sequence[Any]) -> bool:
    return [(m.ids, m.type_ids) for m in made] == [(e.ids, e.type_ids) for e in expected]


@pytest.mark.parametrize("policy", POLICIES, ids=repr)
def test_plan_items_are_the_tokenizers_pairs(
    tiny_models: TestModelPaths, policy: LongDocPolicy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every window's item has the ids and type ids of FlashRank's tokenizer on (query, window
    text): documents of every density, whole or cut, with a short query and a capped one."""
    monkeypatch.setattr(windows, "GROUP", 3)  # several groups, documents split across them
    stage1 = runner(FlashRankRunner, tiny_models)
    docs = documents(random.Random(11))
    for query in (QUERY, " ".join(WORDS[:80])):
        plan = Windower(stage1, max_query_tokens=50).plan(query, docs, policy)
        assert plan.items is not None
        assert same_pairs(plan.items, stage1.prepare([(plan.query, t) for t in plan.texts]))


def test_every_flashrank_layout_builds_its_pairs(model_matrix: dict[str, Path]) -> None:
    """Each FlashRank layout's tokenizer (BERT's, T5's sentencepiece, ...): the plan's items are
    its own pairs, windows and a cut query included (a sentencepiece tokenizer marks a text's
    first word, so its windows can't reuse the document's ids: they are tokenized alone)."""
    docs = [*documents(random.Random(2))[:4], *short_documents(6)]
    for name in flashrank_pairwise_names():
        files = resolve_stage1(
            str(model_matrix[f"flashrank/{name}"]), Path("unused"), offline=True, timeout_s=1
        )
        stage1 = FlashRankRunner(files.directory, files.onnx_file)
        for policy in (LongDocPolicy(mode="chunk", max_chunks=3), LongDocPolicy(keep="end")):
            plan = Windower(stage1, max_query_tokens=4).plan(QUERY, docs, policy)
            assert plan.items is not None, name
            pairs = stage1.prepare([(plan.query, t) for t in plan.texts])
            assert same_pairs(plan.items, pairs), name


class CountingOnnx(OnnxCrossEncoderRunner):
    """The real ONNX cross-encoder runner, counting the pairs it tokenizes."""

    pairs_tokenized = 0

    def prepare(self, pairs: Sequence[tuple[str, str]]) -> list[Any]:
        self.pairs_tokenized += len(pairs)
        return super().prepare(pairs)


@pytest.mark.parametrize("name", ["onnx/bert", "onnx/bert-2-label", "onnx/xlm-roberta"])
def test_an_onnx_cross_encoder_stage_1_builds_its_pairs(
    model_matrix: dict[str, Path], name: str
) -> None:
    """The onnx-cross-encoder kind as stage 1 (BERT's tokenizer and XLM-RoBERTa's
    sentencepiece one): the plan's items are its tokenizer's own pairs, and the engine scores
    them, exactly as the runner scores the pairs it tokenizes, without tokenizing a pair."""
    docs = [*documents(random.Random(3))[:4], *short_documents(6)]
    stage1 = CountingOnnx(model_matrix[name])
    for policy in (LongDocPolicy(mode="chunk", max_chunks=3), LongDocPolicy(keep="end")):
        plan = Windower(stage1, max_query_tokens=4).plan(QUERY, docs, policy)
        assert plan.items is not None
        assert same_pairs(plan.items, stage1.prepare([(plan.query, t) for t in plan.texts]))
    short = short_documents(12)  # whole documents: the runner's own pairs are the same texts
    scheduler = Scheduler(1)
    try:
        stage1.pairs_tokenized = 0
        outcome = engine_with(stage1, scheduler).rerank(RerankJob(QUERY, short, top_k=12))
        assert stage1.pairs_tokenized == 0
    finally:
        scheduler.close()
    ours = {r.index: r.score for r in outcome.results}
    assert [ours[i] for i in range(len(short))] == stage1.score(QUERY, short)


def test_scores_equal_flashrank_and_the_pair_tokenizing_path(tiny_models: TestModelPaths) -> None:
    """The engine's stage-1 scores equal flashrank.Ranker's score of each passage alone, and
    (exactly) the scores of the runner tokenizing the pairs itself."""
    docs = [*short_documents(30), "", "paris is the capital of france"]
    scheduler = Scheduler(2)
    try:
        stage1 = runner(FlashRankRunner, tiny_models)
        outcome = engine_with(stage1, scheduler).rerank(RerankJob(QUERY, docs, top_k=len(docs)))
    finally:
        scheduler.close()
    ours = {r.index: r.score for r in outcome.results}
    tokenized = stage1.score(QUERY, docs)
    assert [ours[i] for i in range(len(docs))] == tokenized
    ranker = Ranker(model_name=tiny_models.stage1.name, cache_dir=str(tiny_models.stage1.parent))
    for i, text in enumerate(docs[:8] + docs[-2:]):
        index = i if i < 8 else len(docs) - 10 + i
        (alone,) = ranker.rerank(RerankRequest(query=QUERY, passages=[{"text": text}]))
        assert ours[index] == pytest.approx(float(alone["score"]), abs=1e-5)


def test_pairs_are_tokenized_once_cached_or_not(tiny_models: TestModelPaths) -> None:
    """Each document goes through the tokenizer once per request (the plan's call), the pairs
    never: not when scored, not when half of them come from the cache, not on a full hit."""
    stage1 = runner(Counting, tiny_models)
    docs = short_documents(40)
    scheduler = Scheduler(2)
    try:
        engine = engine_with(stage1, scheduler, cache=MemoryScoreCache(1 << 20))
        first = engine.rerank(RerankJob(QUERY, docs[:20], top_k=5))
        assert (stage1.pairs_tokenized, stage1.texts_tokenized) == (0, 1 + 20)
        half = engine.rerank(RerankJob(QUERY, docs[10:30], top_k=5))  # 10 cached, 10 new
        assert (stage1.pairs_tokenized, stage1.texts_tokenized) == (0, 2 + 40)
        again = engine.rerank(RerankJob(QUERY, docs[:20], top_k=5))  # every pair cached
        assert (stage1.pairs_tokenized, stage1.texts_tokenized) == (0, 3 + 60)
    finally:
        scheduler.close()
    assert half.stages[0].cached == 10 and again.stages[0].cached == 20
    assert [r.score for r in again.results] == [r.score for r in first.results]


def test_pairs_are_queued_before_the_last_group_is_tokenized(tiny_models: TestModelPaths) -> None:
    """Stage 1 starts on the first group of documents: when the plan tokenizes its last group,
    every earlier group's pairs are queued already (the compute threads have work)."""
    stage1 = runner(Counting, tiny_models)
    scheduler = Scheduler(2)
    seen: list[int] = []  # pairs ever queued, at each plan call
    stage1.on_encode = lambda: seen.append(scheduler.submitted)
    docs = short_documents(100)
    bounds = list(group_bounds(len(docs)))
    assert len(bounds) >= 3 and bounds[0] == (0, FIRST_GROUP)
    try:
        outcome = engine_with(stage1, scheduler).rerank(RerankJob(QUERY, docs, top_k=3))
    finally:
        scheduler.close()
    # calls: the query, then one per group (every document is short: tokenized whole)
    assert len(seen) == 1 + len(bounds)
    assert seen[:2] == [0, 0]
    assert seen[1 + len(bounds) - 1] == bounds[-1][0]  # before the last group: all the others
    assert scheduler.submitted == len(docs) and len(outcome.results) == 3


def test_a_plan_refused_midway_drops_the_pairs_it_queued(tiny_models: TestModelPaths) -> None:
    """Past max_windows in a later group: the request gets the 4xx error and the pairs its first
    groups queued are dropped, not computed for nobody."""
    stage1 = runner(Gated, tiny_models)
    stage1.gate = threading.Event()
    scheduler = Scheduler(1)
    docs = short_documents(60)
    try:
        engine = engine_with(stage1, scheduler)
        with pytest.raises(InvalidRequestError, match="max_windows_per_request"):
            engine.rerank(RerankJob(QUERY, docs, top_k=3, policy=LongDocPolicy(max_windows=30)))
        queued_before_refusal = FIRST_GROUP + 2 * FIRST_GROUP  # two groups fit 30 windows
        assert scheduler.submitted == queued_before_refusal
        assert scheduler.queued == 0
        assert scheduler.dropped == queued_before_refusal  # the one running is discarded too
    finally:
        stage1.gate.set()
        scheduler.close()
