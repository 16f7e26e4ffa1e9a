"""Connection limits over real uvicorn with the protocol `reranker-server serve` runs
(server.HttpProtocol): idle, slow-header, slow-body and idle kept-alive connections are closed by
the server; beyond max_connections a rerank request gets a JSON 503; slow clients do not hold up
anyone else. Short timeouts, generous bounds: nothing here measures speed."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from bench.serving_edges import passages, post_raw, server
from reranker_server.app import create_app
from reranker_server.server import HttpProtocol, uvicorn_options
from reranker_server.settings import Settings

from .conftest import running

ROOT = Path(__file__).resolve().parents[1]
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


def big_answer_request(documents: int = 400, chars: int = 16_000) -> bytes:
    """A /rerank request whose answer echoes every document: `documents x chars` bytes and
    more, past what the kernel's socket buffers hold (tcp_wmem's max is 4 MiB by default)."""
    body = json.dumps(
        {
            "query": "capital of france",
            "documents": [f"paris {i} ".ljust(chars, "x") for i in range(documents)],
            "top_k": documents,
        }
    ).encode()
    return post(body)


def closed_connections(url: str, reason: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=GENEROUS_S).text
    pattern = r'^reranker_connections_closed_total\{reason="' + reason + r'"\} (\S+)$'
    match = re.search(pattern, text, re.MULTILINE)
    assert match, text
    return float(match.group(1))


def test_a_client_that_does_not_read_its_answer_is_cut_after_the_write_timeout(
    make_settings: Callable[..., Settings],
) -> None:
    """The answer (6.4 MB) fills the socket buffers; the client reads nothing. After
    write_timeout_s without progress the server aborts the connection (the unsent part is
    dropped, not kept for a reader that never comes) and counts it; a client that reads gets
    the whole answer."""
    settings = make_settings(write_timeout_s=1.0)
    with running(create_app(settings), **uvicorn_options(settings)) as url:
        before = closed_connections(url, "write_timeout")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: a slow reader
        sock.settimeout(GENEROUS_S)
        host, port = url.removeprefix("http://").split(":")
        sock.connect((host, int(port)))
        sock.sendall(big_answer_request())
        deadline = time.monotonic() + 3 * GENEROUS_S  # tokenizing 6.4 MB first, then 1 s
        while closed_connections(url, "write_timeout") == before:
            assert time.monotonic() < deadline, "the non-reading client was never cut"
            time.sleep(0.2)
        received = b""
        with sock:  # what the kernel already held arrives; then the connection ends, cut short
            try:
                while chunk := sock.recv(1 << 20):
                    received += chunk
            except ConnectionResetError:
                pass
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        length = int(re.search(rb"(?im)^content-length: (\d+)", head).group(1))  # type: ignore[union-attr]
        assert len(body) < length  # the answer was cut, not delivered
        # a reader gets all of it: the timeout bounds a stall, not an answer's size
        reader = connect(url)
        reader.sendall(big_answer_request())
        with reader:
            answer = read_response(reader)
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"}")
        assert closed_connections(url, "write_timeout") == before + 1


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


@pytest.mark.slow
def test_memory_returns_after_clients_that_never_read_their_big_answers(
    tiny_models,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    """Issue 22's scenario on `reranker-server serve`: 4 clients each ask for a 16 MB answer
    (1,000 documents of 16,000 characters, echoed) and read nothing. They are cut after the
    write timeout, and 10 s later the server's RSS is within 150 MiB of idle (before: +360 MiB,
    the clients connected as long as they liked)."""
    models = tiny_models.stage2.parent
    with server(ROOT, models, tmp_path, write_timeout_s=2, max_answer_bytes=64 << 20) as running:
        small = {"query": "q", "documents": passages(10, 200, "w"), "top_k": 10}
        assert httpx.post(running.url + "/rerank", json=small, timeout=60).status_code == 200
        time.sleep(2)
        idle = running.rss_mib()
        body = json.dumps(
            {"query": "capital of france", "documents": passages(1000, 16000, "d"), "top_k": 1000}
        ).encode()
        clients = [post_raw(running.port, body, rcvbuf=4096) for _ in range(4)]
        deadline = time.monotonic() + 600  # tokenizing 4 x 16 MB on a busy machine
        while closed_connections(running.url, "write_timeout") < 4:
            assert time.monotonic() < deadline, "the clients were not cut"
            time.sleep(0.5)
        time.sleep(10)
        after = running.rss_mib()
        for client in clients:
            client.close()
    assert after - idle < 150, (idle, after)
