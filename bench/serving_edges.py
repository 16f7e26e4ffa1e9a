"""Issue 22's serving edges on one checkout, for before/after figures in docs/reliability.md.

    python bench/serving_edges.py --checkout DIR --models DIR [--torch-free-python PY] [--json]

Runs the checkout's code (PYTHONPATH=DIR, commands started in DIR) in subprocesses on loopback
ports, with the models under `--models` (`reranker-server make-test-models`), and prints one
JSON object:

- **slow_readers**: `reranker-server serve` (RERANKER_WRITE_TIMEOUT_S=10, unknown to older
  checkouts); 4 clients each send 1,000 documents of 16,000 characters (a 16 MB answer: /rerank
  echoes the texts) and read nothing. RSS idle, at its peak, the clients' connections still
  open 30 s after they were answered, then the clients leave, and RSS 10 s later.
- **quick_start**: the README's first command as written in the checkout (host and port moved to
  loopback): how long a slowloris connection (half a header) and an idle one stay open (capped
  at 45 s), `Upgrade: h2c` POST's status, the share of log lines that are JSON; then SIGTERM with
  6 requests of 1,000 documents in flight: their outcomes, readiness right after the signal, the
  exit status.
- **drain_keep_alive**: `reranker-server serve`; a kept-alive client's request finishes during
  the drain (5 others keep it going): its answer's `Connection` header, and what the client's
  next request on it gets.
- **second_signal**: `reranker-server serve`; Ctrl-C, then (once draining) Ctrl-C again, with 6
  requests in flight: their outcomes, the exit status, tracebacks in the log.
- **small**: `/favicon.ico`'s status, `process_cpu_seconds_total` on /metrics, and (with
  `--torch-free-python`, a Python without torch) how often "torch is not installed" is logged.

Bounded: every wait has a timeout; every server is killed at the end.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.disconnects import free_port, metric


@dataclass
class Running:
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def rss_mib(self) -> float:
        return psutil.Process(self.process.pid).memory_info().rss / 2**20

    def log_lines(self) -> list[str]:
        return [x for x in self.log.read_text(errors="replace").splitlines() if x.strip()]


def quick_start_argv(checkout: Path, python: str) -> list[str]:
    """The README's first command (after the install), host and port moved to loopback (the
    port as "{port}"; RERANKER_HOST and RERANKER_PORT say the same to `reranker-server serve`)."""
    readme = (checkout / "README.md").read_text()
    section = readme[readme.index("## Quick start") :]
    line = next(x for x in section.splitlines() if x.startswith("    "))
    command = line.strip().split(" && ")[-1]
    argv = shlex.split(command.replace("0.0.0.0", "127.0.0.1").replace("5200", "{port}"))
    modules = {"reranker-server": "reranker_server", "uvicorn": "uvicorn"}
    return [python, "-m", modules[argv[0]], *argv[1:]]


@contextmanager
def server(
    checkout: Path, models: Path, work: Path, argv: list[str] | None = None, **settings: object
) -> Iterator[Running]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RERANKER_")}
    env.update(
        PYTHONPATH=str(checkout),
        RERANKER_HOST="127.0.0.1",
        RERANKER_PORT=str(port),
        RERANKER_STAGE1_MODEL=str(models / "flashrank" / "ms-marco-MiniLM-L-12-v2"),
        RERANKER_STAGE2_MODEL=str(models / "cross-encoder"),
        RERANKER_MODEL_CACHE_DIR=str(work / "cache"),
        RERANKER_OFFLINE="true",
        RERANKER_CPU_THREADS="1",
        RERANKER_CACHE_ENABLED="false",
        HF_HUB_OFFLINE="1",
    )
    env.update({f"RERANKER_{k.upper()}": str(v) for k, v in settings.items()})
    log = work / f"server-{port}.log"
    command = argv or [sys.executable, "-m", "reranker_server", "serve"]
    command = [str(port) if part == "{port}" else part for part in command]
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=checkout, env=env, stdout=out, stderr=out)
    running = Running(process, f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited at startup:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(running.url + "/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("server did not start in 180 s")
            time.sleep(0.2)
        yield running
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def passages(count: int, chars: int, tag: str) -> list[str]:
    words = "paris capital france river seine city history tower museum europe".split()
    text = " ".join(words[i % len(words)] for i in range(chars // 6 + 1))
    return [f"{tag} {i} {text}"[:chars] for i in range(count)]


def post_raw(port: int, body: bytes, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", port))
    head = (
        "POST /rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    sock.sendall(head + body)
    return sock


def wait(condition: Any, seconds: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return False


def scrape(running: Running) -> str:
    return httpx.get(running.url + "/metrics", timeout=30).text


def open_connections(running: Running, ports: set[int]) -> int:
    connections = psutil.Process(running.process.pid).net_connections(kind="tcp")
    return sum(
        1
        for c in connections
        if c.status == psutil.CONN_ESTABLISHED and c.raddr and c.raddr.port in ports
    )


# --- scenarios


def slow_readers(checkout: Path, models: Path, work: Path) -> dict[str, Any]:
    # answers past the default answer-size limit (issue 22's admission) are what this is about
    with server(checkout, models, work, write_timeout_s=10, max_answer_bytes=64 << 20) as running:
        small = {"query": "q", "documents": passages(10, 200, "w"), "top_k": 10}
        httpx.post(running.url + "/rerank", json=small, timeout=60)
        time.sleep(2)
        idle = running.rss_mib()
        body = json.dumps(
            {"query": "capital of france", "documents": passages(1000, 16000, "d"), "top_k": 1000}
        ).encode()
        clients = [post_raw(running.port, body, rcvbuf=4096) for _ in range(4)]
        ports = {c.getsockname()[1] for c in clients}
        peak = idle
        answered_at = None
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            peak = max(peak, running.rss_mib())
            text = scrape(running)
            if metric(text, "reranker_requests_total", route="/rerank", status="200") >= 5:
                answered_at = time.monotonic()
                break
            time.sleep(0.2)
        assert answered_at is not None, "the 4 requests were never answered"
        while time.monotonic() < answered_at + 30:
            peak = max(peak, running.rss_mib())
            time.sleep(0.2)
        still_open = open_connections(running, ports)
        for client in clients:
            client.close()
        time.sleep(10)
        after = running.rss_mib()
        cut = metric(scrape(running), "reranker_connections_closed_total", reason="write_timeout")
    return {
        "rss_idle_mib": round(idle),
        "rss_peak_mib": round(peak),
        "connections_open_30s_after_answer": still_open,
        "rss_10s_after_clients_gone_mib": round(after),
        "above_idle_mib": round(after - idle),
        "write_timeout_cuts": cut,
    }


def in_flight(running: Running) -> float:
    return metric(scrape(running), "reranker_in_flight_requests")


def send_work(running: Running, count: int, documents: int) -> tuple[list[Any], list[Any]]:
    outcomes: list[Any] = []

    def send(i: int) -> None:
        body = {"query": f"q {i}", "documents": passages(documents, 300, f"p{i}"), "top_k": 3}
        try:
            response = httpx.post(running.url + "/rerank", json=body, timeout=300)
            try:
                kind = response.json().get("error_type", "ok")
            except ValueError:
                kind = "not JSON"
            outcomes.append(f"{response.status_code} {kind}")
        except httpx.HTTPError as exc:
            outcomes.append(type(exc).__name__)

    threads = [threading.Thread(target=send, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    wait(lambda: in_flight(running) >= 1, 60, 0.01)
    return outcomes, threads


def tally(outcomes: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for outcome in outcomes:
        counts[outcome] = counts.get(outcome, 0) + 1
    return counts


def ready_status(running: Running) -> str:
    try:
        return str(httpx.get(running.url + "/health/ready", timeout=10).status_code)
    except httpx.HTTPError as exc:
        return type(exc).__name__


def held_open_s(port: int, first_bytes: bytes, cap_s: float = 45) -> float:
    sock = socket.create_connection(("127.0.0.1", port), timeout=cap_s)
    started = time.monotonic()
    if first_bytes:
        sock.sendall(first_bytes)
    try:
        while sock.recv(65536):
            pass
    except (TimeoutError, ConnectionResetError):
        pass
    finally:
        sock.close()
    return round(min(time.monotonic() - started, cap_s), 1)


def quick_start(checkout: Path, models: Path, work: Path, python: str) -> dict[str, Any]:
    argv = quick_start_argv(checkout, python)
    with server(checkout, models, work, argv=argv) as running:
        results: dict[str, float] = {}
        probes = [
            threading.Thread(
                target=lambda: results.__setitem__(
                    "slowloris_open_s", held_open_s(running.port, b"POST /rerank HTTP/1.1\r\n")
                )
            ),
            threading.Thread(
                target=lambda: results.__setitem__("idle_open_s", held_open_s(running.port, b""))
            ),
        ]
        for probe in probes:
            probe.start()
        upgrade = {"Connection": "Upgrade, HTTP2-Settings", "Upgrade": "h2c", "HTTP2-Settings": ""}
        h2c = httpx.post(
            running.url + "/rerank",
            json={"query": "q", "documents": ["a", "b"], "top_k": 1},
            headers=upgrade,
            timeout=60,
        ).status_code
        for probe in probes:
            probe.join(60)
        outcomes, threads = send_work(running, 6, 1000)
        started = time.monotonic()
        running.process.send_signal(signal.SIGTERM)
        ready = ready_status(running)
        for thread in threads:
            thread.join(300)
        code = running.process.wait(timeout=300)
        exit_s = time.monotonic() - started
        lines = running.log_lines()
    json_lines = 0
    for line in lines:
        try:
            json.loads(line)
            json_lines += 1
        except ValueError:
            pass
    return {
        "command": " ".join(argv[1:]),
        **results,
        "h2c_status": h2c,
        "json_log_lines": f"{json_lines}/{len(lines)}",
        "sigterm_answers": tally(outcomes),
        "ready_after_sigterm": ready,
        "exit_status": code,
        "exit_s": round(exit_s, 1),
    }


def drain_keep_alive(checkout: Path, models: Path, work: Path) -> dict[str, Any]:
    with server(checkout, models, work) as running:
        outcomes, threads = send_work(running, 5, 1000)
        connection = http.client.HTTPConnection("127.0.0.1", running.port, timeout=300)
        body = json.dumps({"query": "q", "documents": passages(200, 300, "k"), "top_k": 1})
        headers = {"Content-Type": "application/json"}
        connection.request("POST", "/rerank", body=body, headers=headers)
        time.sleep(0.05)
        running.process.send_signal(signal.SIGTERM)
        first = connection.getresponse()
        first.read()
        result: dict[str, Any] = {
            "in_flight_answer": first.status,
            "its_connection_header": first.getheader("Connection"),
        }
        try:
            connection.request("POST", "/rerank", body=body, headers=headers)
            second = connection.getresponse()
            text = second.read()
            try:
                kind = json.loads(text).get("error_type", "ok")
            except ValueError:
                kind = "not JSON"
            result["next_request_on_it"] = f"{second.status} {kind}"
        except (OSError, http.client.HTTPException) as exc:
            result["next_request_on_it"] = type(exc).__name__
        for thread in threads:
            thread.join(300)
        running.process.wait(timeout=300)
    result["others"] = tally(outcomes)
    return result


def second_signal(checkout: Path, models: Path, work: Path) -> dict[str, Any]:
    with server(checkout, models, work) as running:
        outcomes, threads = send_work(running, 6, 1000)
        running.process.send_signal(signal.SIGINT)
        wait(lambda: ready_status(running) != "200", 30)
        running.process.send_signal(signal.SIGINT)
        for thread in threads:
            thread.join(300)
        code = running.process.wait(timeout=300)
        log = running.log.read_text(errors="replace")
    return {
        "answers": tally(outcomes),
        "exit_status": code,
        "tracebacks": log.count("Traceback"),
        "abort": "terminate called" in log,
    }


def small(checkout: Path, models: Path, work: Path, torch_free: str | None) -> dict[str, Any]:
    with server(checkout, models, work) as running:
        favicon = httpx.get(running.url + "/favicon.ico", timeout=30).status_code
        cpu = "process_cpu_seconds_total" in scrape(running)
    result: dict[str, Any] = {"favicon_status": favicon, "process_cpu_metric": cpu}
    if torch_free:
        argv = [torch_free, "-m", "reranker_server", "serve"]
        with server(checkout, models, work, argv=argv, device="auto") as running:
            pass
        result["torch_missing_lines"] = running.log.read_text().count("torch is not installed")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkout", type=Path, required=True)
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--torch-free-python", default=None)
    parser.add_argument("--only", default="slow_readers,quick_start,drain,second,small")
    args = parser.parse_args()
    checkout, models = args.checkout.resolve(), args.models.resolve()
    only = set(args.only.split(","))
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "slow_readers" in only:
            report["slow_readers"] = slow_readers(checkout, models, work)
        if "quick_start" in only:
            report["quick_start"] = quick_start(checkout, models, work, sys.executable)
        if "drain" in only:
            report["drain_keep_alive"] = drain_keep_alive(checkout, models, work)
        if "second" in only:
            report["second_signal"] = second_signal(checkout, models, work)
        if "small" in only:
            report["small"] = small(checkout, models, work, args.torch_free_python)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
