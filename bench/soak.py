"""Soak: steady load on a real server on 127.0.0.1 for N minutes; throughput, errors and the
server's RSS over time. Bounded in time and requests; stops by itself.

    python bench/soak.py --minutes 30 [--models DIR] [--concurrency 4] [--docs 20]

Starts `reranker-server serve` on a free loopback port (models: DIR from `make-test-models`,
tiny ones are generated when omitted), drives it with `--concurrency` clients sending a mix of
requests (half repeat earlier queries, so the cache works as in RAG traffic), samples the server's
RSS every `--interval` seconds and prints one markdown row per interval, then the RSS growth after
warm-up (the first interval). Exit status 1 if growth exceeds `--max-growth` percent.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

WORDS = (
    "paris capital france river city history population europe tower famous built century "
    "government language people world water food health research science music art"
).split()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_request(rng: random.Random, docs: int) -> dict[str, object]:
    query = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))
    documents = [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 120))) for _ in range(docs)
    ]
    return {"query": query, "documents": documents, "top_k": 5}


async def client(
    url: str,
    deadline: float,
    seed: int,
    docs: int,
    stats: dict[str, int],
    pool: list[dict[str, object]],
) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        while time.monotonic() < deadline:
            body = rng.choice(pool) if pool and rng.random() < 0.5 else make_request(rng, docs)
            if len(pool) < 200:
                pool.append(body)
            try:
                response = await http.post("/rerank", json=body)
                key = "ok" if response.status_code == 200 else f"http_{response.status_code}"
            except httpx.HTTPError:
                key = "transport_error"
            stats[key] = stats.get(key, 0) + 1


async def drive(url: str, server: psutil.Process, args: argparse.Namespace) -> list[tuple]:
    stats: dict[str, int] = {}
    pool: list[dict[str, object]] = []
    end = time.monotonic() + args.minutes * 60
    tasks = [
        asyncio.create_task(client(url, end, i, args.docs, stats, pool))
        for i in range(args.concurrency)
    ]
    rows = []
    started = time.monotonic()
    last_total = 0
    while time.monotonic() < end:
        await asyncio.sleep(min(args.interval, max(0.0, end - time.monotonic())))
        total = sum(stats.values())
        errors = total - stats.get("ok", 0)
        rss = server.memory_info().rss / 2**20
        rate = (total - last_total) / args.interval
        rows.append((time.monotonic() - started, total, errors, rate, rss))
        print(
            f"| {rows[-1][0] / 60:.1f} | {total} | {errors} | {rate:.1f} | {rss:.0f} |", flush=True
        )
        last_total = total
    await asyncio.gather(*tasks)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=5)
    parser.add_argument("--models", type=Path, default=None)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--docs", type=int, default=20)
    parser.add_argument("--interval", type=float, default=60)
    parser.add_argument("--max-growth", type=float, default=5.0)
    args = parser.parse_args()

    models = args.models
    if models is None:
        models = Path(tempfile.mkdtemp(prefix="soak-models-"))
        subprocess.run(
            [sys.executable, "-m", "reranker_server", "make-test-models", str(models)],
            check=True,
            capture_output=True,
        )
    port = free_port()
    env = {
        **os.environ,
        "RERANKER_STAGE1_MODEL": str(models / "flashrank" / "ms-marco-MiniLM-L-12-v2"),
        "RERANKER_STAGE2_MODEL": str(models / "cross-encoder"),
        "RERANKER_OFFLINE": "true",
        "RERANKER_LOG_LEVEL": "warning",
        "RERANKER_MODEL_CACHE_DIR": tempfile.mkdtemp(),
    }
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "reranker_server",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        print(
            f"\nsoak: {args.minutes:g} min, {args.concurrency} clients, {args.docs} documents "
            f"per request, {os.cpu_count()} cores\n"
        )
        print("| minute | requests | errors | req/s (interval) | server RSS (MiB) |")
        print("|---:|---:|---:|---:|---:|")
        rows = asyncio.run(drive(url, psutil.Process(process.pid), args))
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
    warm, last = rows[0][4], rows[-1][4]
    growth = (last - warm) / warm * 100
    total, errors = rows[-1][1], rows[-1][2]
    print(
        f"\nrequests {total}, errors {errors}, mean {total / rows[-1][0]:.1f} req/s; "
        f"RSS after warm-up {warm:.0f} MiB -> {last:.0f} MiB ({growth:+.1f}%); "
        f"server exit status {code}"
    )
    return 0 if growth <= args.max_growth and errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
