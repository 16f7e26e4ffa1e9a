"""The CPU host's cascade: FlashRank, then an int8 stage 2 made by `reranker-server quantize`,
against stage 1 alone; and the opt-in fused stage-1 variant against FlashRank's own file.

    reranker-server make-test-models /tmp/cpu-models --full-size \
        --tokenizer /work/shared/models/bert-base-uncased-tokenizer
    reranker-server quantize /tmp/cpu-models/cross-encoder /tmp/cpu-models-l6-int8
    reranker-server quantize /tmp/cpu-models/stage1-cross-encoder /tmp/cpu-models-l12-int8 --fuse
    python bench/cpu_cascade.py --models /tmp/cpu-models --stage2 /tmp/cpu-models-l6-int8 \
        --stage1-variants /tmp/cpu-models-l12-int8

Part 1 (`cascade`): one server per configuration, all up at once on 127.0.0.1, driven in turn
(`--rounds` rounds, each configuration once per round, the order rotating) with 20 short passages
at concurrency `--concurrency` (bench/load.py). Prints req/s and server CPU s/request per
configuration and round, and each cascade's ratio to stage 1 alone within the round (the median
over rounds is the figure; a shared machine's neighbours move absolute numbers between rounds).

Part 2 (`stage1`): FlashRank's file against the fused int8 file of the same weights, in this
process as the server's CPU lane runs stage 1 (each pair alone, one run per core, one thread
each), interleaved `--rounds` times; thread CPU time per pair and wall time, plus the score drift
(largest |score - FlashRank's score|) and top-10 agreement on the parity set.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tokenizers import Encoding

from bench.load import LoadResult, run_load
from bench.run_all import serve
from bench.workloads import QUERY, body, short_documents
from reranker_server.model_generator import STAGE1_FILE, STAGE1_NAME
from reranker_server.quantize import compare, parity_set
from reranker_server.runners.flashrank import FlashRankRunner

WORKLOAD = "20 short"


def cascade_configs(stage2: Path, candidates: Sequence[int]) -> dict[str, dict[str, str]]:
    """Configuration name -> the server's environment (on top of bench/run_all.serve's)."""
    configs = {"stage 1 alone": {"RERANKER_STAGE2_ON_CPU": "false"}}
    for n in candidates:
        configs[f"+ int8 L-6 stage 2, top {n}"] = {
            "RERANKER_STAGE2_MODEL": str(stage2),
            "RERANKER_STAGE2_KIND": "onnx-cross-encoder",
            "RERANKER_STAGE2_ON_CPU": "true",
            "RERANKER_CANDIDATES": str(n),
        }
    return configs


def cascade_part(args: argparse.Namespace) -> list[str]:
    configs = cascade_configs(args.stage2, [int(n) for n in args.candidates.split(",")])
    names = list(configs)
    rounds: list[dict[str, LoadResult]] = []
    with ExitStack() as stack:
        servers = {
            name: stack.enter_context(serve("this", args.models, configs[name])) for name in names
        }
        for url, _ in servers.values():  # warm-up: first-call allocations, thread start
            run_load(
                url,
                lambda n: body(WORKLOAD, n, args.top_k),
                concurrency=2,
                requests=4,
                time_limit_s=60,
                server_pid=servers[names[0]][1],
            )
        for r in range(args.rounds):
            results: dict[str, LoadResult] = {}
            for name in names[r % len(names) :] + names[: r % len(names)]:
                url, pid = servers[name]
                results[name] = run_load(
                    url,
                    lambda n: body(WORKLOAD, n, args.top_k),
                    concurrency=args.concurrency,
                    requests=args.requests,
                    time_limit_s=args.level_seconds,
                    server_pid=pid,
                )
                res = results[name]
                print(
                    f"  round {r + 1} {name}: {res.ok} ok {res.errors} err {res.rps:.2f} req/s "
                    f"{res.cpu_per_request:.2f} CPU s/req",
                    file=sys.stderr,
                    flush=True,
                )
            rounds.append(results)
    base = names[0]
    lines = [
        f"\n**{WORKLOAD} passages, top_k {args.top_k}, concurrency {args.concurrency}**, "
        f"{args.rounds} rounds "
        f"(each configuration {args.requests} requests per round, order rotating)\n",
        "| configuration | req/s per round | CPU s/req per round | throughput vs stage 1 alone "
        "(median of rounds) | CPU cost vs stage 1 alone (median) |",
        "|---|---|---|---:|---:|",
    ]
    for name in names:
        rps = [r[name].rps for r in rounds]
        cpu = [r[name].cpu_per_request for r in rounds]
        ratio = statistics.median(r[name].rps / r[base].rps for r in rounds)
        cost = statistics.median(r[name].cpu_per_request / r[base].cpu_per_request for r in rounds)
        lines.append(
            f"| {name} | {' / '.join(f'{x:.2f}' for x in rps)} | "
            f"{' / '.join(f'{x:.2f}' for x in cpu)} | {ratio:.0%} | {cost:.2f}x |"
        )
    errors = sum(r[n].errors for r in rounds for n in names)
    lines.append(f"\nErrors: {errors}.")
    return lines


def _lane_seconds(
    runner: FlashRankRunner, encodings: Sequence[Encoding], pool: ThreadPoolExecutor
) -> tuple[float, float]:
    """(wall s, summed thread CPU s) to score `encodings`, each pair alone, on the pool."""

    def one(encoding: Encoding) -> float:
        started = time.thread_time()
        runner.run([encoding])
        return time.thread_time() - started

    started = time.perf_counter()
    cpu = sum(pool.map(one, encodings))
    return time.perf_counter() - started, cpu


def stage1_part(args: argparse.Namespace) -> list[str]:
    flashrank_dir = args.models / "flashrank" / STAGE1_NAME
    variants = args.stage1_variants
    fused = next((variants / "onnx").glob("*_fused.onnx"))
    runners: dict[str, FlashRankRunner] = {
        f"FlashRank's file ({STAGE1_FILE}, the default)": FlashRankRunner(
            flashrank_dir, flashrank_dir / STAGE1_FILE, threads=1
        ),
        f"fused int8 ({fused.name})": FlashRankRunner(variants, fused, threads=1),
    }
    names = list(runners)
    docs = short_documents(0)
    encodings = {n: r.prepare([(QUERY, d) for d in docs]) for n, r in runners.items()}
    cores = os.cpu_count() or 1
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    with ThreadPoolExecutor(cores) as pool:
        for name in names:
            _lane_seconds(runners[name], encodings[name], pool)  # warm-up
        for r in range(args.rounds * 3):
            for name in names[r % 2 :] + names[: r % 2]:
                w, c = _lane_seconds(runners[name], encodings[name], pool)
                wall[name].append(w)
                cpu[name].append(c)
    data = parity_set(args.parity_queries)
    scores = {n: [runners[n].score(q, p) for q, p in data] for n in names}
    base = names[0]
    lines = [
        f"\n**Stage 1 on {len(docs)} short passages**, each pair alone, {cores} runs x 1 thread, "
        f"{args.rounds * 3} interleaved repeats\n",
        "| stage-1 file | ms / request (median wall) | CPU ms / pair (median) | throughput vs "
        "FlashRank's file (CPU) | (wall) | max score drift vs FlashRank's file | same top-10 order "
        "| top-10 in common |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        parity = compare(name, scores[base], scores[name])
        lines.append(
            f"| {name} | {statistics.median(wall[name]) * 1000:.0f} | "
            f"{statistics.median(cpu[name]) / len(docs) * 1000:.1f} | "
            f"{statistics.median(cpu[base]) / statistics.median(cpu[name]):.2f}x | "
            f"{statistics.median(wall[base]) / statistics.median(wall[name]):.2f}x | "
            f"{parity.max_abs_diff:.1e} | {parity.same_top10_order}/{parity.queries} | "
            f"{parity.top10_overlap:.0%} |"
        )
    gaps = [g for s in scores[base] for g in _gaps(s)]
    lines.append(
        f"\nParity set: {len(data)} generated queries x {len(data[0][1])} passages "
        f"(reranker_server/quantize.py); smallest gap between neighbouring top-11 FlashRank "
        f"scores {min(gaps):.1e}."
    )
    return lines


def _gaps(scores: Sequence[float]) -> list[float]:
    ordered = sorted(scores, reverse=True)[:11]
    return [ordered[i] - ordered[i + 1] for i in range(len(ordered) - 1)]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", type=Path, required=True, help="make-test-models --full-size")
    parser.add_argument("--stage2", type=Path, help="quantize's output for the L-6 cross-encoder")
    parser.add_argument("--stage1-variants", type=Path, help="quantize --fuse's output for stage 1")
    parser.add_argument("--parts", default="cascade,stage1")
    parser.add_argument("--candidates", default="4,8")
    parser.add_argument(
        "--top-k",
        type=int,
        default=4,
        help="the requests' top_k (stage 2 scores max(candidates, top_k) documents). Default: 4",
    )
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--level-seconds", type=float, default=120)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--parity-queries", type=int, default=10)
    args = parser.parse_args()
    started = time.perf_counter()
    lines: list[str] = []
    parts = args.parts.split(",")
    if "cascade" in parts:
        lines += cascade_part(args)
    if "stage1" in parts:
        lines += stage1_part(args)
    print("\n".join(lines))
    print(
        f"\n(measured in {time.perf_counter() - started:.0f} s, load average "
        f"{os.getloadavg()[0]:.1f} at the end)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
