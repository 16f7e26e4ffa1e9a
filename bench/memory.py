"""Memory of the largest allowed request: the server's RSS idle, at peak and afterwards.

    python bench/memory.py [--models DIR] [--tokenizer DIR] [--workloads prose,mixed,punct]
                           [--docs 1000] [--chars 16000] [--settle 10] [--source DIR]

For each workload a fresh `reranker-server serve` starts on a free loopback port (models: DIR from
`make-test-models`, else tiny ones are generated, with `--tokenizer`'s vocabulary when given), gets
a small warm-up request, then ONE request of `--docs` documents of `--chars` characters (default
truncate mode: the model reads at most 512 tokens per pair). The server's RSS is sampled every
20 ms in a thread: idle (before), peak (during), and 1 s / `--settle` s after the answer.

Workloads differ in token density, which decides how much a whole-document tokenization costs:
prose (~2,300 tokens per 16,000 characters with BERT's vocabulary), mixed (~3,200: prose with
random letter groups), punct (one token per character: 16,000).

`--source DIR` runs the server from another checkout (its directory and PYTHONPATH), to compare
before / after:

    git archive <rev> | tar -x -C /tmp/base && python bench/memory.py --source /tmp/base

Bounded: one request per workload, each server stopped after it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import string
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

MIB = 2**20
ROOT = Path(__file__).resolve().parent.parent
WORDS = (
    "paris capital france river city history population europe tower famous built century "
    "government language people world water food health research science music art"
).split()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _fill(rng: random.Random, word: object, chars: int) -> str:
    out: list[str] = []
    size = 0
    while size < chars:
        text = word()  # type: ignore[operator]
        out.append(text)
        size += len(text) + 1
    return " ".join(out)[:chars]


def document(workload: str, rng: random.Random, chars: int) -> str:
    if workload == "prose":
        return _fill(rng, lambda: rng.choice(WORDS), chars)
    if workload == "mixed":
        letters = string.ascii_lowercase
        return _fill(
            rng,
            lambda: (
                rng.choice(WORDS)
                if rng.random() > 0.17
                else "".join(rng.choice(letters) for _ in range(5))
            ),
            chars,
        )
    if workload == "punct":
        return "".join(rng.choice(".,;:!?-") for _ in range(chars))
    raise SystemExit(f"unknown workload {workload!r}: prose, mixed or punct")


def tokens_per_document(stage1: Path, text: str) -> int:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(stage1 / "tokenizer.json"))
    return len(tokenizer.encode(text, add_special_tokens=False).ids)


class RssSampler:
    """The process's RSS every `interval` seconds, in a thread."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.process = psutil.Process(pid)
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic(), self.process.memory_info().rss))
            except psutil.Error:
                return
            time.sleep(self.interval)

    def peak(self, since: float, until: float) -> int:
        return max((rss for t, rss in self.samples if since <= t <= until), default=0)

    def now(self) -> int:
        return int(self.process.memory_info().rss)


def start_server(env: dict[str, str], port: int, source: Path) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [sys.executable, "-m", "reranker_server", "serve", "--host=127.0.0.1", f"--port={port}"],
        cwd=source,  # `-m` imports from the working directory first
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited: {process.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit("server did not come up in 180 s")


def measure(
    workload: str, args: argparse.Namespace, stage1: Path, env: dict[str, str]
) -> dict[str, object]:
    rng = random.Random(7)
    documents = [document(workload, rng, args.chars) for _ in range(args.docs)]
    body = json.dumps(
        {"query": "what is the capital of france", "documents": documents, "top_k": 10}
    ).encode()
    tokens = tokens_per_document(stage1, documents[0])
    del documents
    port = free_port()
    process = start_server(env, port, args.source or ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        with RssSampler(process.pid) as rss, httpx.Client(base_url=url, timeout=900) as client:
            warm = {"query": "capital", "documents": ["paris", "berlin"], "top_k": 1}
            client.post("/rerank", json=warm).raise_for_status()
            time.sleep(2)
            idle = rss.now()
            started = time.monotonic()
            response = client.post(
                "/rerank", content=body, headers={"Content-Type": "application/json"}
            )
            answered = time.monotonic()
            if response.status_code != 200:
                raise SystemExit(f"{workload}: HTTP {response.status_code} {response.text[:300]}")
            time.sleep(1)
            after_1s = rss.now()
            time.sleep(max(0.0, args.settle - 1))
            after = rss.now()
            peak = rss.peak(started, answered)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
    return {
        "workload": workload,
        "tokens": tokens,
        "seconds": answered - started,
        "idle": idle / MIB,
        "peak": peak / MIB,
        "after_1s": after_1s / MIB,
        "after": after / MIB,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=Path, help="directory from make-test-models")
    parser.add_argument("--tokenizer", type=Path, help="BERT tokenizer for generated models")
    parser.add_argument("--workloads", default="prose,mixed,punct")
    parser.add_argument("--docs", type=int, default=1000)
    parser.add_argument("--chars", type=int, default=16_000)
    parser.add_argument("--settle", type=float, default=10.0, help="seconds to watch afterwards")
    parser.add_argument("--source", type=Path, help="run the server from this checkout")
    parser.add_argument("--label", default="", help="printed in the table's title")
    parser.add_argument(
        "--request-timeout", type=float, default=900, help="the server's request_timeout_s"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        models = args.models
        if models is None:
            sys.path.insert(0, str(ROOT))
            from reranker_server.model_generator import write_test_models

            print("generating tiny test models ...", file=sys.stderr)
            write_test_models(Path(scratch) / "models", tokenizer_dir=args.tokenizer)
            models = Path(scratch) / "models"
        stage1 = next((models / "flashrank").iterdir())
        env = {k: v for k, v in os.environ.items() if not k.startswith("RERANKER_")}
        env.update(
            RERANKER_STAGE1_MODEL=str(stage1),
            RERANKER_STAGE2_MODEL=str(models / "cross-encoder"),
            RERANKER_MODEL_CACHE_DIR=str(Path(scratch) / "cache"),
            RERANKER_OFFLINE="true",
            RERANKER_DEVICE="cpu",
            RERANKER_LOG_LEVEL="warning",
            RERANKER_REQUEST_TIMEOUT_S=str(args.request_timeout),
            HF_HUB_OFFLINE="1",
        )
        if args.source is not None:
            env["PYTHONPATH"] = str(args.source.resolve())
        rows = [measure(w, args, stage1, env) for w in args.workloads.split(",")]

    title = f" ({args.label})" if args.label else ""
    print(f"\nOne request of {args.docs} x {args.chars:,} characters, truncate mode{title}\n")
    print(
        "| workload | tokens/doc | request s | idle MiB | peak MiB | peak - idle | "
        f"after 1 s | after {args.settle:g} s | after - idle |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['workload']} | {r['tokens']:,} | {r['seconds']:.1f} | {r['idle']:.0f} | "
            f"{r['peak']:.0f} | {r['peak'] - r['idle']:.0f} | {r['after_1s']:.0f} | "  # type: ignore[operator]
            f"{r['after']:.0f} | {r['after'] - r['idle']:.0f} |"  # type: ignore[operator]
        )


if __name__ == "__main__":
    main()
