"""Work for nobody: abandoned requests and SIGTERM with work in flight, on a real server.

    python bench/disconnects.py --models DIR [--abandoned 20] [--docs 500] [--drain 10]

Starts `reranker-server serve` on a free loopback port (models: DIR from `make-test-models
--full-size`; tiny ones are generated when omitted) twice and prints one table per scenario:

- **abandoned**: `--abandoned` clients each send `--docs` documents and close their socket after
  `--give-up` seconds; a 2-document request is sent at `--probe-at` s. Reported: its latency,
  how the abandoned requests were counted (`reranker_requests_total` by status), the pairs the
  scheduler dropped, and how long the server stayed busy after the sockets closed.
- **sigterm**: `--inflight` clients each send `--inflight-docs` documents; SIGTERM after
  `--term-at` s (drain timeout `--drain` s). Reported: the answers (status, error_type or not JSON),
  `/health/ready` right after the signal, the time to exit and the server's CPU seconds after
  its last answer.

The tests (tests/test_cancellation.py, slow) run the same scenarios with bounds; this script
prints the figures for docs/reliability.md. Bounded: every wait has a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

WORDS = (
    "paris capital france river city history population europe tower famous built century "
    "government language people world water food health research science music art"
).split()
# The server is idle when all of these are 0.
BUSY_GAUGES = (
    "reranker_busy_compute_threads",
    "reranker_queued_pairs",
    "reranker_in_flight_requests",
    "reranker_queue_depth_requests",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_body(documents: int, seed: int, words: tuple[int, int] = (60, 120)) -> dict[str, object]:
    """A native /rerank body of `documents` random passages (~100-170 tokens each)."""
    rng = random.Random(seed)
    return {
        "query": " ".join(rng.choice(WORDS) for _ in range(6)),
        "documents": [
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(*words)))
            for _ in range(documents)
        ],
        "top_k": 5,
    }


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])


@contextmanager
def serve(models: Path, log_dir: Path, **settings: object) -> Iterator[Server]:
    """`reranker-server serve` on 127.0.0.1 with the models under `models`; stopped (SIGKILL if
    it must) on exit."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RERANKER_")}
    env.update(
        RERANKER_HOST="127.0.0.1",
        RERANKER_PORT=str(port),
        RERANKER_STAGE1_MODEL=str(models / "flashrank" / "ms-marco-MiniLM-L-12-v2"),
        RERANKER_STAGE2_MODEL=str(models / "cross-encoder"),
        RERANKER_MODEL_CACHE_DIR=str(log_dir / "cache"),
        RERANKER_OFFLINE="true",
        RERANKER_DEVICE="cpu",
        RERANKER_CPU_THREADS="2",
        RERANKER_CACHE_ENABLED="false",  # every request computes
        RERANKER_LOG_LEVEL="info",
    )
    env.update({f"RERANKER_{k.upper()}": str(v) for k, v in settings.items()})
    log = log_dir / f"server-{port}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "reranker_server", "serve"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = Server(process, f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited at startup:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(server.url + "/health/live", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("server did not start in 300 s")
            time.sleep(0.2)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=30)


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of a Prometheus text metric's samples that carry `labels`."""
    total = 0.0
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
        if not match:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(2))
    return total


