"""The whole benchmark, one command: `make bench` (or `python bench/run_all.py --quick`).

Builds the full-size generated models once (`--models`, default /tmp/bench-models), then for each
workload (20 short, 100 mixed, 1,000 long passages) serves it with the naive baseline
(bench/naive_server.py) and with this server (the same cascade: stage 2 on the CPU, no cache),
one server at a time on 127.0.0.1, and drives each with bench/load.py at concurrency 1, 4, 16, 64.
Prints markdown tables with every figure as a ratio to the naive server, then the stage-1
micro-benchmark. Bounded: each level stops starting requests after `--level-seconds`.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.load import LoadResult, run_load, tree_rss
from bench.stage1_micro import report as micro_report
from bench.workloads import QUERY, body, short_documents
from reranker_server.model_generator import STAGE1_NAME, write_test_models

ROOT = Path(__file__).resolve().parent.parent
MiB = 2**20


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve(
    kind: str, models: Path, extra_env: dict[str, str], root: Path = ROOT
) -> Iterator[tuple[str, int]]:
    """Start a server in its own process (this project's code from `root`); yields (url, pid)
    once /health answers."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(root), "TOKENIZERS_PARALLELISM": "false", **extra_env}
    if kind == "naive":
        env["RERANKER_BENCH_MODELS"] = str(models)
        cmd = [
            sys.executable,
            "-m",
            "uvicorn",
            "bench.naive_server:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ]
    else:
        env.update(
            {
                "RERANKER_STAGE1_MODEL": str(models / "flashrank" / STAGE1_NAME),
                "RERANKER_STAGE2_MODEL": str(models / "cross-encoder"),
                "RERANKER_OFFLINE": "true",
                "RERANKER_DEVICE": "cpu",
                "RERANKER_LOG_LEVEL": "warning",
                "RERANKER_CACHE_ENABLED": "false",
                "RERANKER_REQUEST_TIMEOUT_S": "600",
            }
        )
        env.update(extra_env)  # the caller's settings win (bench/plan_e2e.py: device, plan)
        cmd = [
            sys.executable,
            "-m",
            "reranker_server",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
    proc = subprocess.Popen(cmd, env=env, cwd=root, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{kind} server did not start")
            time.sleep(0.3)
        yield url, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def measure(
    kind: str,
    models: Path,
    env: dict[str, str],
    workload: str,
    levels: list[int],
    args: argparse.Namespace,
) -> dict[int, tuple[LoadResult, int]]:
    results: dict[int, tuple[LoadResult, int]] = {}
    with serve(kind, models, env) as (url, pid):
        for c in levels:
            idle = tree_rss(pid)
            count = max(args.min_requests, 2 * c) if "long" not in workload else 1
            result = run_load(
                url,
                lambda n: body(workload, n),
                concurrency=c,
                requests=count,
                time_limit_s=args.level_seconds,
                server_pid=pid,
            )
            results[c] = (result, idle)
            print(
                f"  {kind:6s} {workload:9s} c={c:<3d} {result.ok} ok {result.errors} err "
                f"{result.rps:.2f} req/s p50 {result.percentile(50):.2f}s "
                f"peak RSS {result.peak_rss / MiB:,.0f} MiB",
                file=sys.stderr,
                flush=True,
            )
    return results


def table(
    workload: str, naive: dict[int, tuple[LoadResult, int]], ours: dict[int, tuple[LoadResult, int]]
) -> list[str]:
    lines = [
        f"\n**{workload} passages**, top_k 10, stage 2 on the CPU in both\n",
        "| concurrency | server | req/s | p50 s | p95 s | p99 s | peak RSS MiB | CPU s/req "
        "| ok/err |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in sorted(set(naive) | set(ours)):
        rows = [("naive", naive.get(c)), ("this", ours.get(c))]
        for name, item in rows:
            if item is None:
                lines.append(f"| {c} | {name} | not run | | | | | | |")
                continue
            r, _ = item
            lines.append(
                f"| {c} | {name} | {r.rps:.2f} | {r.percentile(50):.2f} | "
                f"{r.percentile(95):.2f} | {r.percentile(99):.2f} | "
                f"{r.peak_rss / MiB:,.0f} | {r.cpu_per_request:.2f} | {r.ok}/{r.errors} |"
            )
        if c in naive and c in ours:
            n, o = naive[c][0], ours[c][0]
            lines.append(
                f"| {c} | **ratio** | **{ratio(o.rps, n.rps)}** | "
                f"**{ratio(n.percentile(50), o.percentile(50))}** | "
                f"{ratio(n.percentile(95), o.percentile(95))} | "
                f"{ratio(n.percentile(99), o.percentile(99))} | "
                f"{o.peak_rss / n.peak_rss:.2f} | "
                f"**{ratio(n.cpu_per_request, o.cpu_per_request)}** | |"
            )
    return lines


def ratio(a: float, b: float) -> str:
    """`a / b` as "2.3x"; "n/a" where a side has no answer (0 or NaN)."""
    if not (a > 0 and b > 0):  # also False for NaN
        return "n/a"
    return f"{a / b:.1f}x"


def long_table(args: argparse.Namespace, env: dict[str, str]) -> list[str]:
    """One request of 250 and one of 1,000 passages x 512 tokens: time, linearity, RSS growth."""
    lines = [
        "\n**1000 long passages** (600 words each: every pair truncated to 512 tokens), one "
        "request, concurrency 1, this server only\n",
        "| passages | seconds | ms per passage | peak RSS growth over idle MiB |",
        "|---:|---:|---:|---:|",
    ]
    per_pair = {}
    for count in (250, 1000):
        result, idle = measure("this", args.models, env, f"{count} long", [1], args)[1]
        seconds = result.latencies[0] if result.latencies else float("nan")
        per_pair[count] = seconds / count
        lines.append(
            f"| {count} | {seconds:.1f} | {per_pair[count] * 1000:.0f} | "
            f"{(result.peak_rss - idle) / MiB:,.0f} |"
        )
    lines.append(
        f"\nTime per passage at 1,000 / at 250: {per_pair[1000] / per_pair[250]:.2f} "
        "(1.00 = linear). Naive not run: FlashRank pads all 1,000 pairs into one ONNX "
        "batch (~12 GB of attention scores per layer)."
    )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", type=Path, default=Path("/tmp/bench-models"))
    parser.add_argument(
        "--tokenizer", type=Path, default=Path("/work/shared/models/bert-base-uncased-tokenizer")
    )
    parser.add_argument("--levels", default="1,4,16,64")
    parser.add_argument(
        "--naive-max-concurrency",
        type=int,
        default=16,
        help="higher levels are not run on the naive server (its memory grows "
        "with every concurrent ONNX batch)",
    )
    parser.add_argument("--level-seconds", type=float, default=40)
    parser.add_argument(
        "--mixed-levels",
        default="1,4",
        help="levels for 100 mixed: the naive server pads 100 mixed passages to 512 tokens in "
        "one batch, ~6 GB each; 16 at once exhausted 23 GB and were killed",
    )
    parser.add_argument("--min-requests", type=int, default=6)
    parser.add_argument("--workloads", default="20 short,100 mixed,1000 long")
    parser.add_argument("--quick", action="store_true", help="levels 1,16; 20 s per level")
    parser.add_argument("--no-micro", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.levels, args.level_seconds, args.min_requests = "1,16", 20, 4
        args.mixed_levels = "1"
    levels = [int(c) for c in args.levels.split(",")]
    if not (args.models / "flashrank" / STAGE1_NAME).exists():
        tokenizer = args.tokenizer if args.tokenizer.exists() else None
        write_test_models(args.models, full_size=True, tokenizer_dir=tokenizer)
    started = time.perf_counter()
    ours_env = {"RERANKER_STAGE2_ON_CPU": "true"}
    out = [
        f"Date {date.today()}, CPU {cpu_name()} "
        f"({os.cpu_count()} cores), models: full-size generated (MiniLM-L12 int8 ONNX stage 1, "
        "MiniLM-L6 stage 2, both on the CPU)"
    ]
    for workload in args.workloads.split(","):
        workload = workload.strip()
        if workload == "1000 long":
            out += long_table(args, ours_env)
            continue
        wanted = (
            levels if workload == "20 short" else [int(c) for c in args.mixed_levels.split(",")]
        )
        naive_levels = [c for c in wanted if c <= args.naive_max_concurrency]
        naive = measure("naive", args.models, {}, workload, naive_levels, args)
        ours = measure("this", args.models, ours_env, workload, wanted, args)
        out += table(workload, naive, ours)
    if not args.no_micro:
        out += [
            "\n**Stage-1 micro-benchmark**\n",
            micro_report(args.models, short_documents(0), QUERY),
        ]
    out.append(f"\nTotal benchmark time {time.perf_counter() - started:.0f} s")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
