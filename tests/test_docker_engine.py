"""The image, built and run for real by a Docker engine (skipped where none answers `docker info`).

What a user does: `docker build` (the default image: no torch), `docker run` with generated models
mounted read-only (files 0644, read by the container's uid 1000), a request through both stages
(FlashRank, then the cross-encoder's ONNX export), the HEALTHCHECK turning healthy, `docker stop`
with the documented grace ending with status 0, `docker run IMAGE python ...`; and a host directory
uid 1000 can't write stopping startup with one line.

Slow (an image build: minutes), so it runs with `make test-all`. Where the base image or PyPI
needs a stand-in, DOCKER_BUILD_ARGS passes extra `docker build` arguments.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from reranker_server.model_generator import TestModelPaths, write_test_models
from reranker_server.settings import Settings

from .conftest import free_port
from .deploy_files import ROOT, stop_grace_s

IMAGE = "reranker-server:engine-test"
MODELS = "/models"


def _engine() -> str | None:
    """Why no engine can be used, or None when `docker info` answers."""
    docker = shutil.which("docker")
    if docker is None:
        return "no docker command"
    info = subprocess.run([docker, "info"], capture_output=True, text=True, timeout=30)
    if info.returncode != 0:
        last = (info.stderr.strip().splitlines() or ["docker info failed"])[-1]
        return f"no Docker engine answers: {last}"
    return None


NO_ENGINE = _engine()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(NO_ENGINE is not None, reason=NO_ENGINE or ""),
]


def docker(
    *args: str, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, f"docker {' '.join(args)}:\n{result.stderr[-3000:]}"
    return result


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
def onnx_models(tmp_path_factory: pytest.TempPathFactory) -> TestModelPaths:
    with warnings.catch_warnings():  # the ONNX export's tracer warnings are not test failures
        warnings.simplefilter("ignore")
        return write_test_models(tmp_path_factory.mktemp("onnx-models"), onnx=True)


@pytest.fixture
def container() -> Iterator[str]:
    name = f"reranker-test-{uuid.uuid4().hex[:8]}"
    yield name
    docker("rm", "-f", name, check=False)


def _state(name: str, field: str) -> str:
    return docker("inspect", "--format", "{{" + field + "}}", name).stdout.strip()


def test_the_image_serves_turns_healthy_and_stops_with_0(
    image: str, container: str, onnx_models: TestModelPaths
) -> None:
    models = onnx_models.stage2.parent
    port = free_port()
    docker(
        "run",
        "-d",
        "--name",
        container,
        "-p",
        f"127.0.0.1:{port}:5200",
        "-v",
        f"{models}:{MODELS}:ro",
        "-e",
        f"RERANKER_STAGE1_MODEL={MODELS}/flashrank/{onnx_models.stage1.name}",
        "-e",
        f"RERANKER_STAGE2_MODEL={MODELS}/onnx-cross-encoder",
        "-e",
        "RERANKER_OFFLINE=true",
        "--health-interval=2s",
        image,
    )
    assert _state(container, ".Config.User").startswith("1000")
    deadline = time.monotonic() + 180
    while _state(container, ".State.Health.Status") != "healthy":
        assert _state(container, ".State.Running") == "true", docker("logs", container).stderr
        assert time.monotonic() < deadline, docker("logs", container).stderr
        time.sleep(1)
    answer = httpx.post(
        f"http://127.0.0.1:{port}/rerank",
        json={"query": "capital of France", "documents": ["Berlin", "Paris", "Rome"], "top_k": 2},
        timeout=30,
    )
    assert answer.status_code == 200 and len(answer.json()["results"]) == 2
    assert len(answer.json()["stages"]) == 2  # FlashRank, then the ONNX cross-encoder
    assert "SwaggerUIBundle" in httpx.get(f"http://127.0.0.1:{port}/docs", timeout=10).text
    grace = stop_grace_s(Settings().drain_timeout_s)
    docker("stop", "-t", str(grace), container, timeout=grace + 30)
    assert _state(container, ".State.ExitCode") == "0"


def test_docker_run_image_python_runs_python(image: str) -> None:
    run = docker("run", "--rm", image, "python", "-c", "import reranker_server; print('ok')")
    assert run.stdout.strip() == "ok"
    assert docker("run", "--rm", image, "python", "-c", "import torch", check=False).returncode


def test_the_default_image_has_no_torch_and_fits_600_mb(image: str) -> None:
    size = int(docker("image", "inspect", "--format", "{{.Size}}", image).stdout)
    assert size <= 600 * 10**6, size


def test_a_cache_uid_1000_cannot_write_stops_startup_with_one_line(
    image: str, container: str, tmp_path: Path
) -> None:
    cache = tmp_path / "hf_cache"
    cache.mkdir(mode=0o755)  # owned by the uid running the tests, not 1000
    if os.getuid() == 1000:
        pytest.skip("the tests run as uid 1000: the cache would be writable")
    run = docker("run", "--name", container, "-v", f"{cache}:/app/hf_cache", image, check=False)
    assert run.returncode != 0
    lines = [line for line in run.stderr.splitlines() if "not writable" in line]
    assert len(lines) == 1 and "by uid 1000" in lines[0], run.stderr[-3000:]
    assert "Traceback" not in run.stderr and "PermissionError" not in run.stderr
