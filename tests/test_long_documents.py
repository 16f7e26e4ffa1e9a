"""Long documents (engine/windows.py, api/long_documents.py) with the generated tiny models.

The "relevant part past token 512" case is built from the models themselves, so it is
deterministic: a long document whose first window scores low and whose tail window (past token
512) scores high, plus short competitors scoring in between. With `chunk` the document must rank
first with exactly its best window's score (each window scored alone, directly); with `truncate`
it must rank below the competitors with its first window's score.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import cohere
import httpx
import pytest

from reranker_server.app import create_app
from reranker_server.devices import GpuGate
from reranker_server.engine.cache import MemoryScoreCache
from reranker_server.engine.engine import Engine
from reranker_server.engine.loader import load_engine
from reranker_server.engine.windows import FIRST_GROUP, GROUP, Windower, WindowPlan, word_cuts
from reranker_server.errors import InvalidRequestError, RequestCancelledError
from reranker_server.model_generator import STAGE1_FILE, WORDS, TestModelPaths
from reranker_server.runners.base import PairwiseRunner
from reranker_server.runners.cross_encoder import CrossEncoderRunner
from reranker_server.runners.flashrank import FlashRankRunner
from reranker_server.settings import Settings
from reranker_server.types import Cancellation, LongDocPolicy, RerankJob, TextTokens

from .conftest import running

QUERY = "what is the capital of france"
CHUNK = LongDocPolicy(mode="chunk")
TRUNCATE = LongDocPolicy(mode="truncate")


class Recording(PairwiseRunner):
    """A real runner, with the texts it was asked to score recorded (a spy at the contract)."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.name = runner.name
        self.device = runner.device
        self.calls: list[list[str]] = []

    def score_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        self.calls.append([document for _, document in pairs])
        return self.runner.score_pairs(pairs)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def stage1(tiny_models: TestModelPaths) -> FlashRankRunner:
    """Stage 1 with one pair per ONNX batch: the int8 model's scores then never depend on what
    else is in the batch, so a window's score equals scoring that window alone."""
    return FlashRankRunner(tiny_models.stage1, tiny_models.stage1 / STAGE1_FILE, batch_tokens=1)


@pytest.fixture(scope="module")
def stage2(tiny_models: TestModelPaths) -> CrossEncoderRunner:
    return CrossEncoderRunner(str(tiny_models.stage2))


def words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(count))


@dataclass(frozen=True)
class Case:
    long_doc: str  # filler (>= 512 tokens) + the relevant tail
    filler: str
    first_score: float  # its first window's score (what truncate sees)
    best_score: float  # its best window's score
    competitors: list[str]  # short documents scoring in between, with a margin


@pytest.fixture(scope="module")
def case(stage1: FlashRankRunner) -> Case:
    windower = Windower(stage1)
    rng = random.Random(7)
    filler = words(rng, 600)
    assert len(stage1.encode_texts([filler])[0].words) >= 512  # the tail lies past token 512
    found: tuple[float, str, list[float]] | None = None
    for _ in range(200):  # stops at the first tail good enough
        doc = f"{filler} {words(rng, 200)}"
        plan = windower.plan(QUERY, [doc], CHUNK)
        scores = stage1.score(plan.query, plan.texts)
        if found is None or max(scores) - scores[0] > found[0]:
            found = (max(scores) - scores[0], doc, scores)
        if found[0] > 0.3:
            break
    assert found is not None
    gap, doc, scores = found
    assert gap > 0.3, "the tiny models no longer give a window gap to build the case from"
    low, high = scores[0] + 0.08, max(scores) - 0.08
    shorts = [words(rng, 30) for _ in range(60)]
    competitors = [
        s for s, v in zip(shorts, stage1.score(QUERY, shorts), strict=True) if low < v < high
    ][:5]
    assert len(competitors) >= 2
    return Case(doc, filler, scores[0], max(scores), competitors)


