"""Replicas behind the load balancer, run for real: docker-compose.yml (HAProxy, Redis, N replicas
of the server image) on a Docker engine, driven over 127.0.0.1.

    python bench/scale.py --image reranker-server:bench

Builds nothing: pass an image built from the Dockerfile (`docker build -t reranker-server:bench .`).
Writes generated test models (nothing is downloaded) and mounts them read-only into the replicas,
then prints requests/s for 1 and 3 replicas (the same load, the cache off so every request
computes) and the p99 latency with 3 replicas, steady and while deploy/rolling-restart.sh
restarts every replica under load, with the count of failed requests. tests/test_scale_engine.py
runs the same harness (Stack, run_load) as a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

COMPOSE_FILE = ROOT / "docker-compose.yml"
ROLLING_RESTART = ROOT / "deploy" / "rolling-restart.sh"
SERVICE = "reranker-server"
MODELS = "/models"

QUERIES = [f"what is the capital of country number {i}" for i in range(12)]


def documents(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = "paris berlin rome capital city river history museum people train north".split()
    return [" ".join(rng.choice(words) for _ in range(24)) for _ in range(count)]


def rerank_body(query: str, count: int, seed: int) -> dict[str, object]:
    return {"query": query, "documents": documents(count, seed), "top_k": 3}


def docker_engine_problem() -> str | None:
    """Why no engine can run the stack, or None when `docker info` and `docker compose` answer."""
    if shutil.which("docker") is None:
        return "no docker command"
    info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    if info.returncode != 0:
        last = (info.stderr.strip().splitlines() or ["docker info failed"])[-1]
        return f"no Docker engine answers: {last}"
    compose = subprocess.run(
        ["docker", "compose", "version"], capture_output=True, text=True, timeout=30
    )
    if compose.returncode != 0:
        return "no Compose v2 (`docker compose`)"
    return None


def write_models(directory: Path) -> Path:
    """Generated models (random weights, nothing downloaded), readable by the container's uid."""
    from reranker_server.model_generator import write_test_models

    write_test_models(directory, onnx=True)
    return directory


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Stack:
    """docker-compose.yml as a project of its own: the image, the mounted models, the load
    balancer on a free 127.0.0.1 port (an override file; docker-compose.yml itself is unchanged)."""

    image: str
    models: Path
    workdir: Path
    project: str = field(default_factory=lambda: f"rerankscale{uuid.uuid4().hex[:8]}")
    port: int = field(default_factory=free_port)

    def __post_init__(self) -> None:
        override = self.workdir / "override.yml"
        stage1 = next((self.models / "flashrank").iterdir()).name
        override.write_text(
            f"""services:
  {SERVICE}:
    image: {self.image}
    volumes:
      - {self.models}:{MODELS}:ro
    environment:
      RERANKER_STAGE1_MODEL: {MODELS}/flashrank/{stage1}
      RERANKER_STAGE2_MODEL: {MODELS}/onnx-cross-encoder
      RERANKER_OFFLINE: "true"
      RERANKER_CPU_THREADS: "1"
  lb:
    ports: !override
      - "127.0.0.1:{self.port}:5200"
""",
            encoding="utf-8",
        )
        self.env = {
            **os.environ,
            "COMPOSE_PROJECT_NAME": self.project,
            "COMPOSE_FILE": os.pathsep.join([str(COMPOSE_FILE), str(override)]),
        }

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def run(self, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            argv, env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
        )
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}:\n{result.stdout[-2000:]}{result.stderr[-3000:]}")
        return result

    def up(self, replicas: int, timeout: float = 300) -> None:
        """`docker compose up -d --scale reranker-server=N` (the documented command, less the
        build), then wait until every replica is healthy and the load balancer answers."""
        self.run("docker", "compose", "up", "-d", "--no-build", "--scale", f"{SERVICE}={replicas}")
        deadline = time.monotonic() + timeout
        while True:
            ids = self.replicas()
            states = [self.inspect(i, "{{.State.Health.Status}}") for i in ids]
            if len(ids) == replicas and all(s == "healthy" for s in states) and self._answers():
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"replicas not ready: {states}\n{self.logs()[-3000:]}")
            time.sleep(1)

    def _answers(self) -> bool:
        try:
            body = rerank_body("ready?", 3, 0)
            return httpx.post(f"{self.url}/rerank", json=body, timeout=10).status_code == 200
        except httpx.HTTPError:
            return False

    def replicas(self) -> list[str]:
        return self.run("docker", "compose", "ps", "-q", SERVICE).stdout.split()

    def inspect(self, container: str, template: str) -> str:
        return self.run("docker", "inspect", "-f", template, container).stdout.strip()

    def logs(self, container: str | None = None) -> str:
        if container is None:
            result = self.run("docker", "compose", "logs", "--no-color")
        else:
            result = self.run("docker", "logs", container)
        return result.stdout + result.stderr

    def rolling_restart(self) -> str:
        """deploy/rolling-restart.sh, as documented, on this project."""
        return self.run("sh", str(ROLLING_RESTART), SERVICE, timeout=1800).stdout

    def post_inside(self, container: str, body: dict[str, object]) -> dict[str, object]:
        """POST /rerank to one replica directly (inside its container), past the balancer."""
        code = (
            "import json, sys, urllib.request; r = urllib.request.urlopen(urllib.request.Request("
            "'http://127.0.0.1:5200/rerank', sys.stdin.buffer.read(), "
            "{'content-type': 'application/json'}), timeout=60); print(r.read().decode())"
        )
        result = subprocess.run(
            ["docker", "exec", "-i", container, "python", "-c", code],
            input=json.dumps(body),
            capture_output=True,
            text=True,
            timeout=90,
        )
        if result.returncode != 0:
            raise RuntimeError(result.stderr[-2000:])
        answer: dict[str, object] = json.loads(result.stdout)
        return answer

    def down(self) -> None:
        subprocess.run(
            ["docker", "compose", "down", "-v", "-t", "5"],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            timeout=300,
        )


