"""Score cache: cache-hit latency and a repeated-query workload (50% overlap), against no cache.

    python bench/cache_bench.py [--models DIR] [--tokenizer DIR] [--docs 60] [--reps 6]

Builds shape-equivalent models (`make-test-models --full-size`) unless `--models` points at
existing ones, then starts the real server (`reranker-server serve` under uvicorn on 127.0.0.1)
once per cache backend -- none, in-process memory, and Redis when `redis-server` is installed --
one after the other (so they never share the cores), and sends the same requests to each:

- **hit**: one request repeated (after one untimed request that fills the cache);
- **overlap**: requests for one query, each sharing half its documents with the previous one
  (after one untimed request), as RAG traffic does when a conversation goes on.

Prints a markdown table (p50 / p95 latency, requests per second, speed-up over no cache in this
run) and how far the cached servers' scores are from the no-cache server's for the same requests
(stage 1 is int8 with dynamic quantization: a passage's score moves slightly with its batch-mates).
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

WORDS = (
    "paris capital france river city history population europe tower famous built century "
    "government language people world water food health research science music art museum "
    "bridge train station school university market price bank company team player game"
).split()
QUERY = "what is the population of the capital of france"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def passages(count: int, seed: int = 0) -> list[str]:
    """Passages of 60-100 words (about 80-130 tokens), like RAG chunks."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(60, 100))) for _ in range(count)]


@contextmanager
def redis_server() -> Iterator[str | None]:
    """A throwaway redis-server on a free port; None when it is not installed."""
    if shutil.which("redis-server") is None:
        yield None
        return
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        process = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", tmp],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            time.sleep(0.5)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            process.kill()
            process.wait()


@contextmanager
def server(models: Path, env_extra: dict[str, str]) -> Iterator[str]:
    """`reranker-server serve` on 127.0.0.1 with the given settings; yields the base URL."""
    port = free_port()
    env = {
        **os.environ,
        "RERANKER_STAGE1_MODEL": str(models / "flashrank" / "ms-marco-MiniLM-L-12-v2"),
        "RERANKER_STAGE2_MODEL": str(models / "cross-encoder"),
        "RERANKER_OFFLINE": "true",
        "RERANKER_MODEL_CACHE_DIR": str(models / "cache"),
        "RERANKER_LOG_LEVEL": "warning",
        **env_extra,
    }
    command = [sys.executable, "-m", "reranker_server", "serve", "--host", "127.0.0.1",
               "--port", str(port)]  # fmt: skip
    process = subprocess.Popen(command, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(url + "/health/ready", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=60)


def timed(client: httpx.Client, bodies: list[dict[str, Any]]) -> tuple[list[float], list[Any]]:
    seconds, answers = [], []
    for body in bodies:
        started = time.perf_counter()
        response = client.post("/rerank", json=body)
        seconds.append(time.perf_counter() - started)
        response.raise_for_status()
        answers.append(response.json())
    return seconds, answers


def workloads(docs: int, reps: int) -> dict[str, tuple[dict[str, Any], list[dict[str, Any]]]]:
    """name -> (untimed priming request, timed requests)."""
    pool = passages(docs // 2 * (reps + 2))
    hit = {"query": QUERY, "documents": pool[:docs], "top_k": 10}
    half = docs // 2
    overlap = [
        {"query": QUERY + " today", "documents": pool[i * half : i * half + docs], "top_k": 10}
        for i in range(reps + 1)
    ]
    return {"hit": (hit, [hit] * reps), "overlap (50%)": (overlap[0], overlap[1:])}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def score_gap(reference: list[Any], answers: list[Any]) -> tuple[float, int, float, float]:
    """Largest |score difference| of a document both answers returned, how many requests
    returned the same top-k indices in the same order, the mean share of top-k documents in
    common, and the smallest gap between neighbouring scores of the reference top-k."""
    worst, same, shared, closest = 0.0, 0, 0.0, 1.0
    for ref, got in zip(reference, answers, strict=True):
        ref_scores = {r["index"]: r["score"] for r in ref["results"]}
        for r in got["results"]:
            if r["index"] in ref_scores:
                worst = max(worst, abs(r["score"] - ref_scores[r["index"]]))
        same += [r["index"] for r in ref["results"]] == [r["index"] for r in got["results"]]
        shared += len(ref_scores.keys() & {r["index"] for r in got["results"]}) / len(ref_scores)
        ordered = [r["score"] for r in ref["results"]]
        closest = min([closest, *(a - b for a, b in itertools.pairwise(ordered))])
    return worst, same, shared / len(reference), closest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=None, help="existing test models")
    parser.add_argument("--tokenizer", type=Path, default=None, help="BERT tokenizer directory")
    parser.add_argument("--docs", type=int, default=60, help="documents per request")
    parser.add_argument("--reps", type=int, default=6, help="timed requests per workload")
    parser.add_argument("--threads", type=int, default=0, help="RERANKER_CPU_THREADS")
    parser.add_argument("--no-redis", action="store_true", help="skip the Redis backend")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        models = args.models
        if models is None:
            from reranker_server.model_generator import write_test_models

            models = Path(tmp) / "models"
            write_test_models(models, full_size=True, tokenizer_dir=args.tokenizer)
        jobs = workloads(args.docs, args.reps)
        with redis_server() as redis_url:
            backends: dict[str, dict[str, str]] = {
                "none": {"RERANKER_CACHE_ENABLED": "false"},
                "memory": {"RERANKER_CACHE_ENABLED": "true"},
            }
            if redis_url and not args.no_redis:
                backends["redis"] = {
                    "RERANKER_CACHE_ENABLED": "true",
                    "RERANKER_CACHE_URL": redis_url,
                }
            results: dict[tuple[str, str], tuple[list[float], list[Any]]] = {}
            for backend, env in backends.items():
                env = {**env, "RERANKER_CPU_THREADS": str(args.threads)}
                with server(models, env) as url, httpx.Client(base_url=url, timeout=600) as client:
                    for name, (prime, bodies) in jobs.items():
                        client.post("/rerank", json=prime).raise_for_status()
                        results[(name, backend)] = timed(client, bodies)

    print(f"\n{args.docs} documents per request, top_k 10, {args.reps} timed requests per row, "
          "sequential client, stage 1 only (no GPU)\n")  # fmt: skip
    print("| workload | cache | p50 ms | p95 ms | req/s | speed-up vs no cache (p50) |")
    print("|---|---|---:|---:|---:|---:|")
    for name in jobs:
        base = statistics.median(results[(name, "none")][0])
        for backend in backends:
            seconds = results[(name, backend)][0]
            p50 = statistics.median(seconds)
            print(
                f"| {name} | {backend} | {p50 * 1000:.1f} | {percentile(seconds, 0.95) * 1000:.1f} "
                f"| {len(seconds) / sum(seconds):.2f} | {base / p50:.1f}x |"
            )
    print("\nScores of the cached servers against the no-cache server, same requests:\n")
    print(
        "| workload | cache | max abs score difference | same top-10 order | top-10 in common "
        "| smallest neighbour gap (no cache) |"
    )
    print("|---|---|---:|---:|---:|---:|")
    for name in jobs:
        reference = results[(name, "none")][1]
        for backend in backends:
            if backend != "none":
                worst, same, shared, closest = score_gap(reference, results[(name, backend)][1])
                print(
                    f"| {name} | {backend} | {worst:.2e} | {same}/{len(reference)} "
                    f"| {shared:.0%} | {closest:.1e} |"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
