"""LiteLLM's `rerank()` against the server, over a real socket, with every provider a user points
at a self-hosted reranker: which route and body each one really sends (recorded server-side), and
that LiteLLM hands back the server's order (BEST_FIRST) and scores. The server requires an API
key, so each provider's Authorization header is checked too. LiteLLM must not reach the internet:
it is imported, and called, under a guard that refuses any connection off loopback."""

from __future__ import annotations

import asyncio
import os

# LiteLLM downloads its model cost map at import unless told to use the copy it ships.
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from .client_harness import Recorder, Sent, loopback_only
from .conftest import running
from .fakes import KeywordRunner
from .keyword_server import BEST_FIRST, DOCUMENTS, QUERY, keyword_app

# pydantic warns once about LiteLLM's ReadOnly TypedDict items; outside pytest it is only printed
pytestmark = pytest.mark.filterwarnings(
    "ignore:Items .* using the `ReadOnly` qualifier:UserWarning"
)

KEY = "test-key-123"
SCORES = KeywordRunner().score(QUERY, DOCUMENTS)


@pytest.fixture(scope="module")
def litellm() -> Any:
    with loopback_only() as attempts:
        import litellm as module
    assert attempts == [], f"importing litellm reached for {attempts}"
    return module


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, Recorder]]:
    recorder = Recorder(keyword_app(api_key=KEY))
    with running(recorder) as url:
        yield url, recorder


@dataclass
class Server:
    url: str
    recorder: Recorder
    off_loopback: list[Any]  # what LiteLLM tried to reach besides the server (refused)


@pytest.fixture
def server(served: tuple[str, Recorder]) -> Iterator[Server]:
    url, recorder = served
    recorder.clear()
    with loopback_only() as attempts:
        yield Server(url, recorder, attempts)


@dataclass(frozen=True)
class Provider:
    model: str
    base: str  # appended to the server's URL to make api_base
    route: str  # where LiteLLM sent it
    body: dict[str, Any]  # what the body holds besides query, documents and top_n
    returns_documents: bool = True  # LiteLLM's results carry the document text
    extra: dict[str, Any] = field(default_factory=dict)  # passed to rerank()


DOCS = {"documents": DOCUMENTS}
PROVIDERS = {
    # cohere/: the v2 API unless api_base ends in /v1/rerank or max_chunks_per_doc is passed
    "cohere-v2": Provider("cohere/rerank-v3.5", "", "/v2/rerank", {**DOCS, "model": "rerank-v3.5"}),
    "cohere-v1": Provider(
        "cohere/rerank-english-v3.0",
        "/v1/rerank",
        "/v1/rerank",
        {**DOCS, "model": "rerank-english-v3.0"},
    ),
    "cohere-v1-chunks": Provider(
        "cohere/rerank-english-v3.0",
        "",
        "/v1/rerank",
        {**DOCS, "max_chunks_per_doc": 3},
        extra={"max_chunks_per_doc": 3},
    ),
    "hosted_vllm": Provider("hosted_vllm/BAAI/bge-reranker-v2-m3", "", "/rerank", DOCS),
    "hosted_vllm-v1": Provider("hosted_vllm/BAAI/bge-reranker-v2-m3", "/v1", "/v1/rerank", DOCS),
    # huggingface/ (TEI): `texts`, `return_text`, and TEI's defaults
    "huggingface": Provider(
        "huggingface/BAAI/bge-reranker-base",
        "",
        "/rerank",
        {"texts": DOCUMENTS, "raw_scores": False, "truncation_direction": "Right"},
    ),
    # jina_ai/ replaces api_base's path with /v1/rerank (a path prefix is lost)
    "jina_ai": Provider("jina_ai/jina-reranker-v2-base-multilingual", "", "/v1/rerank", DOCS),
    # together_ai/ appends /rerank to api_base (its own default base ends in /v1)
    "together_ai": Provider("together_ai/Salesforce/Llama-Rank-V1", "/v1", "/v1/rerank", DOCS),
    # infinity/ parses `document` as a string (Infinity's answer); our /rerank sends Cohere's and
    # vLLM's `{"text": ...}` to the same body, so documents must not be asked for, see below
    "infinity": Provider(
        "infinity/BAAI/bge-reranker-base",
        "",
        "/rerank",
        {**DOCS, "return_documents": False},
        returns_documents=False,
        extra={"return_documents": False},
    ),
}


