"""The README's first command is the protected server: run as written (in a subprocess, on a
loopback port) it closes a slowloris connection, keeps an `Upgrade: h2c` request's body, logs
JSON only, and on SIGTERM (or Ctrl-C, twice) with work in flight answers every request with JSON
(200 or 503) and exits 0. The seed's `uvicorn reranker_server:app` still serves, and says at
startup what it lacks."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from reranker_server import UNPROTECTED_WARNING
from reranker_server.model_generator import TestModelPaths

from .conftest import free_port
from .test_connections import GENEROUS_S, RERANK, closed_by_server, connect
from .test_readme_quickstart import indented_blocks
from .test_startup import BIN, env_for, wait_healthy

# the command after the install: `... && pip install -e . && reranker-server serve`
QUICK_START = indented_blocks("## Quick start (CPU)")[0].split(" && ")[-1]
IN_FLIGHT = 6  # requests of DOCUMENTS documents each, sent at once
DOCUMENTS = 1000


@contextmanager
def quick_start_server(
    models: TestModelPaths, tmp_path: Path, **env: str
) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    port = free_port()
    process = subprocess.Popen(
        ["bash", "-c", QUICK_START],  # bash runs a lone command in its own place (exec)
        env=env_for(
            models,
            tmp_path,
            PATH=f"{BIN}:/usr/bin:/bin",
            RERANKER_HOST="127.0.0.1",
            RERANKER_PORT=str(port),
            RERANKER_CPU_THREADS="1",
            RERANKER_CACHE_ENABLED="false",
            **env,
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, process)
        yield url, process
    finally:
        process.kill()
        process.communicate()


def in_flight(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=GENEROUS_S).text
    line = next(x for x in text.splitlines() if x.startswith("reranker_in_flight_requests "))
    return float(line.split()[1])


def send_work(url: str) -> tuple[list[Any], list[threading.Thread]]:
    """IN_FLIGHT big requests in threads; each outcome is a response or the transport error."""
    outcomes: list[Any] = []

    def send(i: int) -> None:
        body = {
            "query": f"capital of france {i}",
            "documents": [f"passage {j} about paris and the seine " * 8 for j in range(DOCUMENTS)],
            "top_k": 3,
        }
        try:
            outcomes.append(httpx.post(f"{url}/rerank", json=body, timeout=120))
        except httpx.TransportError as exc:  # refused, reset: what must not happen
            outcomes.append(exc)

    threads = [threading.Thread(target=send, args=(i,), daemon=True) for i in range(IN_FLIGHT)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while in_flight(url) < 1:
        assert time.monotonic() < deadline, "no request was ever in flight"
        time.sleep(0.01)
    return outcomes, threads


def assert_json_answers(outcomes: list[Any]) -> list[int]:
    assert len(outcomes) == IN_FLIGHT
    statuses = []
    for outcome in outcomes:
        assert isinstance(outcome, httpx.Response), f"in-flight request failed: {outcome!r}"
        assert outcome.status_code in (200, 503), outcome.text
        if outcome.status_code == 503:
            assert outcome.json()["error_type"] == "shutting_down"
        else:
            assert len(outcome.json()["results"]) == 3
        statuses.append(outcome.status_code)
    return statuses


def json_lines(stderr: str) -> list[dict[str, Any]]:
    lines = [line for line in stderr.splitlines() if line.strip()]
    return [json.loads(line) for line in lines]  # every line is JSON, uvicorn's included


def test_the_quick_start_command_is_the_protected_server() -> None:
    assert QUICK_START == "reranker-server serve"


def test_quick_start_closes_slowloris_keeps_h2c_bodies_and_drains_on_sigterm(
    tiny_models: TestModelPaths, tmp_path: Path
) -> None:
    with quick_start_server(
        tiny_models, tmp_path, RERANKER_HEADER_TIMEOUT_S="0.5", RERANKER_DRAIN_TIMEOUT_S="60"
    ) as (url, process):
        slowloris = connect(url)
        slowloris.sendall(b"POST /rerank HTTP/1.1\r\nHost: test\r\n")  # the rest never comes
        assert closed_by_server(slowloris)
        upgrade = {"Connection": "Upgrade, HTTP2-Settings", "Upgrade": "h2c", "HTTP2-Settings": ""}
        h2c = httpx.post(
            f"{url}/rerank", content=RERANK, headers={**upgrade, "Content-Type": "application/json"}
        )
        assert h2c.status_code == 200 and len(h2c.json()["results"]) == 1

        outcomes, threads = send_work(url)
        process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(150)
        assert process.wait(timeout=90) == 0
        stderr = process.communicate()[1]
    assert assert_json_answers(outcomes)  # 200s (the drain's default lets them finish)
    records = json_lines(stderr)
    assert any(r["message"].startswith("draining") for r in records)
    assert any(r["logger"].startswith("uvicorn") for r in records)
    assert UNPROTECTED_WARNING not in stderr


def test_quick_start_ctrl_c_twice_cuts_the_drain_short_without_500s_or_an_abort(
    tiny_models: TestModelPaths, tmp_path: Path
) -> None:
    with quick_start_server(tiny_models, tmp_path, RERANKER_DRAIN_TIMEOUT_S="60") as (
        url,
        process,
    ):
        outcomes, threads = send_work(url)
        process.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/health/ready", timeout=GENEROUS_S).status_code != 503:
            assert time.monotonic() < deadline, "never draining"
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        for thread in threads:
            thread.join(150)
        assert process.wait(timeout=90) == 0  # not -6 (abort) nor killed
        stderr = process.communicate()[1]
    assert_json_answers(outcomes)
    records = json_lines(stderr)
    assert [r for r in records if "during the drain" in r["message"]]
    assert not [r for r in records if r["level"] in ("ERROR", "CRITICAL")]
    assert "Traceback" not in stderr and "terminate called" not in stderr


def test_the_seeds_uvicorn_command_serves_and_warns_what_it_lacks(
    tiny_models: TestModelPaths, tmp_path: Path
) -> None:
    port = free_port()
    process = subprocess.Popen(
        [str(BIN / "uvicorn"), "reranker_server:app", "--host", "127.0.0.1", "--port", str(port)],
        env=env_for(tiny_models, tmp_path),  # RERANKER_LOG_FORMAT: json, the default
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, process)
        answer = httpx.post(
            f"{url}/rerank", content=RERANK, headers={"Content-Type": "application/json"}
        )
        assert answer.status_code == 200
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    finally:
        process.kill()
        stderr = process.communicate()[1]
    records = json_lines(stderr)  # uvicorn's own lines are JSON too
    assert [r["message"] for r in records].count(UNPROTECTED_WARNING) == 1
    assert any(r["logger"].startswith("uvicorn") for r in records)
