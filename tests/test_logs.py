"""What lands in the log: one traceback per unexpected error (and its 500 carries X-Request-ID),
expected outcomes below ERROR, and in JSON mode nothing but JSON lines (no progress bars)."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from reranker_server.app import create_app
from reranker_server.model_generator import TestModelPaths
from reranker_server.server import uvicorn_options
from reranker_server.settings import Settings

from .conftest import free_port, running
from .test_overload import BODY, slow_app
from .test_startup import BIN, env_for, wait_healthy


@contextmanager
def every_record(caplog: pytest.LogCaptureFixture) -> Iterator[list[logging.LogRecord]]:
    """Records of our loggers and uvicorn's (whose loggers do not propagate to the root)."""
    uvicorn_logger = logging.getLogger("uvicorn")
    uvicorn_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.DEBUG):
            yield caplog.records
    finally:
        uvicorn_logger.removeHandler(caplog.handler)


def test_an_unexpected_error_is_one_traceback_and_a_json_500_with_request_id(
    make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings()
    app = create_app(settings)

    async def boom() -> None:
        raise RuntimeError("a bug nobody mapped")

    app.add_api_route("/boom", boom, methods=["GET"])  # the narrowest seam: a route that raises
    with running(app, **uvicorn_options(settings)) as url, every_record(caplog) as records:
        response = httpx.get(f"{url}/boom", headers={"X-Request-ID": "bug-1"}, timeout=30)
        assert httpx.get(f"{url}/health").status_code == 200  # and the server carries on
    assert response.status_code == 500
    assert response.json()["error_type"] == "internal_error"
    assert response.headers["x-request-id"] == "bug-1"
    assert "a bug nobody mapped" not in response.text
    tracebacks = [r for r in records if r.exc_info is not None]
    assert len(tracebacks) == 1, [r.getMessage() for r in tracebacks]
    assert "a bug nobody mapped" in caplog.text  # ... in the log, once
    assert not [r for r in records if r.name.startswith("uvicorn") and r.levelno >= logging.ERROR]


def test_a_timeout_503_is_a_warning_not_an_error(
    make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    app, _ = slow_app(make_settings, 1.0, request_timeout_s=0.2)
    with running(app) as url, every_record(caplog) as records:
        assert httpx.post(f"{url}/rerank", json=BODY, timeout=30).status_code == 503
    assert any(r.levelno == logging.WARNING and "timeout" in r.getMessage() for r in records)
    assert not [r for r in records if r.levelno >= logging.ERROR]


def test_json_mode_writes_only_json_lines_with_stage2_on_the_cpu(
    tiny_models: TestModelPaths, tmp_path: Path
) -> None:
    """Stage 2 on the CPU loads weights through transformers, which draws tqdm bars."""
    port = free_port()
    process = subprocess.Popen(
        [str(BIN / "reranker-server"), "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env_for(
            tiny_models, tmp_path, RERANKER_STAGE2_ON_CPU="true", RERANKER_LOG_FORMAT="json"
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        assert wait_healthy(url, process)["stage2_device"] == "cpu"
        ranked = httpx.post(f"{url}/rerank", json=BODY, timeout=30).json()
        assert [s["device"] for s in ranked["stages"]] == ["cpu", "cpu"]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
        stdout, stderr = process.communicate()
    lines = [line for line in (stdout + stderr).splitlines() if line.strip()]
    assert "models ready" in stderr
    not_json = []
    for line in lines:
        try:
            json.loads(line)
        except ValueError:
            not_json.append(line)
    assert not_json == []
    assert "Loading weights" not in stderr