def engine_with(
    stage1: Any, stage2: Any = None, cache: MemoryScoreCache | None = None, **windower: int
) -> Engine:
    return Engine(
        stage1,
        gate=GpuGate(None, 512, 30.0),
        stage2_cpu=stage2,
        candidates=3,
        cache=cache,
        windows=Windower(stage1.runner if isinstance(stage1, Recording) else stage1, **windower),
    )


# --- the windows themselves


def test_chunk_windows_fit_overlap_and_cover_the_document(
    stage1: FlashRankRunner, case: Case
) -> None:
    plan = Windower(stage1, overlap_tokens=64).plan(QUERY, [case.long_doc], CHUNK)
    assert len(plan.texts) >= 2 and plan.owners == [0] * len(plan.texts)
    spans = [s for s in plan.spans if s is not None]
    assert len(spans) == len(plan.texts)
    doc_tokens = stage1.encode_texts([case.long_doc])[0]
    starts = [next(i for i, t in enumerate(doc_tokens.spans) if t[0] == a) for a, _ in spans]
    for (a, b), text, pair_tokens, start in zip(
        spans, plan.texts, plan.pair_tokens or [], starts, strict=True
    ):
        assert text == case.long_doc[a:b]  # a substring of the document
        # Cut at word boundaries: the window tokenizes again to exactly its planned tokens, and
        # query + window fits in the model's 512 without truncation.
        (again,) = stage1.encode_texts([text])
        assert len(stage1.tokenize(QUERY, [text])[0].ids) == pair_tokens <= stage1.max_length
        assert start in word_cuts(doc_tokens.words)
        assert len(again.words) + len(stage1.tokenize(QUERY, [""])[0].ids) == pair_tokens
    assert spans[0][0] == 0 and spans[-1][1] == len(case.long_doc.rstrip())
    for (a1, b1), (a2, b2) in itertools.pairwise(spans):
        assert a1 < a2 < b1 < b2  # overlapping, moving forward


def test_short_documents_are_scored_whole(stage1: FlashRankRunner, case: Case) -> None:
    plan = Windower(stage1).plan(QUERY, case.competitors, CHUNK)
    assert plan.texts == case.competitors and plan.spans == [None] * len(case.competitors)
    assert plan.pair_tokens == [len(e.ids) for e in stage1.tokenize(QUERY, case.competitors)]


def test_truncate_keeps_the_start_or_the_end(stage1: FlashRankRunner, case: Case) -> None:
    windower = Windower(stage1)
    (start,) = windower.plan(QUERY, [case.long_doc], TRUNCATE).spans
    (end,) = windower.plan(QUERY, [case.long_doc], LongDocPolicy(keep="end")).spans
    assert start is not None and start[0] == 0 and start[1] < len(case.filler)
    assert end is not None and end[1] == len(case.long_doc) and 0 < end[0] < len(case.filler)
    (pair_tokens,) = windower.plan(QUERY, [case.long_doc], TRUNCATE).pair_tokens or []
    assert stage1.max_length - 20 < pair_tokens <= stage1.max_length  # cut at a word boundary


def test_max_chunks_and_max_tokens(stage1: FlashRankRunner, case: Case) -> None:
    windower = Windower(stage1, overlap_tokens=0)
    three = windower.plan(QUERY, [case.long_doc * 3], LongDocPolicy(mode="chunk", max_chunks=2))
    assert len(three.texts) == 2
    first = windower.plan(QUERY, [case.long_doc], LongDocPolicy(mode="chunk", max_tokens=40))
    (span,) = first.spans
    assert span is not None and span[0] == 0
    assert len(stage1.encode_texts(first.texts)[0].words) <= 40


def test_a_long_query_is_cut_to_max_query_tokens(stage1: FlashRankRunner, case: Case) -> None:
    plan = Windower(stage1, max_query_tokens=50).plan(case.filler, [case.long_doc], TRUNCATE)
    (query_tokens,) = stage1.encode_texts([plan.query])
    assert case.filler.startswith(plan.query) and 40 < len(query_tokens.words) <= 50
    # The document got the rest of the 512 tokens.
    assert len(stage1.tokenize(plan.query, plan.texts)[0].ids) >= stage1.max_length - 1


