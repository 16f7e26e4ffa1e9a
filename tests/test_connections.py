"""Connection limits over real uvicorn with the protocol `reranker-server serve` runs
(server.HttpProtocol): idle, slow-header, slow-body and idle kept-alive connections are closed by
the server; beyond max_connections a rerank request gets a JSON 503; slow clients do not hold up
anyone else. Short timeouts, generous bounds: nothing here measures speed."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack

import httpx
import pytest

from reranker_server.app import create_app
from reranker_server.server import HttpProtocol, uvicorn_options
from reranker_server.settings import Settings

from .conftest import running

GENEROUS_S = 20.0  # far past every timeout below, so a busy machine does not fail the test
RERANK = b'{"query": "capital of france", "documents": ["paris", "berlin"], "top_k": 1}'


def post(body: bytes = RERANK, declared: int | None = None) -> bytes:
    length = len(body) if declared is None else declared
    return (
        b"POST /rerank HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (length, body)
    )


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=GENEROUS_S)
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    """Read until the server closes (True), or GENEROUS_S pass with it open (False)."""
    deadline = time.monotonic() + GENEROUS_S
    with sock:
        while time.monotonic() < deadline:
            try:
                if not sock.recv(65536):
                    return True
            except TimeoutError:
                return False
            except ConnectionResetError:
                return True
    return False


def read_response(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    while len(rest) < length:
        rest += sock.recv(65536)
    return head + b"\r\n\r\n" + rest


@pytest.fixture(scope="module")
def short_timeouts(tiny_models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:  # type: ignore[no-untyped-def]
    settings = Settings(
        stage1_model=str(tiny_models.stage1),
        model_cache_dir=tmp_path_factory.mktemp("cache"),
        offline=True,
        device="cpu",
        cpu_threads=1,
        header_timeout_s=0.5,
        body_timeout_s=0.5,
        keep_alive_timeout_s=0.5,
    )
    with running(create_app(settings), **uvicorn_options(settings)) as url:
        yield url


def test_a_connection_that_sends_nothing_is_closed(short_timeouts: str) -> None:
    assert closed_by_server(connect(short_timeouts))


def test_a_slow_header_connection_is_closed(short_timeouts: str) -> None:
    sock = connect(short_timeouts)
    sock.sendall(b"POST /rerank HTTP/1.1\r\nHost: test\r\n")  # ... and the rest never comes
    assert closed_by_server(sock)


def test_a_slow_body_connection_is_closed(short_timeouts: str) -> None:
    sock = connect(short_timeouts)
    sock.sendall(post(RERANK[:10], declared=len(RERANK)))
    assert closed_by_server(sock)


def test_an_idle_kept_alive_connection_is_closed_and_a_new_request_gets_header_time(
    short_timeouts: str,
) -> None:
    sock = connect(short_timeouts)
    sock.sendall(post())
    assert read_response(sock).startswith(b"HTTP/1.1 200")
    sock.sendall(post())  # kept alive: a second request on it is served
    assert read_response(sock).startswith(b"HTTP/1.1 200")
    assert closed_by_server(sock)  # then, idle, it is closed
    sock = connect(short_timeouts)
    sock.sendall(post())
    assert read_response(sock).startswith(b"HTTP/1.1 200")
    sock.sendall(b"POST /rerank HTTP/1.1\r\n")  # a slow header on a kept-alive connection
    assert closed_by_server(sock)


def test_slow_clients_do_not_hold_up_others(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(header_timeout_s=60, body_timeout_s=60, max_connections=0)
    with running(create_app(settings), **uvicorn_options(settings)) as url, ExitStack() as stack:
        for i in range(60):  # 30 slow headers, 30 slow bodies, all left hanging
            sock = stack.enter_context(connect(url))
            sock.sendall(b"POST /rerank HTTP/1.1\r\n" if i % 2 else post(b"{", declared=100))
        response = httpx.post(
            f"{url}/rerank",
            content=RERANK,
            headers={"Content-Type": "application/json"},
            timeout=GENEROUS_S,
        )
        assert response.status_code == 200
        assert response.json()["results"][0]["text"] in ("paris", "berlin")


def test_past_max_connections_a_rerank_request_gets_a_json_503(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(max_connections=3, keep_alive_timeout_s=60, header_timeout_s=60)
    with running(create_app(settings), **uvicorn_options(settings)) as url, ExitStack() as stack:
        held = [stack.enter_context(connect(url)) for _ in range(3)]
        for sock in held:
            sock.sendall(post())
            assert read_response(sock).startswith(b"HTTP/1.1 200")  # kept open
        extra = httpx.post(
            f"{url}/rerank",
            content=RERANK,
            headers={"Content-Type": "application/json"},
            timeout=GENEROUS_S,
        )
        assert extra.status_code == 503
        assert extra.json()["error_type"] == "too_many_connections"
        assert "max_connections" in extra.json()["error"]
        assert extra.headers["retry-after"] == "1" and extra.headers["x-request-id"]
        assert httpx.get(f"{url}/health", timeout=GENEROUS_S).status_code == 200  # probes pass
        held[0].close()
        deadline = time.monotonic() + GENEROUS_S
        while time.monotonic() < deadline:  # the server notices the close at its own pace
            again = httpx.post(
                f"{url}/rerank",
                content=RERANK,
                headers={"Content-Type": "application/json"},
                timeout=GENEROUS_S,
            )
            if again.status_code == 200:
                break
            time.sleep(0.1)
        assert again.status_code == 200


def test_uvicorns_own_cli_gets_the_limits_from_the_environment(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`uvicorn reranker_server:app --http reranker_server.server:HttpProtocol` (the quick start
    plus one flag): the protocol, named by its import string, reads RERANKER_* itself."""
    monkeypatch.setattr(HttpProtocol, "limits", None)  # not read yet in this process
    monkeypatch.setenv("RERANKER_HEADER_TIMEOUT_S", "0.5")
    app = create_app(make_settings())
    with running(app, http="reranker_server.server:HttpProtocol") as url:
        sock = connect(url)
        sock.sendall(b"POST /rerank HTTP/1.1\r\n")
        assert closed_by_server(sock)
        upgrade = {"Connection": "Upgrade, HTTP2-Settings", "Upgrade": "h2c", "HTTP2-Settings": ""}
        response = httpx.post(
            f"{url}/rerank", content=RERANK, headers={**upgrade, "Content-Type": "application/json"}
        )
        assert response.status_code == 200
    assert HttpProtocol.limits is not None and HttpProtocol.limits.header_timeout_s == 0.5
