"""No work for nobody: a client that goes away cancels its request, and SIGTERM drains.

Fast tests: a real uvicorn on loopback with a scorer whose model calls wait on a gate the test
opens, so what runs and what is dropped does not depend on the machine's speed. Slow tests: the
scenarios of bench/disconnects.py against `reranker-server serve` with full-size generated
models (the figures in docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from bench.disconnects import abandoned, metric, raw_post, serve, sigterm_in_flight
from reranker_server.app import RerankerApp, create_app
from reranker_server.devices import GpuGate
from reranker_server.engine.engine import Engine
from reranker_server.engine.scheduler import Lane, Scheduler
from reranker_server.model_generator import write_test_models
from reranker_server.server import DrainingServer
from reranker_server.settings import Settings

from .conftest import free_port, running
from .fakes import KeywordRunner

Pair = tuple[str, str]
PAIRS_PER_BATCH = 4
TOKENIZER = Path("/work/shared/models/bert-base-uncased-tokenizer")


class GatedRunner(KeywordRunner):
    """Every model call waits until `gate` is open; `batches` records the pairs of each call,
    `entered` is set once a call is waiting."""

    max_pairs = PAIRS_PER_BATCH

    def __init__(self) -> None:
        super().__init__("gated")
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.batches: list[list[Pair]] = []

    def score_pairs(self, pairs: Sequence[Pair]) -> list[float]:
        self.entered.set()
        assert self.gate.wait(60), "the test never opened the gate"
        self.batches.append(list(pairs))
        return super().score_pairs(pairs)


def gated_app(**overrides: Any) -> tuple[RerankerApp, GatedRunner, Scheduler]:
    runner = GatedRunner()
    scheduler = Scheduler(1)
    engine = Engine(
        runner,
        gate=GpuGate(None, 0, 0),
        scheduler=scheduler,
        lanes={"stage1": Lane.of("stage1", runner)},
    )
    values: dict[str, Any] = {"stage1_model": "unused", "stage2_model": "unused"}
    values.update(offline=True, device="cpu", cpu_threads=1, cache_enabled=False, **overrides)
    app = create_app(Settings(**values), engine_factory=lambda _s: engine)
    return app, runner, scheduler


def wait_until(condition: Callable[[], bool], what: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"not reached in {seconds} s: {what}"
        time.sleep(0.02)


def scrape(url: str) -> str:
    return httpx.get(url + "/metrics", timeout=30).text


def documents(count: int, tag: str) -> list[str]:
    return [f"{tag} passage {i}" for i in range(count)]


def access_statuses(caplog: pytest.LogCaptureFixture, route: str) -> list[int]:
    return [
        r.fields["status"]  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == "reranker_server.access" and r.fields["route"] == route  # type: ignore[attr-defined]
    ]


def abandon(port: int, path: str, bodies: list[dict[str, Any]]) -> list[socket.socket]:
    return [raw_post(port, path, json.dumps(body).encode()) for body in bodies]


def _single(i: int) -> dict[str, Any]:
    return {"query": f"q{i}", "documents": documents(10, f"a{i}"), "top_k": 1}


def _batch(i: int) -> dict[str, Any]:
    return {
        "requests": [
            {"query": f"q{i}", "documents": documents(5, f"b{i}"), "top_k": 1},
            {"query": f"r{i}", "documents": documents(5, f"c{i}"), "top_k": 1},
        ]
    }


@pytest.mark.parametrize(
    ("path", "body", "pairs"),
    # pairs: each request's pairs in the scheduler at once (a batch's jobs run one after the
    # other: the second job's pairs are never queued)
    [("/rerank", _single, 10), ("/rerank/batch", _batch, 5)],
    ids=["rerank", "batch"],
)
def test_a_client_that_goes_away_cancels_its_request(
    path: str,
    body: Callable[[int], dict[str, Any]],
    pairs: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Three clients send their documents and close their sockets while the first batch is
    held: their queued pairs are dropped, the batch in flight finishes and is discarded, the
    requests count and log as 499, and the next request is computed at once."""
    app, runner, scheduler = gated_app()
    caplog.set_level(logging.INFO, logger="reranker_server.access")
    with running(app) as url:
        port = int(url.rsplit(":", 1)[1])
        sockets = abandon(port, path, [body(i) for i in range(3)])
        assert runner.entered.wait(60), "no model call started"
        wait_until(lambda: scheduler.queued == 3 * pairs - PAIRS_PER_BATCH, "all pairs queued")
        for sock in sockets:
            sock.close()
        wait_until(
            lambda: metric(scrape(url), "reranker_requests_total", route=path, status="499") == 3,
            "three requests counted as 499",
        )
        assert scheduler.queued == 0
        assert scheduler.dropped == 3 * pairs  # those queued and the 4 in flight
        runner.gate.set()
        response = httpx.post(
            url + "/rerank", json={"query": "q", "documents": ["x", "y"], "top_k": 1}, timeout=60
        )
        assert response.status_code == 200
        text = scrape(url)
    # the held batch (abandoned pairs) and the new request's: nothing else ran
    assert len(runner.batches) == 2
    assert sorted(runner.batches[1]) == [("q", "x"), ("q", "y")]
    assert metric(text, "reranker_requests_total", route=path, status="200") == (
        1 if path == "/rerank" else 0
    )
    assert metric(text, "reranker_dropped_pairs_total", scheduler="cpu") == 3 * pairs
    assert access_statuses(caplog, path).count(499) == 3


