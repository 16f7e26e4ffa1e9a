"""Security defaults: CORS off unless configured, no remote code, no internals in errors."""

from __future__ import annotations

from collections.abc import Callable

import httpx

from reranker_server.app import create_app
from reranker_server.devices import GpuGate
from reranker_server.engine.engine import Engine
from reranker_server.settings import Settings

from .conftest import running
from .fakes import KeywordRunner

PREFLIGHT = {
    "Origin": "https://app.example",
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "content-type",
}
BODY = {"query": "q", "documents": ["a", "b"], "top_k": 1}


def keyword_app(settings: Settings, stage1: KeywordRunner | None = None):  # type: ignore[no-untyped-def]
    engine = Engine(stage1 or KeywordRunner(), gate=GpuGate(None, 0, 0))
    return create_app(settings, engine_factory=lambda _s: engine)


def test_cors_is_off_by_default(make_settings: Callable[..., Settings]) -> None:
    with running(keyword_app(make_settings())) as url:
        preflight = httpx.options(f"{url}/rerank", headers=PREFLIGHT)
        assert "access-control-allow-origin" not in preflight.headers
        simple = httpx.post(f"{url}/rerank", json=BODY, headers={"Origin": "https://app.example"})
        assert simple.status_code == 200
        assert "access-control-allow-origin" not in simple.headers


def test_cors_allows_only_configured_origins(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(cors_origins="https://app.example, https://other.example")
    with running(keyword_app(settings)) as url:
        ok = httpx.options(f"{url}/rerank", headers=PREFLIGHT)
        assert ok.headers["access-control-allow-origin"] == "https://app.example"
        evil = httpx.options(
            f"{url}/rerank", headers={**PREFLIGHT, "Origin": "https://evil.example"}
        )
        assert "access-control-allow-origin" not in evil.headers


def test_trust_remote_code_is_off_unless_asked() -> None:
    assert Settings().trust_remote_code is False
    assert Settings(trust_remote_code=True).trust_remote_code is True


class Exploding(KeywordRunner):
    def score(self, query: str, documents: object) -> list[float]:  # type: ignore[override]
        raise RuntimeError("secret detail at /opt/models/private/weights.bin")


def test_error_bodies_carry_no_trace_or_path(make_settings: Callable[..., Settings]) -> None:
    with running(keyword_app(make_settings(), Exploding())) as url:
        response = httpx.post(f"{url}/rerank", json=BODY)
        assert response.status_code == 500
        text = response.text
        assert "Traceback" not in text and "/opt/models" not in text and "secret" not in text
        assert response.json()["error_type"] == "inference_error"
        assert httpx.get(f"{url}/health").json()["status"] == "ok"
