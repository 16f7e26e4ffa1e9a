"""Stage 2 on the CPU: the ONNX runner (`onnx-cross-encoder`, fp32 and int8) against the torch
runner (`cross-encoder`, sentence-transformers, fp32), on the same model's weights.

    python bench/stage2_cpu.py --tokenizer /work/shared/models/bert-base-uncased-tokenizer

Writes full-size random-weight models first (`make-test-models --full-size --onnx`: MiniLM-L6-H384,
the default stage 2's shape, and its ONNX export with onnx/model.onnx and int8 variants) unless
`--models` holds them. Each runner scores as the server's CPU lane does: `--runs` workers (default:
one per core), each with its own copy of the model and one thread, the pairs cut into the runner's
batches (an int8 file that quantizes per batch runs each pair alone). Prints ms per 10 and per 100
pairs (median of `--repeats`), the ratio to torch, and how often the top-10 order equals torch's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bench.workloads import QUERY, mixed_documents, short_documents
from reranker_server.model_generator import write_test_models
from reranker_server.runners.flashrank import plan_batches

Pair = tuple[str, str]


class Lane:
    """`runs` copies of one runner, one thread each, scoring pairs as the server's CPU lane."""

    def __init__(self, build: Callable[[], Any], runs: int) -> None:
        self.copies = [build() for _ in range(runs)]
        self.pool = ThreadPoolExecutor(runs)
        self.runs = runs

    def score(self, pairs: Sequence[Pair]) -> list[float]:
        runner = self.copies[0]
        max_pairs = min(getattr(runner, "max_pairs", len(pairs)), -(-len(pairs) // self.runs))
        lengths = [len(q.split()) + len(d.split()) for q, d in pairs]
        batches = plan_batches(lengths, 1 << 30, max(1, max_pairs))
        scores = np.empty(len(pairs))
        jobs = [
            self.pool.submit(self.copies[i % self.runs].score_pairs, [pairs[j] for j in batch])
            for i, batch in enumerate(batches)
        ]
        for batch, job in zip(batches, jobs, strict=True):
            scores[batch] = job.result()
        return [float(s) for s in scores]

    def close(self) -> None:
        self.pool.shutdown()


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: first-call allocations
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def top10(scores: Sequence[float]) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:10]


def lanes(models: Path, runs: int) -> dict[str, Lane]:
    from reranker_server.runners.cross_encoder import CrossEncoderRunner
    from reranker_server.runners.onnx_cross_encoder import OnnxCrossEncoderRunner

    torch_dir, onnx_dir = models / "cross-encoder", models / "onnx-cross-encoder"
    int8 = OnnxCrossEncoderRunner(onnx_dir, onnx_file="auto")
    return {
        "cross-encoder (torch) fp32": Lane(
            lambda: CrossEncoderRunner(str(torch_dir), threads=1, precision="fp32"), runs
        ),
        "onnx-cross-encoder fp32 (model.onnx)": Lane(
            lambda: OnnxCrossEncoderRunner(onnx_dir, onnx_file="fp32", threads=1), runs
        ),
        f"onnx-cross-encoder int8 ({int8.onnx_file.name})": Lane(
            lambda: OnnxCrossEncoderRunner(onnx_dir, onnx_file="auto", threads=1), runs
        ),
    }


def report(models: Path, runs: int, repeats: int, queries: int) -> str:
    workloads = {
        10: [(QUERY, d) for d in short_documents(0)[:10]],
        100: [(QUERY, d) for d in mixed_documents(0)],
    }
    ranking = [[(f"{QUERY} {q}", d) for d in mixed_documents(q + 1)] for q in range(queries)]
    built = lanes(models, runs)
    rows: dict[str, dict[str, Any]] = {}
    for name, lane in built.items():
        row: dict[str, Any] = {
            n: median_ms(lambda p=p, lane=lane: lane.score(p), repeats)
            for n, p in workloads.items()
        }
        row["scores"] = [lane.score(pairs) for pairs in ranking]
        rows[name] = row
        lane.close()
    base_name = next(iter(rows))
    base = rows[base_name]
    gaps = [float(np.min(np.diff(sorted(s, reverse=True)[:11]) * -1)) for s in base["scores"]]
    lines = [
        f"Stage 2 on the CPU, {runs} runs x 1 thread, median of {repeats}; top-10 agreement over "
        f"{queries} queries x 100 documents (bench/workloads.py mixed)\n",
        "| runner | ms / 10 pairs | ms / 100 pairs | vs torch (10) | vs torch (100) "
        "| same top-10 order as torch | top-10 in common | max abs score diff |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        same = sum(top10(a) == top10(b) for a, b in zip(row["scores"], base["scores"], strict=True))
        common = np.mean(
            [
                len(set(top10(a)) & set(top10(b))) / 10
                for a, b in zip(row["scores"], base["scores"], strict=True)
            ]
        )
        diff = max(
            float(np.max(np.abs(np.subtract(a, b))))
            for a, b in zip(row["scores"], base["scores"], strict=True)
        )
        lines.append(
            f"| {name} | {row[10]:.0f} | {row[100]:.0f} | {base[10] / row[10]:.2f}x "
            f"| {base[100] / row[100]:.2f}x | {same}/{queries} | {common:.0%} | {diff:.1e} |"
        )
    lines.append(
        f"\nSmallest gap between neighbouring top-11 torch scores: {min(gaps):.1e} "
        f"(median {statistics.median(gaps):.1e}); 'vs torch' is torch's time / the runner's time."
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", type=Path, default=None, help="from make-test-models --onnx")
    parser.add_argument("--tokenizer", type=Path, default=None, help="a real BERT tokenizer dir")
    parser.add_argument("--runs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--queries", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        models = args.models
        if models is None or not (models / "onnx-cross-encoder").is_dir():
            models = models or Path(tmp)
            write_test_models(models, full_size=True, tokenizer_dir=args.tokenizer, onnx=True)
        started = time.perf_counter()
        print(report(models, args.runs, args.repeats, args.queries))
        print(f"\n(measured in {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
