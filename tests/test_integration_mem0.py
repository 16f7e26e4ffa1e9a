"""mem0 with the reranker-server provider, end to end: the real `mem0.Memory` (local Qdrant,
a sentence-transformers embedder over the generated tiny model, no LLM call) against uvicorn on
127.0.0.1. Search results must come back in the server's order, with the server's scores; a failure
must be logged as an error (or raised, with `raise_on_error`). Also mem0's own cohere provider
pointed at the server through `CO_API_URL`."""

from __future__ import annotations

import os
import tempfile

# mem0 reads these when it is first imported: no telemetry (a network call), no ~/.mem0.
os.environ["MEM0_TELEMETRY"] = "false"
os.environ.setdefault("MEM0_DIR", tempfile.mkdtemp(prefix="mem0-"))

import inspect
import json
import logging
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from mem0 import Memory
from mem0.utils.factory import RerankerFactory
from pydantic import ValidationError

from reranker_server.app import create_app
from reranker_server.client import ConnectionFailed, RerankerClient
from reranker_server.integrations.mem0 import (
    PROVIDER,
    RerankerServerReranker,
    RerankFailed,
)
from reranker_server.model_generator import TestModelPaths
from reranker_server.settings import Settings

from .conftest import free_port, running
from .keyword_server import BEST_FIRST, DOCUMENTS, QUERY, keyword_app

USER = {"user_id": "alice"}
MakeMemory = Callable[[dict[str, Any]], Memory]
BEST_TEXTS = [DOCUMENTS[i] for i in BEST_FIRST]


@pytest.fixture(scope="module")
def keyword_url() -> Iterator[str]:
    with running(keyword_app()) as url:
        yield url


@pytest.fixture
def make_memory(
    tiny_models: TestModelPaths, tmp_path: Path
) -> Iterator[Callable[[dict[str, Any]], Memory]]:
    made: list[Memory] = []

    def build(reranker_config: dict[str, Any]) -> Memory:
        reranker = {"provider": PROVIDER, "config": reranker_config}
        memory = memory_with(reranker, tiny_models, tmp_path)
        made.append(memory)
        return memory

    yield build
    for memory in made:
        memory.vector_store.client.close()


def memory_with(reranker: dict[str, Any], models: TestModelPaths, directory: Path) -> Memory:
    """A mem0 Memory that works offline: local Qdrant, the tiny model as embedder, and an LLM that
    is configured (mem0 insists) but unreachable, so any LLM call would fail the test."""
    memory = Memory.from_config(
        {
            "vector_store": {
                "provider": "qdrant",
                "config": {
                    "collection_name": "memories",
                    "embedding_model_dims": 32,  # the tiny model's hidden size
                    "path": str(directory / "qdrant"),
                    "on_disk": False,
                },
            },
            "embedder": {
                "provider": "huggingface",
                "config": {
                    "model": str(models.stage2),
                    "model_kwargs": {"device": "cpu", "local_files_only": True},
                },
            },
            "llm": {
                "provider": "openai",
                "config": {"api_key": "unused", "openai_base_url": "http://127.0.0.1:9/v1"},
            },
            "history_db_path": str(directory / "history.db"),
            "reranker": reranker,
        }
    )
    for text in DOCUMENTS:
        memory.add(text, user_id="alice", infer=False)  # infer=False: stored as is, no LLM
    return memory


def search(memory: Memory, *, rerank: bool, top_k: int = 10) -> list[dict[str, Any]]:
    found = memory.search(QUERY, filters=USER, top_k=top_k, threshold=0.0, rerank=rerank)
    results: list[dict[str, Any]] = found["results"]
    return results


def test_memory_search_comes_back_in_the_servers_order(
    keyword_url: str, make_memory: MakeMemory
) -> None:
    memory = make_memory({"base_url": keyword_url})
    assert isinstance(memory.reranker, RerankerServerReranker)

    results = search(memory, rerank=True)

    assert [r["memory"] for r in results] == BEST_TEXTS
    with RerankerClient(keyword_url) as client:
        expected = client.rerank(QUERY, BEST_TEXTS)
    assert [r["rerank_score"] for r in results] == [r.score for r in expected.results]
    assert all(r["id"] and "score" in r for r in results)  # mem0's own fields are kept
    # Without rerank=True the order is the vector store's (random tiny embeddings).
    assert sorted(r["memory"] for r in search(memory, rerank=False)) == sorted(DOCUMENTS)