def test_a_client_that_leaves_mid_body_is_counted_499() -> None:
    app, _, _ = gated_app()
    with running(app) as url:
        port = int(url.rsplit(":", 1)[1])
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(
            b"POST /rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 1000\r\n\r\n{"query": '
        )
        time.sleep(0.2)
        sock.close()
        wait_until(
            lambda: (
                metric(scrape(url), "reranker_requests_total", route="/rerank", status="499") == 1
            ),
            "the request counted as 499",
        )
        assert metric(scrape(url), "reranker_requests_total", status="500") == 0


@contextmanager
def draining_server(app: RerankerApp, drain_timeout_s: float) -> Iterator[tuple[str, Any]]:
    """`reranker-server serve`'s server (DrainingServer) in a thread; yields the URL and a
    function that stops it as SIGTERM would and returns the thread (join it to see it exit)."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    server = DrainingServer(config, app.service, drain_timeout_s)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started or not thread.is_alive(), "uvicorn started")
    assert server.started

    def stop() -> threading.Thread:
        server.should_exit = True  # what uvicorn's SIGTERM handler does
        return thread

    stop.server = server  # type: ignore[attr-defined]  # for its signal handler

    try:
        yield f"http://127.0.0.1:{port}", stop
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def post_in_threads(url: str, count: int, docs: int) -> tuple[list[httpx.Response], list[Any]]:
    answers: list[httpx.Response] = []
    threads = []
    for i in range(count):

        def send(i: int = i) -> None:
            body = {"query": f"q{i}", "documents": documents(docs, f"d{i}"), "top_k": 1}
            answers.append(httpx.post(url + "/rerank", json=body, timeout=120))

        thread = threading.Thread(target=send, daemon=True)
        thread.start()
        threads.append(thread)
    return answers, threads


def test_drain_lets_admitted_requests_finish_and_refuses_new_ones() -> None:
    app, runner, scheduler = gated_app()
    with draining_server(app, drain_timeout_s=120) as (url, stop):
        answers, clients = post_in_threads(url, 3, docs=8)
        assert runner.entered.wait(60)
        wait_until(lambda: app.service.status().in_flight == 3, "three requests admitted")
        server_thread = stop()
        wait_until(lambda: app.service.draining, "draining")
        ready = httpx.get(url + "/health/ready", timeout=30)
        assert ready.status_code == 503 and ready.json()["error_type"] == "shutting_down"
        refused = httpx.post(
            url + "/rerank", json={"query": "q", "documents": ["x"], "top_k": 1}, timeout=30
        )
        assert refused.status_code == 503
        assert refused.json()["error_type"] == "shutting_down"
        assert int(refused.headers["Retry-After"]) >= 1
        assert refused.headers["Connection"] == "close"
        runner.gate.set()  # the admitted requests can finish now
        for client in clients:
            client.join(120)
        server_thread.join(60)
        assert not server_thread.is_alive(), "the server did not exit after the drain"
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert scheduler.dropped == 0


def test_drain_timeout_cuts_off_with_json_503_and_drops_the_queue() -> None:
    app, runner, scheduler = gated_app()
    with draining_server(app, drain_timeout_s=0.5) as (url, stop):
        answers, clients = post_in_threads(url, 3, docs=8)
        assert runner.entered.wait(60)
        wait_until(lambda: scheduler.queued == 3 * 8 - PAIRS_PER_BATCH, "all pairs queued")
        server_thread = stop()
        for client in clients:  # answered while the batch in flight is still held
            client.join(120)
        assert [a.status_code for a in answers] == [503, 503, 503]
        for answer in answers:
            assert answer.json()["error_type"] == "shutting_down"
            assert int(answer.headers["Retry-After"]) >= 1
        assert scheduler.queued == 0 and scheduler.dropped == 3 * 8
        runner.gate.set()
        server_thread.join(60)
        assert not server_thread.is_alive(), "the server did not exit after the drain"
    assert len(runner.batches) == 1  # only the batch that was in flight ran


def test_every_answer_sent_while_draining_says_connection_close() -> None:
    """Not only the drain's 503s: the 200s that finish during the drain and the liveness probe
    too, so a kept-alive client opens a new connection (and gets a 503) rather than writing its
    next request into one the server is closing."""
    app, runner, _ = gated_app()
    with draining_server(app, drain_timeout_s=120) as (url, stop):
        answers, clients = post_in_threads(url, 2, docs=4)
        assert runner.entered.wait(60)
        wait_until(lambda: app.service.status().in_flight == 2, "two requests admitted")
        with httpx.Client(base_url=url, timeout=30) as client:
            before = client.get("/health/live")
            assert before.status_code == 200 and "connection" not in before.headers
            server_thread = stop()
            wait_until(lambda: app.service.draining, "draining")
            live = client.get("/health/live")  # on the kept-alive connection: answered
            assert live.status_code == 200 and live.headers["Connection"] == "close"
            ready = client.get("/health/ready")
            assert ready.status_code == 503 and ready.headers["Connection"] == "close"
        runner.gate.set()
        for thread in clients:
            thread.join(120)
        server_thread.join(60)
    assert [a.status_code for a in answers] == [200, 200]
    assert [a.headers["Connection"] for a in answers] == ["close", "close"]


def _get(sock: socket.socket, path: str) -> bytes:
    """One GET on a raw connection; the answer's head and body as read (b"" if closed)."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return b""
        if not chunk:
            return data
        data += chunk
    return data


