"""Replicas, the load balancer and Redis run for real (skipped where no Docker engine answers).

The default (torch-free) image built from the Dockerfile; docker-compose.yml with 3 replicas,
HAProxy and Redis; generated models mounted read-only (nothing is downloaded). While a bounded load
(300+ requests, 8 concurrent, every 10th with 1,000 documents) runs through the balancer on
127.0.0.1, deploy/rolling-restart.sh restarts every replica one after another: no request fails,
every replica's log shows its drain, and each restarted replica answers a request it never saw
from the shared cache. And the stop command of docs/deployment.md lets a long request finish.

Slow (an image build, minutes on a small machine): `make test-all`. bench/scale.py is the same
harness as a benchmark.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench.scale import (
    MODELS,
    Stack,
    docker_engine_problem,
    load_during_restart,
    rerank_body,
    write_models,
)
from reranker_server.settings import Settings
from tests.deploy_files import ROOT, option_values, readme_commands, stop_grace_s

NO_ENGINE = docker_engine_problem()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(NO_ENGINE is not None, reason=NO_ENGINE or ""),
]

IMAGE = "reranker-server:scale-test"


@pytest.fixture(scope="module")
def image() -> str:
    extra = shlex.split(os.environ.get("DOCKER_BUILD_ARGS", ""))
    build = subprocess.run(
        ["docker", "build", *extra, "-t", IMAGE, str(ROOT)],
        env={**os.environ, "DOCKER_BUILDKIT": "1"},  # Docker 20.10 needs it for RUN --mount
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert build.returncode == 0, build.stderr[-5000:]
    return IMAGE


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_models(tmp_path_factory.mktemp("scale-models"))


@pytest.fixture
def stack(image: str, models: Path, tmp_path: Path) -> Iterator[Stack]:
    stack = Stack(image, models, tmp_path)
    try:
        yield stack
    finally:
        stack.down()


def test_a_rolling_restart_of_three_replicas_under_load_fails_no_request(stack: Stack) -> None:
    stack.up(3)
    replicas = stack.replicas()
    assert len(replicas) == 3
    # A request the replicas will not see again until each has been restarted.
    marker = rerank_body("a question asked once before the restarts", 30, seed=99)
    first = httpx.post(f"{stack.url}/rerank", json=marker, timeout=60)
    assert first.status_code == 200, first.text

    # The cache off: every request computes, as long as a first request would.
    report, restarted = load_during_restart(stack, requests=300, concurrency=8, cache=False)

    assert report.failures == []
    assert len(report.statuses) >= 300
    assert restarted.split() == [word for r in replicas for word in ("restarted", r)]
    for replica in replicas:
        log = stack.logs(replica)
        assert "draining: no new requests" in log, log[-3000:]
        assert stack.inspect(replica, "{{.RestartCount}}") == "0"  # restarted by us, not crashed
        # A fresh process that never scored the marker finds every pair in Redis.
        answer = stack.post_inside(replica, marker)
        stages = answer["stages"]
        assert isinstance(stages, list) and stages
        assert all(s["cached"] == s["documents"] > 0 for s in stages), stages


def test_the_documented_stop_lets_a_long_request_finish(
    image: str, models: Path, tmp_path: Path
) -> None:
    """`docker stop -t N` of docs/deployment.md during a request that outlasts Docker's default
    10 s: the request gets its 200, the server exits 0 (no SIGKILL)."""
    (stop,) = [argv for argv in readme_commands() if argv[:2] == ["docker", "stop"]][:1]
    (grace,) = option_values(stop, "-t")
    assert int(grace) == stop_grace_s(Settings().drain_timeout_s)
    name = f"reranker-stop-{uuid.uuid4().hex[:8]}"
    stage1 = next((models / "flashrank").iterdir()).name
    port = Stack(image, models, tmp_path).port
    subprocess.run(
        [
            "docker", "run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:5200",
            "-v", f"{models}:{MODELS}:ro",
            "-e", f"RERANKER_STAGE1_MODEL={MODELS}/flashrank/{stage1}",
            "-e", f"RERANKER_STAGE2_MODEL={MODELS}/onnx-cross-encoder",
            "-e", "RERANKER_OFFLINE=true", "-e", "RERANKER_CPU_THREADS=1",
            image,
        ],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{url}/health/ready", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the container never became ready"
            time.sleep(1)
        # A twentieth of a CPU: 1,000 documents take well over Docker's default 10 s.
        subprocess.run(["docker", "update", "--cpus", "0.05", name], check=True, timeout=60)
        answers: list[httpx.Response] = []
        body = rerank_body("a long question", 1000, seed=5)
        client = threading.Thread(
            target=lambda: answers.append(
                httpx.post(
                    f"{url}/rerank", json=body, timeout=300, headers={"cache-control": "no-store"}
                )
            )
        )
        client.start()
        time.sleep(3)  # the request is in progress
        started = time.monotonic()
        subprocess.run(
            ["docker", "stop", "-t", grace, name], check=True, capture_output=True, timeout=300
        )
        stopped_after = time.monotonic() - started
        client.join(timeout=60)
        assert answers and answers[0].status_code == 200, answers and answers[0].text
        state = subprocess.run(
            ["docker", "inspect", "-f", "{{.State.ExitCode}}", name],
            capture_output=True, text=True, check=True, timeout=60,
        ).stdout.strip()  # fmt: skip
        assert state == "0"
        assert stopped_after > 10  # Docker's default stop timeout would have killed it
        logs = subprocess.run(["docker", "logs", name], capture_output=True, text=True, timeout=60)
        assert "draining: no new requests; 1 in progress" in logs.stdout + logs.stderr
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=120)