def test_top_k_from_search_and_from_config_the_smaller_wins(
    keyword_url: str, make_memory: MakeMemory
) -> None:
    memory = make_memory({"base_url": keyword_url, "top_k": 3})
    assert [r["memory"] for r in search(memory, rerank=True)] == BEST_TEXTS[:3]
    # mem0 passes search's top_k to the vector store too: the server reorders those 2 hits.
    hits = {r["memory"] for r in search(memory, rerank=False, top_k=2)}
    reranked = [r["memory"] for r in search(memory, rerank=True, top_k=2)]
    assert reranked == [text for text in BEST_TEXTS if text in hits]


def test_a_failure_is_logged_as_an_error_with_its_cause(
    make_memory: MakeMemory, caplog: pytest.LogCaptureFixture
) -> None:
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    memory = make_memory({"base_url": down, "timeout": 5})
    plain = search(memory, rerank=False)

    with caplog.at_level(logging.ERROR, logger="reranker_server.integrations.mem0"):
        results = search(memory, rerank=True)

    assert [r["memory"] for r in results] == [r["memory"] for r in plain]  # mem0's order kept
    assert all(r["rerank_score"] == 0.0 for r in results)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert down in errors[0].getMessage()
    assert "ConnectionFailed" in errors[0].getMessage()


def test_raise_on_error_reaches_the_caller_of_memory_search(make_memory: MakeMemory) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    memory = make_memory({"base_url": down, "raise_on_error": True})
    with pytest.raises(RerankFailed, match="ConnectionFailed") as raised:
        search(memory, rerank=True)
    assert isinstance(raised.value.__cause__, ConnectionFailed)


def test_the_provider_reranks_with_the_generated_models(
    tiny_models: TestModelPaths, tmp_path: Path
) -> None:
    settings = Settings(
        stage1_model=str(tiny_models.stage1),
        stage2_model=str(tiny_models.stage2),
        model_cache_dir=tmp_path / "cache",
        offline=True,
        device="cpu",
        cpu_threads=1,
        stage2_on_cpu=True,
    )
    memories = [{"id": str(i), "memory": text, "score": 0.5} for i, text in enumerate(DOCUMENTS)]
    with running(create_app(settings)) as url:
        reranker = RerankerFactory.create(PROVIDER, {"base_url": url, "api_key": None})
        results = reranker.rerank(QUERY, memories, top_k=3)
        with RerankerClient(url) as client:
            expected = client.rerank(QUERY, DOCUMENTS, top_k=3)
    assert [r["id"] for r in results] == [str(r.index) for r in expected.results]
    assert [r["rerank_score"] for r in results] == [r.score for r in expected.results]
    assert all("rerank_score" not in m for m in memories)  # copies; the input is unchanged


def test_config_rejects_unknown_keys() -> None:
    with pytest.raises(ValidationError, match="base_uri"):
        RerankerFactory.create(PROVIDER, {"base_uri": "http://localhost:5200"})


def test_mem0s_cohere_provider_through_co_api_url(keyword_url: str, tmp_path: Path) -> None:
    """The other route: mem0's own cohere provider, with CO_API_URL set before cohere loads."""
    program = """
import json, sys
# As in an app without torch (the usual client side): else mem0.reranker imports torch and
# sentence-transformers for its local rerankers, which only costs this test ~10 s.
sys.modules.update(dict.fromkeys(["torch", "transformers", "sentence_transformers"]))
from mem0.utils.factory import RerankerFactory

reranker = RerankerFactory.create("cohere", {"api_key": "unused", "model": "rerank-v3.5"})
query, texts = json.loads(input())
memories = [{"id": str(i), "memory": t} for i, t in enumerate(texts)]
print(json.dumps([m["id"] for m in reranker.rerank(query, memories, top_k=3)]))
"""
    env = {
        **os.environ,
        "CO_API_URL": keyword_url,
        "MEM0_TELEMETRY": "false",
        "MEM0_DIR": str(tmp_path),
    }
    done = subprocess.run(
        [sys.executable, "-c", program],
        input=json.dumps([QUERY, DOCUMENTS]),
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [str(i) for i in BEST_FIRST[:3]]


def test_the_provider_has_mem0s_reranker_interface() -> None:
    from mem0.reranker.base import BaseReranker  # imports torch: only here, not in the provider

    ours = inspect.signature(RerankerServerReranker.rerank)
    theirs = inspect.signature(BaseReranker.rerank)
    assert list(ours.parameters) == list(theirs.parameters)
    assert ours.parameters["top_k"].default is None