def test_a_kept_alive_connection_is_answered_during_the_drain_not_reset() -> None:
    """A connection that is idle when the signal comes (kept alive, or accepted an instant
    before) is not closed under the request it carries next: that request gets its 503 with
    `Connection: close`, never a reset or an empty answer."""
    app, runner, _ = gated_app()
    with draining_server(app, drain_timeout_s=120) as (url, stop):
        answers, clients = post_in_threads(url, 1, docs=4)  # keeps the drain going
        assert runner.entered.wait(60)
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as idle:
            first = _get(idle, "/health/live")
            assert first.startswith(b"HTTP/1.1 200") and b"connection: close" not in first.lower()
            server_thread = stop()
            wait_until(lambda: app.service.draining, "draining")
            time.sleep(0.3)  # past the server's next loop tick after the signal
            during = _get(idle, "/health/ready")
        assert during.startswith(b"HTTP/1.1 503"), during
        assert b"connection: close" in during.lower()
        runner.gate.set()
        for thread in clients:
            thread.join(120)
        server_thread.join(60)
    assert [a.status_code for a in answers] == [200]


def test_a_second_signal_cuts_the_drain_short_with_json_503s() -> None:
    """Ctrl-C twice: the second one cuts the drain short (not uvicorn's force_exit, which
    cancelled the handlers: plain-text 500s); a third is logged and ignored."""
    app, runner, _ = gated_app()
    with draining_server(app, drain_timeout_s=120) as (url, stop):
        answers, clients = post_in_threads(url, 3, docs=8)
        assert runner.entered.wait(60)
        wait_until(lambda: app.service.status().in_flight == 3, "three requests admitted")
        server = stop.server  # type: ignore[attr-defined]
        server.handle_exit(signal.SIGINT, None)  # the first starts the drain
        wait_until(lambda: app.service.draining, "draining")
        server.handle_exit(signal.SIGINT, None)  # the second cuts it short
        server.handle_exit(signal.SIGTERM, None)  # ignored
        for thread in clients:
            thread.join(120)
        assert not server.force_exit
        assert [a.status_code for a in answers] == [503, 503, 503]
        assert {a.json()["error_type"] for a in answers} == {"shutting_down"}
        runner.gate.set()  # the batch in flight may finish; the server exits
        stop().join(60)
        assert not stop().is_alive(), "the server did not exit"


# --- full-size models, `reranker-server serve` (slow)


@pytest.fixture(scope="module")
def full_size_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("full")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_test_models(directory, full_size=True, tokenizer_dir=TOKENIZER)
    return directory


@pytest.mark.slow
def test_abandoned_requests_do_not_delay_the_next_one(
    full_size_models: Path, tmp_path: Path
) -> None:
    """The issue's scenario: 20 requests of 500 documents whose clients leave after 1 s (here:
    once pairs are queued, so the queue is seen dropping), then a 2-document request. Before
    cancellation it waited 90-117 s behind work for nobody."""
    with serve(full_size_models, tmp_path) as server:
        result = asyncio.run(abandoned(server, 20, 500, give_up_s=1.0, until_queued=True))
    print(f"\nabandoned: {result}")
    assert result.probe_status == 200
    assert result.statuses == {"499": 20}
    assert result.dropped_pairs > 0
    assert result.probe_seconds < 45  # 0.3-3 s measured on 2 shared cores; 116 s before


@pytest.mark.slow
def test_sigterm_with_requests_in_flight_answers_200_or_json_503_and_exits(
    full_size_models: Path, tmp_path: Path
) -> None:
    drain_s = 10.0
    with serve(full_size_models, tmp_path, drain_timeout_s=drain_s) as server:
        result = asyncio.run(sigterm_in_flight(server, clients=10, documents=200, term_at_s=2))
    print(f"\nsigterm: {result}")
    assert result.errors == []
    assert len(result.answers) == 10
    for status, kind, retry_after in result.answers:
        # 503: cut off by the drain, or (on a very slow machine) the request's own deadline
        assert status == 200 or (
            status == 503 and kind in ("shutting_down", "timeout") and retry_after
        ), (status, kind)
    assert result.ready_after_signal == 503
    assert result.returncode == 0
    # the drain, then answers written, the models released and Python's own exit (~4 s here)
    assert result.exit_seconds < drain_s + 30