def test_too_many_windows_is_refused(stage1: FlashRankRunner, case: Case) -> None:
    policy = LongDocPolicy(mode="chunk", max_windows=3)
    with pytest.raises(InvalidRequestError) as error:
        Windower(stage1).plan(QUERY, [case.long_doc, case.long_doc], policy)
    assert error.value.field == "documents"  # the job's part; the HTTP layer names the field
    renamed = error.value.renamed({"jobs": "requests", "documents": "jobs[1].documents"})
    assert renamed.renamed({"jobs": "requests"}).field == "requests[1].documents"
    assert "max_windows_per_request" in str(error.value) and "3" in str(error.value)
    # Truncating makes one window per document: the same request fits.
    Windower(stage1).plan(QUERY, [case.long_doc] * 3, LongDocPolicy(max_windows=3))


# --- the cascade over windows


def test_chunk_ranks_the_document_first_and_truncate_does_not(
    stage1: FlashRankRunner, case: Case
) -> None:
    engine = engine_with(stage1)
    docs = [*case.competitors, case.long_doc]
    long_index = len(docs) - 1

    chunked = engine.rerank(RerankJob(QUERY, docs, top_k=len(docs), policy=CHUNK))
    assert chunked.results[0].index == long_index
    assert chunked.results[0].score == case.best_score  # exactly its best window, scored alone
    truncated = engine.rerank(RerankJob(QUERY, docs, top_k=len(docs), policy=TRUNCATE))
    assert truncated.results[0].index != long_index
    assert truncated.results[-1].index == long_index
    assert truncated.results[-1].score == case.first_score

    # The best window is reported, and scoring it alone gives the document's score.
    window = chunked.results[0].window
    assert window is not None and window[1] > len(case.filler)
    assert stage1.score(QUERY, [case.long_doc[slice(*window)]]) == [case.best_score]
    # Competitors are whole documents: same scores in both modes.
    by_index = {r.index: r.score for r in truncated.results}
    assert all(by_index[r.index] == r.score for r in chunked.results[1:])
    assert chunked.windows > truncated.windows == len(docs)


def test_window_scores_equal_direct_scores_in_both_stages(
    stage1: FlashRankRunner, stage2: CrossEncoderRunner, case: Case
) -> None:
    first, second = Recording(stage1), Recording(stage2)
    engine = engine_with(first, second)
    docs = [*case.competitors, case.long_doc]
    out = engine.rerank(RerankJob(QUERY, docs, top_k=len(docs), policy=CHUNK))
    plan = Windower(stage1).plan(QUERY, docs, CHUNK)
    windows = [
        t for t, owner in zip(plan.texts, plan.owners, strict=True) if owner == len(docs) - 1
    ]
    assert len(windows) >= 2
    # Stage 1 scored every window; stage 2 scored every window of its candidates: the same texts.
    assert first.calls == [plan.texts]
    assert set(windows) <= set(second.calls[0])
    final = {r.index: r for r in out.results}[len(docs) - 1]
    direct = [stage2.score(QUERY, [w])[0] for w in windows]
    assert final.score == pytest.approx(max(direct), abs=1e-5)
    best = windows[direct.index(max(direct))]
    assert final.window is not None and case.long_doc[slice(*final.window)] == best
    assert out.pair_tokens == sum(len(e.ids) for e in stage1.tokenize(QUERY, plan.texts))


def test_windows_are_cached_like_documents(stage1: FlashRankRunner, case: Case) -> None:
    engine = engine_with(stage1, cache=MemoryScoreCache(2**20))
    docs = [*case.competitors, case.long_doc]
    cold = engine.rerank(RerankJob(QUERY, docs, top_k=3, policy=CHUNK))
    warm = engine.rerank(RerankJob(QUERY, docs, top_k=3, policy=CHUNK))
    assert cold.stages[0].cached == 0 and warm.stages[0].cached == cold.windows
    assert warm.results == cold.results and warm.tokens == 0 and warm.pair_tokens > 0
    # Truncation's window is chunk's first window: the same text, so a cache hit too.
    truncated = engine.rerank(RerankJob(QUERY, docs, top_k=3, policy=TRUNCATE))
    assert truncated.stages[0].cached == len(docs)


