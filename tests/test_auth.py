"""The optional API key: Bearer auth on every rerank route, 401 otherwise, health open, the key
never in a response or a log line; and the key file setting (Docker secrets)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import cohere
import httpx
import pytest
from pydantic import ValidationError

from reranker_server.settings import Settings

from .conftest import running
from .keyword_server import BEST_FIRST, DOCUMENTS, QUERY, keyword_app

KEY = "s3cret-key-0123456789"

ROUTES = {
    "/rerank": {"query": QUERY, "documents": DOCUMENTS, "top_k": 2},
    "/rerank#tei": {"query": QUERY, "texts": DOCUMENTS},
    "/v1/rerank": {"query": QUERY, "documents": DOCUMENTS, "top_n": 2},
    "/v2/rerank": {"model": "rerank-v3.5", "query": QUERY, "documents": DOCUMENTS},
    "/rerank/batch": {"requests": [{"query": QUERY, "documents": DOCUMENTS, "top_k": 1}]},
}


@pytest.fixture(scope="module")
def keyed_server() -> Iterator[str]:
    with running(keyword_app(api_key=KEY)) as url:
        yield url


@pytest.mark.parametrize("route", sorted(ROUTES))
@pytest.mark.parametrize(
    "authorization", [None, "Bearer wrong", f"Bearer {KEY}x", f"Basic {KEY}", KEY, "Bearer"]
)
def test_rerank_routes_refuse_a_missing_or_wrong_key(
    keyed_server: str, route: str, authorization: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    headers = {"Authorization": authorization} if authorization is not None else {}
    response = httpx.post(keyed_server + route.split("#")[0], json=ROUTES[route], headers=headers)
    assert response.status_code == 401, response.text
    error = response.json()
    assert error["error_type"] == "unauthorized"
    assert "Authorization: Bearer" in error["detail"]
    assert response.headers["www-authenticate"] == "Bearer"
    assert KEY not in response.text
    assert KEY not in caplog.text


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_rerank_routes_accept_the_key(keyed_server: str, route: str) -> None:
    response = httpx.post(
        keyed_server + route.split("#")[0],
        json=ROUTES[route],
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert response.status_code == 200, response.text
    data = response.json()
    first = data[0] if isinstance(data, list) else (data.get("responses") or [data])[0]
    assert (first["index"] if "index" in first else first["results"][0]["index"]) == BEST_FIRST[0]


def test_the_key_is_checked_before_the_body(keyed_server: str) -> None:
    response = httpx.post(f"{keyed_server}/v1/rerank", json={"nonsense": True})
    assert response.status_code == 401
    # not even read: malformed or oversized bodies without the key get 401, not 400 / 413
    for content in (b'{"broken', b"x" * (32 * 1024 * 1024)):
        unread = httpx.post(
            f"{keyed_server}/rerank", content=content, headers={"Content-Type": "application/json"}
        )
        assert unread.status_code == 401 and unread.headers["WWW-Authenticate"] == "Bearer"
    scheme = httpx.post(
        f"{keyed_server}/rerank",
        json=ROUTES["/rerank"],
        headers={"Authorization": f"bearer {KEY}"},  # the scheme is case-insensitive
    )
    assert scheme.status_code == 200


def test_health_stays_open(keyed_server: str) -> None:
    for path in ("/health", "/health/live", "/health/ready", "/openapi.json"):
        assert httpx.get(keyed_server + path).status_code == 200, path


def test_cohere_sdk_gets_a_401_it_does_not_retry(keyed_server: str) -> None:
    with (
        cohere.ClientV2(api_key="wrong", base_url=keyed_server) as co,
        pytest.raises(cohere.errors.UnauthorizedError) as raised,
    ):
        co.rerank(model="rerank-v3.5", query=QUERY, documents=DOCUMENTS)
    assert raised.value.status_code == 401
    assert raised.value.body["error_type"] == "unauthorized"
    with cohere.ClientV2(api_key=KEY, base_url=keyed_server) as co:
        ranked = co.rerank(model="rerank-v3.5", query=QUERY, documents=DOCUMENTS)
    assert [r.index for r in ranked.results] == BEST_FIRST


def test_without_a_key_any_bearer_token_or_none_is_accepted() -> None:
    with running(keyword_app()) as url:
        for headers in ({}, {"Authorization": "Bearer whatever"}, {"Authorization": "Token x"}):
            response = httpx.post(f"{url}/v1/rerank", json=ROUTES["/v1/rerank"], headers=headers)
            assert response.status_code == 200, headers


def test_key_file_setting(tmp_path: Path) -> None:
    secret = tmp_path / "api_key"
    secret.write_text(f"{KEY}\n")  # Docker secrets usually end with a newline
    settings = Settings(api_key_file=secret)
    assert settings.required_api_key() == KEY
    assert KEY not in repr(settings) and KEY not in str(settings.model_dump())

    with pytest.raises(ValidationError, match="not both"):
        Settings(api_key="x", api_key_file=secret)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ValidationError, match="is empty"):
        Settings(api_key_file=empty)
    with pytest.raises(ValidationError, match="can't be read"):
        Settings(api_key_file=tmp_path / "missing")
    assert Settings(api_key="  ").required_api_key() is None  # an empty key means no key


def test_key_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RERANKER_API_KEY", KEY)
    assert Settings().required_api_key() == KEY
    monkeypatch.delenv("RERANKER_API_KEY")
    secret = tmp_path / "key"
    secret.write_text(KEY)
    monkeypatch.setenv("RERANKER_API_KEY_FILE", str(secret))
    assert Settings().required_api_key() == KEY