@dataclass
class LoadReport:
    statuses: list[int]
    latencies: list[float]
    seconds: float
    failures: list[str]

    @property
    def ok(self) -> int:
        return sum(1 for s in self.statuses if s == 200)

    @property
    def rps(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def percentile(self, p: float) -> float:
        ordered = sorted(self.latencies)
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def run_load(
    url: str,
    *,
    requests: int,
    concurrency: int,
    long_every: int = 10,
    long_documents: int = 1000,
    short_documents: int = 20,
    cache: bool = True,
    until: Callable[[], bool] | None = None,
    max_requests: int = 5000,
    max_seconds: float = 900,
) -> LoadReport:
    """`concurrency` clients send `requests` rerank requests (every `long_every`-th one with
    `long_documents` documents), and keep going while `until()` is False (bounded by
    `max_requests` and `max_seconds`). Queries repeat, so answers hit the shared cache."""
    headers = {} if cache else {"x-reranker-cache": "off"}
    lock = threading.Lock()
    statuses: list[int] = []
    latencies: list[float] = []
    failures: list[str] = []
    counter = iter(range(max_requests))
    started = time.monotonic()

    def next_index() -> int | None:
        with lock:
            index = next(counter, None)
        if index is None or time.monotonic() - started > max_seconds:
            return None
        if index >= requests and (until is None or until()):
            return None
        return index

    def client() -> None:
        with httpx.Client(timeout=300) as http:
            while (index := next_index()) is not None:
                long = long_every and index % long_every == long_every - 1
                body = rerank_body(
                    QUERIES[index % len(QUERIES)],
                    long_documents if long else short_documents,
                    seed=index % 7,
                )
                sent = time.monotonic()
                try:
                    response = http.post(f"{url}/rerank", json=body, headers=headers)
                    status, text = response.status_code, response.text[:300]
                except httpx.HTTPError as exc:
                    status, text = 0, f"{type(exc).__name__}: {exc}"
                with lock:
                    statuses.append(status)
                    latencies.append(time.monotonic() - sent)
                    if status != 200:
                        failures.append(f"request {index}: {status} {text}")

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return LoadReport(statuses, latencies, time.monotonic() - started, failures)


def load_during_restart(
    stack: Stack, *, requests: int, concurrency: int, cache: bool = True
) -> tuple[LoadReport, str]:
    """Load while deploy/rolling-restart.sh restarts every replica; the load starts first and
    goes on until the restart script is done (and at least `requests` were sent)."""
    done = threading.Event()
    output: list[str] = []
    errors: list[BaseException] = []

    def restart() -> None:
        try:
            time.sleep(2)  # requests in flight on the first replica when it is stopped
            output.append(stack.rolling_restart())
        except BaseException as exc:
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=restart)
    thread.start()
    report = run_load(
        stack.url, requests=requests, concurrency=concurrency, cache=cache, until=done.is_set
    )
    thread.join()
    if errors:
        raise errors[0]
    return report, "".join(output)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", required=True, help="an image built from the Dockerfile")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    problem = docker_engine_problem()
    if problem:
        print(problem)
        return 1
    with tempfile.TemporaryDirectory(prefix="scale-bench-") as tmp:
        work = Path(tmp)
        models = write_models(work / "models")
        stack = Stack(args.image, models, work)
        rows = []
        try:
            for replicas in (1, 3):
                stack.up(replicas)
                run_load(stack.url, requests=20, concurrency=2, cache=False)  # warm
                report = run_load(
                    stack.url, requests=args.requests, concurrency=args.concurrency, cache=False
                )
                rows.append((f"{replicas} replica(s), steady", report))
            report, _ = load_during_restart(
                stack, requests=args.requests, concurrency=args.concurrency, cache=False
            )
            rows.append(("3 replicas, rolling restart of all 3", report))
        finally:
            stack.down()
    cpus = os.cpu_count()
    print(f"# {platform.processor() or platform.machine()}, {cpus} CPUs shared by every replica")
    print(
        f"# load: {args.requests}+ requests, {args.concurrency} concurrent, every 10th with 1000 "
        "documents, the others 20; cache off; generated models"
    )
    print("| replicas | requests | failed | requests/s | p50 ms | p99 ms |")
    print("|---|---:|---:|---:|---:|---:|")
    base = rows[0][1].rps
    for name, report in rows:
        print(
            f"| {name} | {len(report.statuses)} | {len(report.failures)} | "
            f"{report.rps:.1f} ({report.rps / base:.2f}x) | {report.percentile(50) * 1000:.0f} | "
            f"{report.percentile(99) * 1000:.0f} |"
        )
    for name, report in rows:
        for failure in report.failures[:5]:
            print(f"failed ({name}): {failure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
