"""End to end: real uvicorn on 127.0.0.1, generated models, real HTTP."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import numpy as np
import pytest
from flashrank import Ranker, RerankRequest
from sentence_transformers import CrossEncoder

from reranker_server.app import create_app
from reranker_server.engine.loader import load_engine
from reranker_server.model_generator import TestModelPaths
from reranker_server.settings import Settings

from .conftest import running
from .fakes import FakeAccelerator

SPEC_BODY = {
    "query": "What is the capital of France?",
    "documents": [
        "Paris is the capital and most populous city of France.",
        "Berlin is the capital of Germany.",
        "The Eiffel Tower is located in Paris.",
    ],
    "top_k": 2,
}
QUERY = "what is the capital of france"
DOCS = [
    f"{w} is a city in {c} near the {r}"
    for w, c, r in [
        ("paris", "france", "river"),
        ("berlin", "germany", "tower"),
        ("music", "europe", "sun"),
        ("data", "world", "bank"),
        ("king", "country", "school"),
        ("dog", "france", "moon"),
        ("river", "paris", "city"),
        ("book", "film", "game"),
        ("star", "planet", "earth"),
        ("tree", "plant", "flower"),
        ("team", "player", "sport"),
        ("cancer", "drug", "study"),
    ]
]


def flashrank_scores(models: TestModelPaths, query: str, docs: list[str]) -> list[float]:
    """FlashRank's score of each passage alone: what stage 1 returns whatever the batch
    (see runners/flashrank.py on batch-invariant scores)."""
    ranker = Ranker(model_name=models.stage1.name, cache_dir=str(models.stage1.parent))
    return [
        float(ranker.rerank(RerankRequest(query=query, passages=[{"text": d}]))[0]["score"])
        for d in docs
    ]


def best_first(scores: list[float]) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


@pytest.fixture
def cpu_server(make_settings: Callable[..., Settings]) -> Iterator[str]:
    with running(create_app(make_settings())) as url:
        yield url


@pytest.fixture
def fake_gpu() -> FakeAccelerator:
    return FakeAccelerator()


@pytest.fixture
def gpu_server(make_settings: Callable[..., Settings], fake_gpu: FakeAccelerator) -> Iterator[str]:
    settings = make_settings(candidates=4, gpu_cooldown_s=60)
    app = create_app(settings, engine_factory=lambda s: load_engine(s, detect=lambda *_: fake_gpu))
    with running(app) as url:
        yield url


def test_spec_example_verbatim(cpu_server: str) -> None:
    response = httpx.post(
        f"{cpu_server}/rerank", json=SPEC_BODY, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 200
    body = response.json()
    assert body["backend"] == "cpu"
    assert len(body["results"]) == 2
    for result in body["results"]:
        assert set(result) >= {"index", "text", "score"}
        assert SPEC_BODY["documents"][result["index"]] == result["text"]
        assert 0.0 <= result["score"] <= 1.0
    scores = [r["score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True)


def test_cpu_order_is_flashranks_order(cpu_server: str, tiny_models: TestModelPaths) -> None:
    expected = flashrank_scores(tiny_models, QUERY, DOCS)
    body = httpx.post(
        f"{cpu_server}/rerank", json={"query": QUERY, "documents": DOCS, "top_k": 5}
    ).json()
    assert [r["index"] for r in body["results"]] == best_first(expected)[:5]
    assert [r["score"] for r in body["results"]] == pytest.approx(
        [expected[i] for i in best_first(expected)[:5]], abs=1e-5
    )
    assert body["fallback"] == "no_gpu"
    assert [s["name"] for s in body["stages"]] == [tiny_models.stage1.name]


def test_gpu_path_reorders_candidates_with_the_cross_encoder(
    gpu_server: str, tiny_models: TestModelPaths
) -> None:
    candidates = best_first(flashrank_scores(tiny_models, QUERY, DOCS))[:4]
    model = CrossEncoder(str(tiny_models.stage2), device="cpu")
    logits = model.predict(
        [(QUERY, DOCS[i]) for i in candidates], activation_fn=lambda x: x, show_progress_bar=False
    )
    ce = (1 / (1 + np.exp(-np.asarray(logits, dtype=np.float64)))).tolist()
    expected = [candidates[j] for j in best_first(ce)]

    body = httpx.post(
        f"{gpu_server}/rerank", json={"query": QUERY, "documents": DOCS, "top_k": 3}
    ).json()

    assert body["backend"] == "gpu" and body["fallback"] is None
    assert [r["index"] for r in body["results"]] == expected[:3]
    assert [r["score"] for r in body["results"]] == pytest.approx(
        sorted(ce, reverse=True)[:3], abs=1e-5
    )
    assert expected[:3] != best_first(flashrank_scores(tiny_models, QUERY, DOCS))[:3], (
        "the test needs a case where stage 2 changes the order"
    )
    health = httpx.get(f"{gpu_server}/health").json()
    assert health["gpu_model_loaded"] is True and health["gpu_state"] == "ok"


def test_gpu_oom_answers_from_stage1_and_cools_down(
    gpu_server: str, fake_gpu: FakeAccelerator, tiny_models: TestModelPaths
) -> None:
    fake_gpu.oom_at_pairs = 1
    body = {"query": QUERY, "documents": DOCS, "top_k": 3}
    first = httpx.post(f"{gpu_server}/rerank", json=body)
    assert first.status_code == 200
    assert (first.json()["backend"], first.json()["fallback"]) == ("cpu", "oom")
    stage1 = best_first(flashrank_scores(tiny_models, QUERY, DOCS))
    assert [r["index"] for r in first.json()["results"]] == stage1[:3]
    # the OOM ladder: 4 candidates, then 2, then 1 pair; cache freed at each rung and at the end
    assert fake_gpu.forwards[-3:] == [4, 2, 1]
    assert fake_gpu.cache_emptied == 3

    health = httpx.get(f"{gpu_server}/health").json()
    assert health["gpu_state"] == "cooling_down" and health["gpu_last_failure"] == "oom"
    fake_gpu.oom_at_pairs = None
    second = httpx.post(f"{gpu_server}/rerank", json=body).json()
    assert (second["backend"], second["fallback"]) == ("cpu", "cooldown")


def test_gpu_cuda_error_and_low_vram(
    gpu_server: str, fake_gpu: FakeAccelerator, make_settings: Callable[..., Settings]
) -> None:
    body = {"query": QUERY, "documents": DOCS, "top_k": 3}
    fake_gpu.free_mb = 100  # under the 512 MB default
    low = httpx.post(f"{gpu_server}/rerank", json=body).json()
    assert (low["backend"], low["fallback"]) == ("cpu", "low_vram")
    assert fake_gpu.forwards == [1]  # only the warm-up pair reached the device
    fake_gpu.free_mb = 4096
    fake_gpu.cuda_error = True
    bad = httpx.post(f"{gpu_server}/rerank", json=body)
    assert bad.status_code == 200 and bad.json()["fallback"] == "cuda_error"


def test_duplicates_empty_and_large_top_k(cpu_server: str) -> None:
    docs = ["paris is the capital", "berlin", "paris is the capital"]
    body = httpx.post(
        f"{cpu_server}/rerank", json={"query": "capital", "documents": docs, "top_k": 10}
    ).json()
    assert sorted(r["index"] for r in body["results"]) == [0, 1, 2]
    dup = [r for r in body["results"] if r["index"] in (0, 2)]
    assert dup[0]["score"] == pytest.approx(dup[1]["score"], abs=1e-6)
    empty = httpx.post(f"{cpu_server}/rerank", json={"query": "q", "documents": [], "top_k": 3})
    assert empty.status_code == 200 and empty.json()["results"] == []


BAD_INPUT = [
    ({"documents": ["a"], "top_k": 1}, 422, "query"),
    ({"query": "", "documents": ["a"], "top_k": 1}, 422, "query"),
    ({"query": "   ", "documents": ["a"], "top_k": 1}, 422, "query"),
    ({"query": 5, "documents": ["a"], "top_k": 1}, 422, "query"),
    ({"query": "q", "top_k": 1}, 422, "documents"),
    ({"query": "q", "documents": "a", "top_k": 1}, 422, "documents"),
    ({"query": "q", "documents": ["a", 3], "top_k": 1}, 422, "documents[1]"),
    ({"query": "q", "documents": ["a", None], "top_k": 1}, 422, "documents[1]"),
    ({"query": "q", "documents": ["a"], "top_k": 0}, 422, "top_k"),
    ({"query": "q", "documents": ["a"], "top_k": -3}, 422, "top_k"),
    ({"query": "q", "documents": ["a"], "top_k": 2.5}, 422, "top_k"),
    ({"query": "q", "documents": ["a"], "top_k": "2"}, 422, "top_k"),
    ({"query": "q", "documents": ["a"] * 6, "top_k": 1}, 422, "documents"),
    ({"query": "q", "documents": ["a", "x" * 101], "top_k": 1}, 422, "documents[1]"),
    ({"query": "q" * 51, "documents": ["a"], "top_k": 1}, 422, "query"),
    (["not", "an", "object"], 422, "body"),
]


@pytest.fixture
def strict_server(make_settings: Callable[..., Settings]) -> Iterator[str]:
    settings = make_settings(
        max_documents=5, max_document_chars=100, max_query_chars=50, max_body_bytes=4096
    )
    with running(create_app(settings)) as url:
        yield url


@pytest.mark.parametrize(("body", "status", "field"), BAD_INPUT)
def test_bad_input_is_a_clear_4xx(
    strict_server: str, body: object, status: int, field: str
) -> None:
    response = httpx.post(f"{strict_server}/rerank", json=body)
    assert response.status_code == status, response.text
    error = response.json()
    assert error["field"] == field
    assert error["error_type"] == "invalid_request"
    assert field.split("[")[0] in error["error"] and error["detail"] == error["error"]
    if "limit" in error["error"]:
        assert any(str(n) in error["error"] for n in (5, 100, 50))


def test_malformed_json_wrong_type_and_huge_body(strict_server: str) -> None:
    bad_json = httpx.post(
        f"{strict_server}/rerank",
        content=b'{"query": "q", ',
        headers={"Content-Type": "application/json"},
    )
    assert bad_json.status_code == 400 and bad_json.json()["error_type"] == "invalid_json"
    text = httpx.post(
        f"{strict_server}/rerank", content=b"query=q", headers={"Content-Type": "text/plain"}
    )
    assert text.status_code == 415 and "application/json" in text.json()["error"]
    huge = httpx.post(
        f"{strict_server}/rerank",
        content=b"[" + b"1," * 5000 + b"1]",
        headers={"Content-Type": "application/json"},
    )
    assert huge.status_code == 413 and "4096" in huge.json()["error"]

    def chunks() -> Iterator[bytes]:
        for _ in range(100):
            yield b" " * 100

    streamed = httpx.post(
        f"{strict_server}/rerank", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert streamed.status_code == 413
    no_type = httpx.post(
        f"{strict_server}/rerank", content=b'{"query": "q", "documents": ["a"], "top_k": 1}'
    )
    assert no_type.status_code == 200


def test_health_answers_fast_during_a_1000_document_rerank(cpu_server: str) -> None:
    docs = [f"document number {i} about paris and the capital of france " * 8 for i in range(1000)]
    done: dict[str, httpx.Response] = {}

    def big() -> None:
        done["r"] = httpx.post(
            f"{cpu_server}/rerank",
            json={"query": QUERY, "documents": docs, "top_k": 3},
            timeout=120,
        )

    worker = threading.Thread(target=big)
    worker.start()
    time.sleep(0.3)  # the rerank is running now
    with httpx.Client(base_url=cpu_server) as client:
        client.get("/health")  # connection set up outside the timing
        latencies = []
        while worker.is_alive() and len(latencies) < 20:
            started = time.perf_counter()
            assert client.get("/health").status_code == 200
            latencies.append(time.perf_counter() - started)
            time.sleep(0.05)
    worker.join()
    assert done["r"].status_code == 200 and len(done["r"].json()["results"]) == 3
    assert len(latencies) >= 3, "the rerank finished before health could be probed"
    # A blocked event loop would hold /health for the whole rerank (seconds); the bound is loose
    # so that a busy 2-core machine can't break the test.
    assert statistics.median(latencies) < 1.0, latencies


def test_health_fields_and_docs(cpu_server: str) -> None:
    health = httpx.get(f"{cpu_server}/health").json()
    assert health["status"] == "ok"
    assert health["cuda_available"] is False and health["gpu_model_loaded"] is False
    assert httpx.get(f"{cpu_server}/health/live").json() == {"status": "ok"}
    assert httpx.get(f"{cpu_server}/health/ready").json() == {"status": "ready"}
    assert httpx.get(f"{cpu_server}/docs").status_code == 200
    schema = httpx.get(f"{cpu_server}/openapi.json").json()
    request = schema["components"]["schemas"]["RerankRequest"]
    assert set(request["required"]) == {"query", "documents"}
    assert "top_k" in request["properties"] and "anyOf" not in request  # optional: all
    assert request["examples"][0]["top_k"] == 2
    assert "RerankResponse" in schema["components"]["schemas"]
