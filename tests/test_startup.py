"""The real entry points in subprocesses: `uvicorn reranker_server:app` and `reranker-server`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from reranker_server.model_generator import TestModelPaths

from .conftest import free_port

BIN = Path(sys.executable).parent


def env_for(models: TestModelPaths, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RERANKER_")}
    env.update(
        {
            "RERANKER_STAGE1_MODEL": str(models.stage1),
            "RERANKER_STAGE2_MODEL": str(models.stage2),
            "RERANKER_MODEL_CACHE_DIR": str(tmp_path / "cache"),
            "RERANKER_OFFLINE": "true",
            "RERANKER_DEVICE": "cpu",
            "HF_HUB_OFFLINE": "1",
        }
    )
    env.update(extra)
    return env


def wait_healthy(url: str, process: subprocess.Popen[str], seconds: float = 90) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1]
        try:
            return httpx.get(f"{url}/health", timeout=1).json()  # type: ignore[no-any-return]
        except httpx.TransportError:
            time.sleep(0.2)
    raise TimeoutError("server did not come up")


def test_import_is_cheap() -> None:
    code = (
        "import sys, reranker_server; "
        "heavy = [m for m in ('torch', 'onnxruntime', 'sentence_transformers', 'flashrank') "
        "if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_uvicorn_entry_point_serves_and_stops_cleanly(
    tiny_models: TestModelPaths, tmp_path: Path
) -> None:
    """The README's quick-start command. uvicorn's --port decides, so an invalid RERANKER_PORT
    does not stop it (a warning says it is unused); each request is logged once, by the app."""
    port = free_port()
    process = subprocess.Popen(
        [str(BIN / "uvicorn"), "reranker_server:app", "--host", "127.0.0.1", "--port", str(port)],
        env=env_for(
            tiny_models,
            tmp_path,
            RERANKER_STAGE2_ON_CPU="true",
            RERANKER_PORT="abc",
            RERANKER_LOG_FORMAT="text",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        health = wait_healthy(url, process)
        assert health["status"] == "ok" and health["stage2_device"] == "cpu"
        body = httpx.post(
            f"{url}/rerank", json={"query": "paris", "documents": ["a", "b"], "top_k": 1}
        ).json()
        assert [s["device"] for s in body["stages"]] == ["cpu", "cpu"]
        time.sleep(0.5)  # the access line is written after the response
        process.send_signal(signal.SIGTERM)
        # uvicorn's own CLI shuts down gracefully, then re-raises SIGTERM on itself
        assert process.wait(timeout=30) in (0, -signal.SIGTERM)
    finally:
        process.kill()
        _, stderr = process.communicate()
    assert "models ready" in stderr and "Finished server process" in stderr
    assert "RERANKER_PORT='abc' is not used" in stderr
    access = [line for line in stderr.splitlines() if "POST /rerank" in line]
    assert len(access) == 1, access
    assert "reranker_server.access" in access[0] and "status=200" in access[0]


def test_cli_serve_flags_override_environment(tiny_models: TestModelPaths, tmp_path: Path) -> None:
    port = free_port()
    process = subprocess.Popen(
        [
            str(BIN / "reranker-server"),
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--candidates",
            "3",
            "--log-level",
            "warning",
        ],
        env=env_for(tiny_models, tmp_path, RERANKER_PORT="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_healthy(f"http://127.0.0.1:{port}", process)["status"] == "ok"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
        process.communicate()


def test_missing_model_stops_startup_with_one_clear_line(
    tiny_models: TestModelPaths, tmp_path: Path
) -> None:
    env = env_for(
        tiny_models,
        tmp_path,
        RERANKER_STAGE2_ON_CPU="true",
        RERANKER_STAGE2_MODEL="cross-encoder/no-such-model",
    )
    out = subprocess.run(
        [str(BIN / "uvicorn"), "reranker_server:app", "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    lines = [
        line
        for line in out.stderr.splitlines()
        if "cross-encoder/no-such-model" in line and "cascade default:" not in line  # the plan
    ]
    assert len(lines) == 1
    assert "offline mode is on" in lines[0] and "fix:" in lines[0]


ENTRY_POINTS = {
    "serve": [str(BIN / "reranker-server"), "serve"],
    "download": [str(BIN / "reranker-server"), "download"],
    "uvicorn": [str(BIN / "uvicorn"), "reranker_server:app", "--port", "1"],
}


@pytest.mark.parametrize("entry_point", sorted(ENTRY_POINTS))
def test_an_invalid_setting_is_one_line_naming_the_variable_and_value(entry_point: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RERANKER_")}
    env["RERANKER_DOWNLOAD_TIMEOUT_S"] = "soon"  # a setting every entry point uses
    out = subprocess.run(
        ENTRY_POINTS[entry_point], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        "reranker-server: invalid setting RERANKER_DOWNLOAD_TIMEOUT_S='soon': Input should be a "
        "valid number, unable to parse string as a number"
    ]


def test_a_flag_error_names_the_flag() -> None:
    out = subprocess.run(
        [str(BIN / "reranker-server"), "serve", "--device", "tpu"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert (
        out.stderr
        == "reranker-server: invalid setting --device='tpu': must be auto, cpu, cuda or cuda:N\n"
    )


def test_make_test_models_prints_the_readme_serve_command(tmp_path: Path) -> None:
    """The README demo's second command, run as written; it prints the demo's third one."""
    from .test_readme_quickstart import indented_blocks

    (demo,) = indented_blocks("## Demo without downloads")
    _, make, serve = demo.splitlines()
    out = subprocess.run(
        [str(BIN / word) if i == 0 else word for i, word in enumerate(make.split())],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
        cwd=tmp_path,
    )
    assert f"  {serve}\n" in out.stdout
    assert "random-weight" in out.stdout and "not for ranking" in out.stdout
    assert (tmp_path / "demo-models" / "cross-encoder" / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo-models"]


def test_sigterm_finishes_the_request_in_flight_then_exits_0(
    tiny_models: TestModelPaths, tmp_path: Path
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [
            str(BIN / "reranker-server"),
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--cpu-threads",
            "1",
        ],
        env=env_for(tiny_models, tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    docs = [("paris capital river city history music " * 70) + str(i) for i in range(1000)]
    result: dict[str, httpx.Response] = {}
    try:
        wait_healthy(url, process)

        def long_request() -> None:
            result["r"] = httpx.post(
                f"{url}/rerank",
                timeout=120,
                json={"query": "capital", "documents": docs, "top_k": 3},
            )

        import threading

        worker = threading.Thread(target=long_request)
        worker.start()
        time.sleep(1.0)  # the request is being scored now (it takes seconds)
        process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        # draining: the port stays open, but readiness and new work are refused at once
        ready = httpx.get(f"{url}/health/ready", timeout=30)
        new = httpx.post(f"{url}/rerank", timeout=30, json={"query": "q", "documents": ["a"]})
        worker.join(timeout=120)
        assert process.wait(timeout=60) == 0
    finally:
        process.kill()
        _, stderr = process.communicate()
    assert ready.status_code == 503 and ready.json()["error_type"] == "shutting_down"
    assert new.status_code == 503 and int(new.headers["Retry-After"]) >= 1
    assert result["r"].status_code == 200 and len(result["r"].json()["results"]) == 3
    assert "Shutting down" in stderr or "shutdown" in stderr.lower()
