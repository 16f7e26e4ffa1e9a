"""End-to-end latency with RERANKER_STAGE1=always against auto: `python bench/plan_e2e.py`.

    python bench/plan_e2e.py [--models DIR] [--device cuda] [--requests 20]
                             [--workloads "20 short,100 mixed"] [--concurrency 1]

Serves the full-size generated models (built here unless `--models` has them) with each plan in
turn, one `reranker-server serve` at a time on 127.0.0.1 (cache off, warm-up on: under `auto` it
measures both stages' per-token costs), sends each workload's requests (bench/workloads.py: each
its own documents, top_k 10) and prints p50/p95 per plan, the ratio auto / always in the same
run, and the plans `auto` ran (reranker_plans_total). On a host without a GPU auto runs the
cascade (as always): both rows should match within noise. bench/gpu_check.sh runs it on a GPU.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.load import run_load
from bench.run_all import serve
from bench.workloads import body
from reranker_server.model_generator import STAGE1_NAME, write_test_models

DEFAULT_TOKENIZER = Path("/work/shared/models/bert-base-uncased-tokenizer")


def bodies(workload: str, offset: int = 0) -> Callable[[int], dict[str, Any]]:
    """Request n of `workload` (each its own documents: no cache could answer it)."""
    return lambda n: body(workload, offset + n)


def plans(url: str) -> dict[str, float]:
    """`reranker_plans_total` by plan."""
    scrape = httpx.get(f"{url}/metrics", timeout=30).text
    found = re.findall(r'^reranker_plans_total\{plan="(\w+)"\} ([0-9.e+]+)$', scrape, re.M)
    return {name: float(count) for name, count in found}


def ran(before: dict[str, float], after: dict[str, float]) -> str:
    """The plans run between two scrapes, as "gpu_only 20"."""
    counts = {name: after[name] - before.get(name, 0.0) for name in after}
    return ", ".join(f"{name} {n:.0f}" for name, n in sorted(counts.items()) if n) or "none"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", type=Path, default=Path("/tmp/bench-models"))
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--workloads", default="20 short,100 mixed")
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--level-seconds", type=float, default=90)
    args = parser.parse_args()

    if not (args.models / "flashrank" / STAGE1_NAME).exists():
        tokenizer = args.tokenizer if args.tokenizer.exists() else None
        write_test_models(args.models, full_size=True, tokenizer_dir=tokenizer)
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    rows: dict[tuple[str, str], tuple[float, float, str]] = {}
    for mode in ("always", "auto"):
        env = {"RERANKER_DEVICE": args.device, "RERANKER_STAGE1": mode}
        if args.device == "cpu":
            env["RERANKER_STAGE2_ON_CPU"] = "true"
        with serve("this", args.models, env) as (url, pid):
            for workload in workloads:
                run_load(  # warm-up, not counted
                    url,
                    bodies(workload, 10_000),
                    concurrency=1,
                    requests=2,
                    time_limit_s=120,
                    server_pid=pid,
                )
                before = plans(url)
                result = run_load(
                    url,
                    bodies(workload),
                    concurrency=args.concurrency,
                    requests=args.requests,
                    time_limit_s=args.level_seconds,
                    server_pid=pid,
                )
                if result.errors:
                    print(f"{mode} / {workload}: {result.errors} errors", file=sys.stderr)
                rows[mode, workload] = (
                    result.percentile(50),
                    result.percentile(95),
                    ran(before, plans(url)),
                )
    print(
        f"\nend to end, device {args.device}, concurrency {args.concurrency}, "
        f"{args.requests} requests per row, top_k 10, cache off\n"
    )
    print("| workload | plan setting | p50 (ms) | p95 (ms) | p50 / always | plans run |")
    print("|---|---|---:|---:|---:|---|")
    for workload in workloads:
        base = rows["always", workload][0]
        for mode in ("always", "auto"):
            p50, p95, which = rows[mode, workload]
            print(
                f"| {workload} | {mode} | {p50 * 1e3:.1f} | {p95 * 1e3:.1f} "
                f"| {p50 / base:.2f}x | {which} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
