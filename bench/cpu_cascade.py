"""The CPU host's cascade: FlashRank, then an int8 stage 2 made by `reranker-server quantize`,
against stage 1 alone; and the fast ONNX graph (`onnx_graph = "fast"`) against the exact one.

    reranker-server make-test-models /tmp/cpu-models --full-size \
        --tokenizer /work/shared/models/bert-base-uncased-tokenizer
    reranker-server quantize /tmp/cpu-models/cross-encoder /tmp/cpu-models-l6-int8
    python bench/cpu_cascade.py --models /tmp/cpu-models --stage2 /tmp/cpu-models-l6-int8

Part 1 (`cascade`): one server per configuration (stage 1 alone and each cascade, with the exact
and the fast graph), all up at once on 127.0.0.1, driven in turn (`--rounds` rounds, each
configuration once per round, the order rotating) with 20 short passages at concurrency
`--concurrency` (bench/load.py). Prints req/s and server CPU s/request per configuration and
round, and each one's ratio to stage 1 alone (exact graph) within the round (the median over
rounds is the figure; a shared machine's neighbours move absolute numbers between rounds).

Part 2 (`graphs`): each ONNX file (FlashRank's stage 1; the quantized stage 2 with `--stage2`)
with the exact and the fast graph, in this process as the server's CPU lane runs it (each pair
alone, one run per core, one thread each), interleaved `--rounds` x 3 times; thread CPU time per
pair and wall time, plus the score drift (largest |fast - exact|) and top-10 agreement on the
parity set (reranker_server/quantize.py).
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
from reranker_server.runners.onnx_base import OnnxPairRunner
from reranker_server.runners.onnx_cross_encoder import OnnxCrossEncoderRunner

WORKLOAD = "20 short"


def cascade_configs(stage2: Path, candidates: Sequence[int]) -> dict[str, dict[str, str]]:
    """Configuration name -> the server's environment (on top of bench/run_all.serve's)."""
    fast = {"RERANKER_STAGE1_ONNX_GRAPH": "fast"}
    configs = {
        "stage 1 alone": {"RERANKER_STAGE2_ON_CPU": "false"},
        "stage 1 alone, fast graph": {"RERANKER_STAGE2_ON_CPU": "false", **fast},
    }
    for n in candidates:
        cascade = {
            "RERANKER_STAGE2_MODEL": str(stage2),
            "RERANKER_STAGE2_ON_CPU": "true",
            "RERANKER_CANDIDATES": str(n),
        }
        configs[f"+ int8 L-6 stage 2, top {n}"] = cascade
        configs[f"+ int8 L-6 stage 2 (fast graph), top {n}"] = {
            **cascade,
            "RERANKER_STAGE2_ONNX_GRAPH": "fast",
        }
        configs[f"fast graph, + int8 L-6 stage 2 (fast graph), top {n}"] = {
            **cascade,
            **fast,
            "RERANKER_STAGE2_ONNX_GRAPH": "fast",
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
    runner: OnnxPairRunner, items: Sequence[Encoding], pool: ThreadPoolExecutor
) -> tuple[float, float]:
    """(wall s, summed thread CPU s) to score `items`, each pair alone, on the pool."""

    def one(item: Encoding) -> float:
        started = time.thread_time()
        runner.run([item])
        return time.thread_time() - started

    started = time.perf_counter()
    cpu = sum(pool.map(one, items))
    return time.perf_counter() - started, cpu


def graph_runners(args: argparse.Namespace) -> dict[str, tuple[OnnxPairRunner, OnnxPairRunner]]:
    """File label -> (exact, fast) runners of it."""
    flashrank_dir = args.models / "flashrank" / STAGE1_NAME
    runners: dict[str, tuple[OnnxPairRunner, OnnxPairRunner]] = {
        f"stage 1: FlashRank's {STAGE1_FILE}": (
            FlashRankRunner(flashrank_dir, flashrank_dir / STAGE1_FILE),
            FlashRankRunner(flashrank_dir, flashrank_dir / STAGE1_FILE, graph="fast"),
        )
    }
    if args.stage2:
        exact = OnnxCrossEncoderRunner(args.stage2)
        runners[f"stage 2: {exact.onnx_file.name} (quantize)"] = (
            exact,
            OnnxCrossEncoderRunner(args.stage2, graph="fast"),
        )
    return runners


def graphs_part(args: argparse.Namespace) -> list[str]:
    docs = short_documents(0)
    cores = os.cpu_count() or 1
    data = parity_set(args.parity_queries)
    lines = [
        f"\n**The fast graph, {len(docs)} short passages**, each pair alone, {cores} runs x 1 "
        f"thread, {args.rounds * 3} interleaved repeats; drift on {len(data)} generated queries "
        f"x {len(data[0][1])} passages\n",
        "| ONNX file | graph | ms / request (median wall) | CPU ms / pair (median) | "
        "throughput vs exact (CPU) | (wall) | max score drift vs exact | same top-10 order | "
        "top-10 in common |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    with ThreadPoolExecutor(cores) as pool:
        for label, pair in graph_runners(args).items():
            items = [r.prepare([(QUERY, d) for d in docs]) for r in pair]
            wall: list[list[float]] = [[], []]
            cpu: list[list[float]] = [[], []]
            for k in (0, 1):
                _lane_seconds(pair[k], items[k], pool)  # warm-up
            for r in range(args.rounds * 3):
                for k in (r % 2, 1 - r % 2):
                    w, c = _lane_seconds(pair[k], items[k], pool)
                    wall[k].append(w)
                    cpu[k].append(c)
            scores = [[runner.score(q, p) for q, p in data] for runner in pair]
            for k, graph in enumerate(("exact", "fast")):
                parity = compare(graph, scores[0], scores[k])
                lines.append(
                    f"| {label} | {graph} | {statistics.median(wall[k]) * 1000:.0f} | "
                    f"{statistics.median(cpu[k]) / len(docs) * 1000:.1f} | "
                    f"{statistics.median(cpu[0]) / statistics.median(cpu[k]):.2f}x | "
                    f"{statistics.median(wall[0]) / statistics.median(wall[k]):.2f}x | "
                    f"{parity.max_abs_diff:.1e} | {parity.same_top10_order}/{parity.queries} | "
                    f"{parity.top10_overlap:.0%} |"
                )
            gaps = [g for s in scores[0] for g in _gaps(s)]
            lines.append(
                f"| ({label}: smallest gap between neighbouring top-11 exact scores "
                f"{min(gaps):.1e}) | | | | | | | | |"
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
    parser.add_argument("--parts", default="cascade,graphs")
    parser.add_argument("--candidates", default="4")
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
    if "graphs" in parts:
        lines += graphs_part(args)
    print("\n".join(lines))
    print(
        f"\n(measured in {time.perf_counter() - started:.0f} s, load average "
        f"{os.getloadavg()[0]:.1f} at the end)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
