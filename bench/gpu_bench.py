"""Stage-2 (cross-encoder) throughput on a GPU: pairs/s and p50 latency.

    python bench/gpu_bench.py [--models DIR] [--tokenizer DIR] [--device cuda:0] [--repeats 5]

Uses shape-equivalent models (`make-test-models --full-size`: MiniLM-L6-H384, random weights, the
same compute as the real one), built here unless `--models` points at existing ones. For 10, 100
and 1,000 candidates it prints a markdown table of fp16 against fp32 (the ratio in the same run)
(and the largest score difference between the two: fp16 parity), and a batch-size sweep.
`--device cpu` runs the same on the CPU (for a smoke check, fp32/bf16). bench/gpu_check.sh runs
it on a GPU host.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from reranker_server.devices import detect_accelerator
from reranker_server.model_generator import write_test_models
from reranker_server.runners.cross_encoder import CrossEncoderRunner

WORDS = (
    "paris capital france river city history population europe tower famous built century "
    "government language people world water food health research science music art"
).split()
QUERY = "what is the capital of france"


def passages(count: int) -> list[str]:
    """Mixed lengths, 20 to 200 words (about 30 to 260 tokens)."""
    return [
        " ".join(WORDS[(i + j) % len(WORDS)] for j in range(20 + (i * 37) % 180))
        for i in range(count)
    ]


def measure(runner: CrossEncoderRunner, docs: list[str], repeats: int) -> tuple[float, float]:
    """(p50 seconds, pairs per second) over `repeats` runs after one warm-up."""
    runner.score(QUERY, docs)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        runner.score(QUERY, docs)
        _sync()
        times.append(time.perf_counter() - started)
    p50 = statistics.median(times)
    return p50, len(docs) / p50


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", type=Path, default=None)
    parser.add_argument("--tokenizer", type=Path, default=None)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", default="10,100,1000")
    parser.add_argument("--batch-sizes", default="8,32,128")
    args = parser.parse_args()

    models = args.models
    if models is None:
        models = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
        write_test_models(models, full_size=True, tokenizer_dir=args.tokenizer)
    accelerator = None if args.device == "cpu" else detect_accelerator(args.device)
    if args.device != "cpu" and accelerator is None:
        print("no CUDA device: run with --device cpu for a CPU smoke run", file=sys.stderr)
        return 2
    where = accelerator.name() if accelerator else "CPU"
    low = "fp16" if accelerator else "bf16"
    sizes = [int(s) for s in args.sizes.split(",")]

    def runner(precision: str, batch_size: int = 32) -> CrossEncoderRunner:
        return CrossEncoderRunner(
            str(models / "cross-encoder"),
            accelerator=accelerator,
            precision=precision,
            batch_size=batch_size,
            vram_fraction=0.5,
        )

    print(f"\nstage 2 on {where}, MiniLM-L6-H384 shape, random weights, {args.repeats} runs\n")
    print(
        f"| candidates | fp32 p50 (ms) | fp32 pairs/s | {low} p50 (ms) | {low} pairs/s "
        f"| {low} / fp32 throughput | max abs score diff |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    full, reduced = runner("fp32"), runner(low)
    for size in sizes:
        docs = passages(size)
        p50_a, rate_a = measure(full, docs, args.repeats)
        p50_b, rate_b = measure(reduced, docs, args.repeats)
        diff = max(
            abs(a - b)
            for a, b in zip(full.score(QUERY, docs), reduced.score(QUERY, docs), strict=True)
        )
        print(
            f"| {size} | {p50_a * 1e3:.1f} | {rate_a:,.0f} | {p50_b * 1e3:.1f} | {rate_b:,.0f} "
            f"| {rate_b / rate_a:.2f}x | {diff:.1e} |"
        )

    print(f"\nbatch-size sweep ({low}, {max(sizes)} candidates)\n")
    print("| batch size | p50 (ms) | pairs/s | vs batch 32 (or the first) |")
    print("|---:|---:|---:|---:|")
    docs = passages(max(sizes))
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    rows = {b: measure(runner(low, b), docs, args.repeats) for b in batch_sizes}
    baseline = rows.get(32, rows[batch_sizes[0]])[1]
    for batch_size, (p50, rate) in rows.items():
        print(f"| {batch_size} | {p50 * 1e3:.1f} | {rate:,.0f} | {rate / baseline:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
