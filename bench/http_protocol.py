"""What the h11-based protocol (server.HttpProtocol) costs against uvicorn's default (httptools).

    python bench/http_protocol.py [--models DIR] [--requests 300]

One server per protocol, in this process's event loop thread (real uvicorn on 127.0.0.1), with the
same app and models; a sequential keep-alive client sends `--requests` small rerank requests (2
short documents: the cheapest real work) and as many `GET /health`, after a warm-up. Prints p50 /
p95 latency per protocol and the ratio to httptools (same run). Bounded in requests.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from reranker_server.app import create_app  # noqa: E402
from reranker_server.server import uvicorn_options  # noqa: E402
from reranker_server.settings import Settings  # noqa: E402

BODY = {"query": "capital of france", "documents": ["paris is the capital", "berlin"], "top_k": 1}


@contextmanager
def serving(app: Any, **options: Any) -> Iterator[str]:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **options)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def timings(url: str, requests: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"rerank": [], "health": []}
    with httpx.Client(base_url=url, timeout=60) as client:
        for _ in range(20):
            client.post("/rerank", json=BODY).raise_for_status()
        for _ in range(requests):
            started = time.perf_counter()
            client.post("/rerank", json=BODY).raise_for_status()
            out["rerank"].append(time.perf_counter() - started)
            started = time.perf_counter()
            client.get("/health").raise_for_status()
            out["health"].append(time.perf_counter() - started)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=Path, help="directory from make-test-models")
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        models = args.models
        if models is None:
            from reranker_server.model_generator import write_test_models

            write_test_models(Path(scratch) / "models")
            models = Path(scratch) / "models"
        settings = Settings(
            stage1_model=str(next((models / "flashrank").iterdir())),
            model_cache_dir=Path(scratch) / "cache",
            offline=True,
            device="cpu",
            cache_enabled=False,  # every request runs the model
            log_level="warning",
        )
        results = {}
        for name, options in (
            ("httptools (uvicorn default)", {"http": "httptools"}),
            ("h11: server.HttpProtocol", uvicorn_options(settings)),
        ):
            with serving(create_app(settings), **options) as url:
                results[name] = timings(url, args.requests)

    base = results["httptools (uvicorn default)"]
    print(f"\n{args.requests} sequential requests per row, keep-alive, 127.0.0.1\n")
    print("| protocol | route | p50 ms | p95 ms | p50 vs httptools |")
    print("|---|---|---:|---:|---:|")
    for name, rows in results.items():
        for route, values in rows.items():
            p50 = statistics.median(values) * 1000
            p95 = statistics.quantiles(values, n=20)[-1] * 1000
            ratio = p50 / (statistics.median(base[route]) * 1000)
            print(f"| {name} | {route} | {p50:.2f} | {p95:.2f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