def raw_post(port: int, path: str, payload: bytes) -> socket.socket:
    """An HTTP/1.1 POST of a JSON `payload` written on a fresh socket; the answer is never
    read."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode()
    sock.sendall(head + payload)
    return sock


@dataclass
class AbandonedResult:
    probe_seconds: float
    probe_status: int
    statuses: dict[str, float]  # reranker_requests_total for /rerank by status
    dropped_pairs: float
    busy_after_s: float  # from the sockets' close until no request or pair is left


async def abandoned(
    server: Server,
    clients: int = 20,
    documents: int = 500,
    give_up_s: float = 1.0,
    probe_at_s: float = 5.0,
    path: str = "/rerank",
    bodies: list[object] | None = None,
    until_queued: bool = False,
    probe_timeout_s: float = 300.0,
) -> AbandonedResult:
    """`clients` requests whose sockets close after `give_up_s` (with `until_queued`, not before
    the server has queued pairs: then some are dropped from the scheduler's queue, not only
    while tokenizing); a 2-document request at `probe_at_s` after the start (at once after the
    sockets closed, if later). `bodies`: the abandoned bodies (default: `make_body(documents,
    i)`)."""
    payloads = [
        json.dumps(body).encode()
        for body in (bodies or [make_body(documents, i) for i in range(clients)])
    ]
    async with httpx.AsyncClient(base_url=server.url, timeout=probe_timeout_s) as http:
        started = time.monotonic()
        sockets = [raw_post(server.port, path, payload) for payload in payloads]
        await asyncio.sleep(max(0.0, started + give_up_s - time.monotonic()))
        deadline = time.monotonic() + 120
        while until_queued and time.monotonic() < deadline:
            if metric((await http.get("/metrics")).text, "reranker_queued_pairs") > 0:
                break
            await asyncio.sleep(0.05)
        for sock in sockets:
            sock.close()
        idle = asyncio.create_task(_idle_after(http, probe_timeout_s))
        await asyncio.sleep(max(0.0, started + probe_at_s - time.monotonic()))
        sent = time.monotonic()
        probe = await http.post("/rerank", json=make_body(2, 999))
        probe_seconds = time.monotonic() - sent
        busy_after = await idle
        await asyncio.sleep(0.5)  # the last abandoned handlers finish their bookkeeping
        text = (await http.get("/metrics")).text
    statuses = {  # the abandoned requests' (the probe's own 200 taken off)
        status: metric(text, "reranker_requests_total", route=path, status=status)
        - (status == str(probe.status_code) and path == "/rerank")
        for status in ("200", "499", "500", "503")
    }
    return AbandonedResult(
        probe_seconds=probe_seconds,
        probe_status=probe.status_code,
        statuses={k: v for k, v in statuses.items() if v},
        dropped_pairs=metric(text, "reranker_dropped_pairs_total"),
        busy_after_s=busy_after if busy_after is not None else float("nan"),
    )


async def _idle_after(http: httpx.AsyncClient, timeout_s: float) -> float | None:
    """Seconds until the server first reports no request and no pair in progress."""
    started = time.monotonic()
    while time.monotonic() < started + timeout_s:
        text = (await http.get("/metrics")).text
        if not any(metric(text, name) for name in BUSY_GAUGES):
            return time.monotonic() - started
        await asyncio.sleep(0.1)
    return None


@dataclass
class SigtermResult:
    # status, error_type ("" for an answer, None for a body that is not JSON), Retry-After
    answers: list[tuple[int, str | None, str | None]]
    ready_after_signal: int | str  # /health/ready's status, or the error
    exit_seconds: float  # SIGTERM to process exit
    cpu_after_last_answer_s: float
    returncode: int | None
    errors: list[str] = field(default_factory=list)  # client-side failures (connection reset)


async def sigterm_in_flight(
    server: Server, clients: int = 10, documents: int = 200, term_at_s: float = 2.0
) -> SigtermResult:
    """`clients` requests in flight, then SIGTERM; every answer, readiness, time to exit."""
    process = psutil.Process(server.process.pid)
    answers: list[tuple[int, str | None, str | None]] = []
    errors: list[str] = []
    last_answer = [0.0, 0.0]  # monotonic time, process CPU seconds at the last answer

    async def one(http: httpx.AsyncClient, i: int) -> None:
        try:
            response = await http.post("/rerank", json=make_body(documents, 100 + i))
        except httpx.HTTPError as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            return
        try:
            body = response.json()
            kind: str | None = body.get("error_type", "") if isinstance(body, dict) else ""
        except ValueError:
            kind = None
        answers.append((response.status_code, kind, response.headers.get("retry-after")))
        try:
            cpu = process.cpu_times()
            last_answer[:] = [time.monotonic(), cpu.user + cpu.system]
        except psutil.Error:
            pass

    limits = httpx.Limits(max_connections=clients + 2)
    async with httpx.AsyncClient(base_url=server.url, timeout=300, limits=limits) as http:
        tasks = [asyncio.create_task(one(http, i)) for i in range(clients)]
        await asyncio.sleep(term_at_s)
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        try:
            async with httpx.AsyncClient(timeout=5) as fresh:  # a probe's own connection
                ready: int | str = (await fresh.get(server.url + "/health/ready")).status_code
        except httpx.HTTPError as exc:
            ready = type(exc).__name__
        await asyncio.wait(tasks, timeout=600)
    returncode = None
    cpu_now = last_answer[1]
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        returncode = server.process.poll()
        if returncode is not None:
            break
        try:
            cpu = process.cpu_times()
            cpu_now = cpu.user + cpu.system
        except psutil.Error:
            break
        await asyncio.sleep(0.05)
    exited = time.monotonic()
    cpu_after = cpu_now - last_answer[1] if last_answer[1] else float("nan")
    return SigtermResult(
        answers=answers,
        ready_after_signal=ready,
        exit_seconds=exited - signalled,
        cpu_after_last_answer_s=max(0.0, cpu_after),
        returncode=returncode,
        errors=errors,
    )


def _models(directory: Path | None, scratch: Path) -> Path:
    if directory is not None:
        return directory
    from reranker_server.model_generator import write_test_models

    write_test_models(scratch / "models")
    return scratch / "models"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", type=Path, default=None)
    parser.add_argument("--abandoned", type=int, default=20)
    parser.add_argument("--docs", type=int, default=500)
    parser.add_argument("--give-up", type=float, default=1.0)
    parser.add_argument("--probe-at", type=float, default=5.0)
    parser.add_argument(
        "--until-queued", action="store_true", help="give up only once pairs are queued"
    )
    parser.add_argument("--inflight", type=int, default=10)
    parser.add_argument("--inflight-docs", type=int, default=200)
    parser.add_argument("--term-at", type=float, default=2.0)
    parser.add_argument("--drain", type=float, default=10.0)
    parser.add_argument("--only", choices=["abandoned", "sigterm"], default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        models = _models(args.models, Path(scratch))
        if args.only in (None, "abandoned"):
            with serve(models, Path(scratch)) as server:
                result = asyncio.run(
                    abandoned(
                        server,
                        args.abandoned,
                        args.docs,
                        args.give_up,
                        args.probe_at,
                        until_queued=args.until_queued,
                    )
                )
            print(f"\n{args.abandoned} abandoned requests of {args.docs} documents\n")
            print("| 2-doc request | status | abandoned counted as | dropped pairs | busy after |")
            print("|---:|---:|---|---:|---:|")
            counted = ", ".join(f"{int(n)} x {s}" for s, n in sorted(result.statuses.items()))
            print(
                f"| {result.probe_seconds:.2f} s | {result.probe_status} | {counted} | "
                f"{int(result.dropped_pairs)} | {result.busy_after_s:.1f} s |"
            )
        if args.only in (None, "sigterm"):
            with serve(models, Path(scratch), drain_timeout_s=args.drain) as server:
                term = asyncio.run(
                    sigterm_in_flight(server, args.inflight, args.inflight_docs, args.term_at)
                )
            print(
                f"\nSIGTERM after {args.term_at:g} s, {args.inflight} x {args.inflight_docs} "
                f"documents in flight, drain timeout {args.drain:g} s\n"
            )
            print("| answers | /health/ready after SIGTERM | exit after | CPU after last answer |")
            print("|---|---|---:|---:|")
            kinds: dict[str, int] = {}
            for status, kind, retry in term.answers:
                key = f"{status} {'text' if kind is None else kind or 'JSON'}"
                key += " Retry-After" if retry else ""
                kinds[key] = kinds.get(key, 0) + 1
            kinds.update({f"client error ({e.split(':')[0]})": 1 for e in term.errors})
            summary = ", ".join(f"{n} x {k}" for k, n in sorted(kinds.items()))
            print(
                f"| {summary} | {term.ready_after_signal} | {term.exit_seconds:.1f} s "
                f"(rc {term.returncode}) | {term.cpu_after_last_answer_s:.1f} s |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