def test_no_windower_scores_documents_whole(case: Case) -> None:
    plan = WindowPlan.whole(QUERY, [case.long_doc, "x"])
    assert plan.texts == [case.long_doc, "x"] and plan.pair_tokens is None


def test_settings_choose_the_default(make_settings: Any, case: Case) -> None:
    engine = load_engine(make_settings(long_documents="chunk", max_chunks_per_doc=2, warmup=False))
    out = engine.rerank(RerankJob(QUERY, [case.long_doc * 3, "paris"], top_k=2))
    assert out.windows == 3  # two chunks (max_chunks_per_doc) + the short document
    engine = load_engine(make_settings(warmup=False))
    assert engine.rerank(RerankJob(QUERY, [case.long_doc * 3, "paris"], top_k=2)).windows == 2


# --- the dialects over HTTP


@pytest.fixture(scope="module")
def server(tiny_models: TestModelPaths, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = Settings(
        stage1_model=str(tiny_models.stage1),
        stage2_model=str(tiny_models.stage2),
        model_cache_dir=tmp_path_factory.mktemp("cache"),
        offline=True,
        device="cpu",
        cpu_threads=1,
        stage1_batch_tokens=512,  # long pairs alone in a batch, as in the engine tests above
        max_windows_per_request=20,
        cache_enabled=False,
    )
    with running(create_app(settings)) as url:
        yield url


def post(server: str, path: str, body: dict[str, Any], status: int = 200) -> Any:
    response = httpx.post(f"{server}{path}", json=body, timeout=60)
    assert response.status_code == status, response.text
    return response.json()


def ranking(results: list[dict[str, Any]]) -> list[tuple[int, float]]:
    return [(r["index"], r.get("relevance_score", r.get("score"))) for r in results]


def test_native_field_over_http(server: str, case: Case) -> None:
    docs = [*case.competitors, case.long_doc]
    body = {"query": QUERY, "documents": docs, "top_k": len(docs), "return_window": True}
    chunked = post(server, "/rerank", {**body, "long_documents": "chunk"})
    truncated = post(server, "/rerank", {**body, "long_documents": "truncate"})
    default = post(server, "/rerank", body)
    assert chunked["results"][0]["index"] == len(docs) - 1
    assert truncated["results"][0]["index"] != len(docs) - 1
    assert ranking(default["results"]) == ranking(truncated["results"])  # the server's default
    window = chunked["results"][0]["window"]
    assert window["text"] == case.long_doc[window["start"] : window["end"]]
    assert window["end"] > len(case.filler)
    assert "window" not in chunked["results"][1]  # a short document was scored whole
    assert chunked["usage"]["total_tokens"] > truncated["usage"]["total_tokens"] > 0
    assert "window" not in post(server, "/rerank", {**body, "return_window": False})["results"][0]


def test_dialect_fields_map_onto_the_same_behaviour(server: str, case: Case) -> None:
    docs = [*case.competitors, case.long_doc]
    native: dict[str, Any] = {"query": QUERY, "documents": docs, "top_k": len(docs)}
    chunk = ranking(post(server, "/rerank", {**native, "long_documents": "chunk"})["results"])
    truncate = ranking(post(server, "/rerank", {**native, "long_documents": "truncate"})["results"])
    assert chunk != truncate

    # Cohere v1: max_chunks_per_doc means chunk (the SDK sends it).
    with cohere.Client(api_key="k", base_url=server) as co:
        v1 = co.rerank(query=QUERY, documents=docs, max_chunks_per_doc=3, model="m")
    assert [(r.index, r.relevance_score) for r in v1.results] == chunk
    assert v1.meta is not None and v1.meta.tokens is not None
    assert v1.meta.tokens.input_tokens and v1.meta.tokens.input_tokens > 0
    # Cohere v2 / vLLM: max_tokens_per_doc (all of this document's tokens) means chunk.
    with cohere.ClientV2(api_key="k", base_url=server) as co2:
        v2 = co2.rerank(model="m", query=QUERY, documents=docs, max_tokens_per_doc=4096)
    assert [(r.index, r.relevance_score) for r in v2.results] == chunk
    vllm = post(server, "/v1/rerank", {"query": QUERY, "documents": docs, "max_tokens_per_doc": 40})
    native_40 = post(server, "/rerank", {**native, "max_tokens_per_doc": 40})
    assert ranking(vllm["results"]) == ranking(native_40["results"]) != chunk
    # No field: the server's default (truncate).
    plain = post(server, "/v2/rerank", {"model": "m", "query": QUERY, "documents": docs})
    assert ranking(plain["results"]) == truncate

    # TEI: truncate true / false, truncation_direction.
    tei = {"query": QUERY, "texts": docs}
    assert ranking(post(server, "/rerank", {**tei, "truncate": True})) == truncate
    assert ranking(post(server, "/rerank", {**tei, "truncate": False})) == chunk
    left = ranking(
        post(server, "/rerank", {**tei, "truncate": True, "truncation_direction": "Left"})
    )
    native_left = post(
        server, "/rerank", {**native, "long_documents": "truncate", "truncation_direction": "left"}
    )
    assert left == ranking(native_left["results"]) != truncate


@pytest.mark.parametrize(
    ("path", "extra", "field", "words_in_message"),
    [
        ("/v1/rerank", {"max_chunks_per_doc": 5}, "max_chunks_per_doc", ["25", "20"]),
        ("/rerank", {"top_k": 1, "long_documents": "chunk"}, "documents", ["20", "windows"]),
        ("/rerank", {"top_k": 1, "max_chunks_per_doc": 0}, "max_chunks_per_doc", []),
        ("/rerank", {"top_k": 1, "long_documents": "split"}, "long_documents", []),
        ("/rerank", {"top_k": 1, "truncation_direction": "up"}, "truncation_direction", []),
        ("/v2/rerank", {"max_tokens_per_doc": -1}, "max_tokens_per_doc", []),
    ],
)
def test_limits_give_clear_errors(
    server: str,
    case: Case,
    path: str,
    extra: dict[str, Any],
    field: str,
    words_in_message: list[str],
) -> None:
    docs = [case.long_doc] * 11 if extra.get("long_documents") == "chunk" else [case.long_doc] * 5
    data = post(server, path, {"query": QUERY, "documents": docs, **extra}, status=422)
    assert data["field"] == field
    assert all(word in data["error"] for word in words_in_message), data["error"]
    if "windows" in words_in_message:
        assert "max_windows_per_request" in data["error"]


def test_batch_item_names_its_documents(server: str, case: Case) -> None:
    ok = {"query": QUERY, "documents": ["paris"], "top_k": 1}
    too_many = {**ok, "documents": [case.long_doc] * 11, "long_documents": "chunk"}
    data = post(server, "/rerank/batch", {"requests": [ok, too_many]}, status=422)
    assert data["field"] == "requests[1].documents"
    fits = {**too_many, "documents": [*case.competitors[:2], case.long_doc]}
    answer = post(server, "/rerank/batch", {"requests": [ok, fits]})
    assert answer["responses"][1]["results"][0]["index"] == 2


def test_planning_stops_when_the_request_is_cancelled() -> None:
    """Windows are planned (tokenized) a slice of documents at a time; a request nobody waits for
    any more stops at the next slice."""

    class Counting:
        max_length = 64
        pair_special_tokens = 3

        def __init__(self, cancel: Cancellation) -> None:
            self.cancel = cancel
            self.encoded = 0

        def encode_texts(self, texts: Sequence[str]) -> list[TextTokens]:
            self.encoded += len(texts)
            if self.encoded > 1:  # the query, then the first slice of documents
                self.cancel.cancel("client closed the connection")
            return [TextTokens([(0, len(t))], [0]) for t in texts]

    cancel = Cancellation()
    encoder = Counting(cancel)
    with pytest.raises(RequestCancelledError):
        Windower(encoder).plan("q", ["doc"] * (GROUP * 3), TRUNCATE, cancel=cancel)
    assert encoder.encoded == 1 + FIRST_GROUP