def check_sent(sent: Sent, provider: Provider, top_n: int | None) -> None:
    assert (sent.method, sent.path, sent.status) == ("POST", provider.route, 200)
    assert sent.authorization == f"Bearer {KEY}"
    assert sent.body["query"] == QUERY
    assert {k: sent.body.get(k) for k in provider.body} == provider.body
    assert sent.body.get("top_n") == top_n  # LiteLLM leaves top_n out when not given
    # rerank() defaults to return_documents=True, arerank() leaves it out
    document_flag = "return_text" if "texts" in provider.body else "return_documents"
    assert sent.body.get(document_flag, False) is provider.returns_documents


def check_answer(answer: Any, provider: Provider, top_n: int | None) -> None:
    expected = BEST_FIRST[:top_n] if top_n else BEST_FIRST
    assert [r["index"] for r in answer.results] == expected
    assert [r["relevance_score"] for r in answer.results] == pytest.approx(
        [SCORES[i] for i in expected]
    )
    documents = [r.get("document", {}).get("text") for r in answer.results]
    if provider.returns_documents:
        assert documents == [DOCUMENTS[i] for i in expected]
    else:
        assert documents == [None] * len(expected)


@pytest.mark.parametrize("name", list(PROVIDERS))
def test_litellm_provider_gets_the_servers_order_and_scores(
    litellm: Any, server: Server, name: str
) -> None:
    provider = PROVIDERS[name]
    for top_n in (None, 2):
        server.recorder.clear()
        answer = litellm.rerank(
            model=provider.model,
            query=QUERY,
            documents=DOCUMENTS,
            top_n=top_n,
            api_base=server.url + provider.base,
            api_key=KEY,
            **provider.extra,
        )
        check_sent(server.recorder.only(), provider, top_n)
        check_answer(answer, provider, top_n)
    if name == "huggingface":
        # To price the call, LiteLLM fetches huggingface.co/<model>/raw/main/config.json on the
        # caller's thread, once per model and process (10 s timeout); offline, it fails quietly.
        assert server.off_loopback == ["huggingface.co"]
    else:
        assert server.off_loopback == []


def test_litellm_async_rerank(litellm: Any, server: Server) -> None:
    provider = replace(PROVIDERS["hosted_vllm"], returns_documents=False)
    answer = asyncio.run(
        litellm.arerank(
            model=provider.model,
            query=QUERY,
            documents=DOCUMENTS,
            top_n=3,
            api_base=server.url,
            api_key=KEY,
        )
    )
    check_sent(server.recorder.only(), provider, 3)
    check_answer(answer, provider, 3)
    assert server.off_loopback == []


def test_litellm_sends_the_key_and_a_wrong_one_is_refused(litellm: Any, server: Server) -> None:
    with pytest.raises(litellm.AuthenticationError):
        litellm.rerank(
            model="hosted_vllm/x",
            query=QUERY,
            documents=DOCUMENTS,
            api_base=server.url,
            api_key="wrong",
        )
    assert server.recorder.only().status == 401


def test_litellm_infinity_cannot_parse_document_objects(litellm: Any, server: Server) -> None:
    """A known limit, LiteLLM's and not the server's: infinity/ with LiteLLM's default
    return_documents=True. The body is the one hosted_vllm/ and together_ai/ send to the same
    route, and they parse `document` as `{"text": ...}` (vLLM's and Cohere's answer) while
    infinity/ wants Infinity's bare string; no one answer satisfies both. The server answers 200;
    LiteLLM then fails on `document.text`. Use hosted_vllm/ (same server, same body) instead."""
    with pytest.raises(litellm.APIConnectionError, match=r"document\.text"):
        litellm.rerank(
            model="infinity/x", query=QUERY, documents=DOCUMENTS, api_base=server.url, api_key=KEY
        )
    sent = server.recorder.only()
    assert (sent.path, sent.status, sent.body["return_documents"]) == ("/rerank", 200, True)
    assert sent.body["documents"] == DOCUMENTS
