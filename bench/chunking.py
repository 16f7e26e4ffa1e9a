"""What `chunk` costs against `truncate`: one request of long documents, stage 1 on the CPU.

    python bench/chunking.py [--models DIR] [--tokenizer DIR] [--docs 20] [--words 1500]

Builds shape-equivalent models (`make-test-models --full-size`) unless `--models` points at
existing ones, then runs the same request with each policy through the server's engine (cache off)
and prints a markdown table: windows scored, tokens, p50 / p95 seconds, tokens/s, and the time
ratio to `truncate` measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from reranker_server.engine.loader import load_engine
from reranker_server.model_generator import WORDS, write_test_models
from reranker_server.settings import Settings
from reranker_server.types import LongDocPolicy, RerankJob


def make_documents(count: int, words: int) -> list[str]:
    return [
        " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(words)) for i in range(count)
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", type=Path, default=None)
    parser.add_argument("--tokenizer", type=Path, default=None)
    parser.add_argument("--docs", type=int, default=20)
    parser.add_argument("--words", type=int, default=1500)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    models = args.models
    if models is None:
        models = Path(tempfile.mkdtemp(prefix="bench-models-"))
        write_test_models(models, full_size=True, tokenizer_dir=args.tokenizer)
    settings = Settings(
        stage1_model=str(models / "flashrank" / "ms-marco-MiniLM-L-12-v2"),
        stage2_model=str(models / "cross-encoder"),
        device="cpu",
        offline=True,
        cache_enabled=False,
        max_documents=args.docs,
    )
    engine = load_engine(settings)
    docs = make_documents(args.docs, args.words)
    query = "what is the capital of france"
    policies = {
        "truncate": LongDocPolicy(mode="truncate"),
        "chunk, max 3 per doc": LongDocPolicy(mode="chunk", max_chunks=3),
        "chunk, max 10 per doc": LongDocPolicy(mode="chunk", max_chunks=10),
    }
    rows = []
    for name, policy in policies.items():
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            outcome = engine.rerank(RerankJob(query, docs, top_k=10, policy=policy))
            times.append(time.perf_counter() - started)
        rows.append((name, outcome.windows, outcome.pair_tokens, times))

    print(
        f"\n{args.docs} documents of {args.words} words, {os.cpu_count()} cores, "
        f"{args.repeats} runs each, stage 1 only\n"
    )
    print("| policy | windows | tokens | p50 (s) | p95 (s) | tokens/s | time / truncate |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    baseline = statistics.median(rows[0][3])
    for name, windows, tokens, times in rows:
        p50 = statistics.median(times)
        p95 = sorted(times)[min(len(times) - 1, round(0.95 * (len(times) - 1)))]
        print(
            f"| {name} | {windows} | {tokens:,} | {p50:.2f} | {p95:.2f} | {tokens / p50:,.0f} "
            f"| {p50 / baseline:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
