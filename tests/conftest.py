"""Shared fixtures: generated tiny models, settings that point at them, a live uvicorn server."""

from __future__ import annotations

import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from reranker_server.model_generator import TestModelPaths, write_matrix, write_test_models
from reranker_server.settings import Settings


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TestModelPaths:
    """Tiny random BERT cross-encoders in FlashRank's and sentence-transformers' layouts."""
    with warnings.catch_warnings():  # the ONNX export's tracer warnings are not test failures
        warnings.simplefilter("ignore")
        return write_test_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def model_matrix(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The coverage matrix (model_generator.write_matrix): a tiny model per architecture, each
    FlashRank layout, ONNX exports. Name (e.g. "xlm-roberta", "flashrank/rank-T5-flan",
    "onnx/bert") -> directory."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return write_matrix(tmp_path_factory.mktemp("matrix"))


@pytest.fixture
def make_settings(tiny_models: TestModelPaths, tmp_path: Path) -> Callable[..., Settings]:
    def build(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "stage1_model": str(tiny_models.stage1),
            "stage2_model": str(tiny_models.stage2),
            "model_cache_dir": tmp_path / "cache",
            "offline": True,
            "device": "cpu",
            "cpu_threads": 1,
        }
        values.update(overrides)
        return Settings(**values)

    return build


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def running(app: Any, **options: Any) -> Iterator[str]:
    """Serve `app` with a real uvicorn on 127.0.0.1; yields the base URL. `options` go to
    uvicorn.Config (`**server.uvicorn_options(settings)`: the protocol `serve` runs)."""
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", lifespan="on", **options
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("uvicorn exited during startup")
        if time.monotonic() > deadline:
            raise TimeoutError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
