"""1,000 documents x 512 tokens in one request, stage 1 on the CPU: time and peak memory.

    python bench/long_documents.py [--models DIR] [--tokenizer DIR] [--docs 1000]

Builds shape-equivalent models (`make-test-models --full-size`, real BERT vocabulary when
`--tokenizer` is given) unless `--models` points at existing ones, then scores the documents with
the server's engine as a request would, and prints a markdown table: seconds, tokens/s, and peak
RSS growth over the loaded process, for the server's bounded batches and for FlashRank's own
single batch (its way: every document in one ONNX run) when `--compare-flashrank` is given.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from reranker_server.engine.loader import load_engine
from reranker_server.model_factory import write_test_models
from reranker_server.settings import Settings

WORDS = (
    "paris capital france river city history population europe tower famous built century "
    "government language people world water food health research science music art"
).split()


class PeakRss:
    """Samples this process's RSS every 10 ms while running."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        proc = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, proc.memory_info().rss)
            time.sleep(0.01)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def make_documents(count: int, words: int) -> list[str]:
    return [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(words)) for i in range(count)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", type=Path, default=None)
    parser.add_argument("--tokenizer", type=Path, default=None)
    parser.add_argument("--docs", type=int, default=1000)
    parser.add_argument("--batch-tokens", type=int, default=8192)
    parser.add_argument("--compare-flashrank", action="store_true")
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
        stage1_batch_tokens=args.batch_tokens,
        max_documents=args.docs,
    )
    engine = load_engine(settings)
    docs = make_documents(args.docs, 600)  # > 512 tokens with the query: truncated to 512
    query = "what is the capital of france"
    tokens = sum(len(e.ids) for e in engine.stage1.tokenize(query, docs))  # type: ignore[attr-defined]
    rows = []

    base = psutil.Process().memory_info().rss
    with PeakRss() as peak:
        started = time.perf_counter()
        outcome = engine.rerank(query, docs, top_k=10)
        seconds = time.perf_counter() - started
    assert len(outcome.results) == 10
    rows.append(("server (bounded batches)", seconds, tokens / seconds, (peak.peak - base) / 2**20))

    if args.compare_flashrank:
        from flashrank import Ranker, RerankRequest

        ranker = Ranker(model_name="ms-marco-MiniLM-L-12-v2", cache_dir=str(models / "flashrank"))
        base = psutil.Process().memory_info().rss
        with PeakRss() as peak:
            started = time.perf_counter()
            ranker.rerank(RerankRequest(query=query, passages=[{"text": d} for d in docs]))
            fr_seconds = time.perf_counter() - started
        rows.append(
            (
                "flashrank.Ranker (one batch)",
                fr_seconds,
                tokens / fr_seconds,
                (peak.peak - base) / 2**20,
            )
        )

    print(
        f"\n{args.docs} documents, {tokens} tokens (query + document, truncated to 512), "
        f"{os.cpu_count()} cores, stage-1 batch budget {args.batch_tokens} tokens\n"
    )
    print("| run | seconds | tokens/s | peak RSS growth (MiB) |")
    print("|---|---:|---:|---:|")
    for name, sec, tps, grow in rows:
        print(f"| {name} | {sec:.1f} | {tps:,.0f} | {grow:,.0f} |")
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nprocess max RSS: {max_rss:,.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
