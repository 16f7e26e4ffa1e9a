"""Engine v2: the runner registry (a new kind served end to end), per-request `candidates` and
`return_stages`, the one error table, dialect labels, and the service used without HTTP."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import httpx
import pytest

from reranker_server import errors
from reranker_server.api.errors import STATUS_BY_ERROR, status_of
from reranker_server.app import RerankerApp, create_app
from reranker_server.devices import GpuGate
from reranker_server.engine.engine import Engine
from reranker_server.runners import registry
from reranker_server.runners.base import Pair, PairwiseRunner
from reranker_server.runners.kind import modelless_kind
from reranker_server.service import RerankService
from reranker_server.settings import Settings
from reranker_server.types import RerankJob

from .conftest import running
from .fakes import KeywordRunner
from .keyword_server import keyword_app

QUERY = "capital of france"
DOCS = [
    "berlin is the capital of germany",  # stage 1: 2nd or 3rd (2 of 3 words)
    "paris is the capital of france",  # stage 1: 2nd (all words, longer)
    "the eiffel tower",  # stage 1: last
    "france has wine",  # stage 1: 4th
    "capital of france: paris",  # stage 1: 1st (all words, shortest)
]


def by_length(doc: str) -> float:
    """A stage-2 scorer that disagrees with stage 1: longer is better."""
    return len(doc) / 100


def cascade_app(**overrides: Any) -> RerankerApp:
    """KeywordRunner as stage 1, a by-length scorer as stage 2 on the CPU (candidates 2)."""

    def build() -> Engine:
        return Engine(
            KeywordRunner("stage1"),
            gate=GpuGate(None, 0, 0),
            stage2_cpu=KeywordRunner("stage2", weight=by_length),
            candidates=2,
        )

    return keyword_app(build, **{"max_candidates": 4, **overrides})


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with running(cascade_app()) as url:
        yield url


def rerank(server: str, **body: Any) -> httpx.Response:
    return httpx.post(f"{server}/rerank", json={"query": QUERY, "documents": DOCS, **body})


def stage1_order() -> list[int]:
    scores = KeywordRunner().score(QUERY, DOCS)
    return sorted(range(len(DOCS)), key=lambda i: (-scores[i], i))


# --- per-request candidates


def test_default_candidates_come_from_the_settings(server: str) -> None:
    answer = rerank(server, top_k=1).json()
    assert answer["stages"][1]["documents"] == 2
    # stage 2 (longer is better) reorders stage 1's best two
    best_two = stage1_order()[:2]
    assert answer["results"][0]["index"] == max(best_two, key=lambda i: len(DOCS[i]))


def test_candidates_per_request_reach_deeper_into_stage_1(server: str) -> None:
    answer = rerank(server, top_k=1, candidates=4).json()
    assert answer["stages"][1]["documents"] == 4  # the stage-2 report shows what it scored
    deeper = stage1_order()[:4]
    assert answer["results"][0]["index"] == max(deeper, key=lambda i: len(DOCS[i]))
    assert answer["results"][0]["index"] != rerank(server, top_k=1).json()["results"][0]["index"]


def test_candidates_are_never_fewer_than_top_k(server: str) -> None:
    answer = rerank(server, top_k=3, candidates=1).json()
    assert answer["stages"][1]["documents"] == 3 and len(answer["results"]) == 3


@pytest.mark.parametrize("value", [5, 0, "many", True])
def test_candidates_out_of_range_get_a_422_naming_the_field(server: str, value: Any) -> None:
    response = rerank(server, top_k=1, candidates=value)
    assert response.status_code == 422, response.text
    error = response.json()
    assert error["field"] == "candidates"
    if value == 5:
        assert "RERANKER_MAX_CANDIDATES" in error["error"] and "4" in error["error"]


def test_batch_items_take_candidates_and_errors_name_the_item(server: str) -> None:
    item = {"query": QUERY, "documents": DOCS, "top_k": 1}
    ok = httpx.post(
        f"{server}/rerank/batch", json={"requests": [item, {**item, "candidates": 4}]}
    ).json()
    assert [r["stages"][1]["documents"] for r in ok["responses"]] == [2, 4]
    bad = httpx.post(
        f"{server}/rerank/batch", json={"requests": [item, {**item, "candidates": 50}]}
    )
    assert bad.status_code == 422
    assert bad.json()["field"] == "requests[1].candidates"
    assert "requests[1].candidates is 50" in bad.json()["error"]


# --- return_stages


def test_return_stages_gives_each_result_its_stage_1_score_and_rank(server: str) -> None:
    answer = rerank(server, top_k=4, candidates=4, return_stages=True).json()
    stage1 = KeywordRunner().score(QUERY, DOCS)
    order = stage1_order()
    for result in answer["results"]:
        assert result["stage1_rank"] == order.index(result["index"]) + 1
        assert result["stage1_score"] == pytest.approx(stage1[result["index"]])
    plain = rerank(server, top_k=4, candidates=4).json()
    assert "stage1_rank" not in plain["results"][0]  # opt-in
    assert [r["index"] for r in plain["results"]] == [r["index"] for r in answer["results"]]


# --- dialect labels


def test_tei_requests_are_labelled_tei_in_metrics(server: str) -> None:
    assert httpx.post(f"{server}/rerank", json={"query": QUERY, "texts": DOCS}).status_code == 200
    text = httpx.get(f"{server}/metrics").text
    assert 'reranker_requests_total{dialect="tei",route="/rerank",status="200"}' in text


# --- one error table


def test_every_error_class_has_a_status_in_the_one_table() -> None:
    classes = [
        cls
        for _, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, errors.RerankerError)
    ]
    for cls in classes:
        assert any(base in STATUS_BY_ERROR for base in cls.__mro__), cls
    assert status_of(errors.RerankerError("x")) == 500
    assert status_of(errors.PayloadTooLargeError("x")) == 413  # the nearest class wins
    assert status_of(errors.ModelNotFoundError("x")) == 404


def test_router_errors_are_json_from_the_same_table(server: str) -> None:
    missing = httpx.get(f"{server}/no-such-route")
    assert missing.status_code == 404 and missing.json()["error_type"] == "not_found"
    wrong = httpx.put(f"{server}/rerank", json={})
    assert wrong.status_code == 405 and wrong.json()["error_type"] == "method_not_allowed"
    assert "POST" in wrong.headers["allow"]


def test_renamed_errors_name_the_request_fields() -> None:
    error = errors.InvalidRequestError("documents[3] has 9 characters", field="documents[3]")
    tei = error.renamed({"documents": "texts"})
    assert (str(tei), tei.field) == ("texts[3] has 9 characters", "texts[3]")
    assert str(error) == "documents[3] has 9 characters"  # the original is unchanged


# --- a new runner kind through the registry alone


class ShortestFirst(PairwiseRunner):
    """A runner kind the project does not ship: shorter documents score higher."""

    def __init__(self, model: str) -> None:
        self.name = f"shortest-first:{model}"
        self.max_pairs = 8

    def score_pairs(self, pairs: Sequence[Pair]) -> list[float]:
        return [1.0 / (1 + len(document)) for _, document in pairs]


SHORTEST_FIRST = modelless_kind(
    "shortest-first", lambda spec, _target: ShortestFirst(spec.model), stage1=False
)


def test_a_runner_kind_added_through_the_registry_is_served_end_to_end(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(registry.RUNNER_KINDS, "shortest-first", SHORTEST_FIRST)
    settings = make_settings(
        stage2_kind="shortest-first", stage2_model="demo", stage2_on_cpu=True, candidates=4
    )
    with running(create_app(settings)) as url:
        answer = rerank(url, top_k=3).json()
        health = httpx.get(f"{url}/health").json()
    assert [s["name"] for s in answer["stages"]][1] == "shortest-first:demo"
    scored = answer["stages"][1]["documents"]
    assert scored == 4
    texts = [r["text"] for r in answer["results"]]
    assert texts == sorted(texts, key=len)  # the new kind's order
    assert health["stage2_model"] == "shortest-first:demo"


def test_an_unknown_runner_kind_is_one_line_naming_the_kinds(
    make_settings: Callable[..., Settings],
) -> None:
    with pytest.raises(errors.ModelLoadError, match=r"unknown runner kind 'nope'.*flashrank"):
        registry.kind_of("nope")


# --- the service without HTTP (a notebook, the CLI)


def test_the_service_answers_jobs_without_http() -> None:
    async def use() -> tuple[list[int], int, bool]:
        service = RerankService(
            Settings(stage1_model="unused", offline=True, device="cpu"),
            engine_factory=lambda _s: Engine(KeywordRunner(), gate=GpuGate(None, 0, 0)),
        )
        await service.start()
        outcome = await service.rerank(RerankJob(QUERY, DOCS, top_k=3))
        status = service.status()
        await service.close()
        return [r.index for r in outcome.results], status.in_flight, status.loaded

    order, in_flight, loaded = asyncio.run(use())
    assert order == stage1_order()[:3] and in_flight == 0 and loaded
