"""Stage-1 micro-benchmark: effective GOP/s of the FlashRank model against this machine's
measured int8 matmul peak (ONNX Runtime `MatMulInteger`, the kernel the int8 model uses), and the
stage-2 CPU precision check (fp32 vs bf16: time and score difference).

    python bench/stage1_micro.py --models DIR
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort

from reranker_server.model_generator import STAGE1_FILE, STAGE1_NAME
from reranker_server.runners.flashrank import FlashRankRunner

# MiniLM-L12-H384: what one token costs in one layer, and attention per (token x token)
LAYERS, HIDDEN, INTERMEDIATE = 12, 384, 1536


def model_ops(lengths: Sequence[int]) -> float:
    """Multiply-adds x 2 of the encoder for pairs of these lengths (no padding)."""
    per_token = 2 * (4 * HIDDEN * HIDDEN + 2 * HIDDEN * INTERMEDIATE)
    return float(sum(LAYERS * (n * per_token + 4 * n * n * HIDDEN) for n in lengths))


def best_of(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def int8_matmul_peak(size: int = 1024, repeats: int = 5) -> float:
    """Best int8 GOP/s of ONNX Runtime's MatMulInteger here: all cores, one run per core."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = rng.integers(-127, 127, size=(size, size), dtype=np.int8)
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "w"], ["y"])],
        "peak",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [size, size])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [size, size])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    data = model.SerializeToString()
    cores = os.cpu_count() or 1
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    a = rng.integers(0, 255, size=(size, size), dtype=np.uint8)
    ops = 2.0 * size**3
    with ThreadPoolExecutor(cores) as pool:
        seconds = best_of(
            lambda: list(pool.map(lambda _: session.run(None, {"a": a}), range(cores))), repeats
        )
    parallel = cores * ops / seconds
    options.intra_op_num_threads = cores
    wide = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    threaded = ops / best_of(lambda: wide.run(None, {"a": a}), repeats)
    return max(parallel, threaded) / 1e9


def stage1_rows(
    models: Path, docs: Sequence[str], query: str, repeats: int = 3
) -> list[tuple[str, float, float]]:
    """(way, seconds, effective GOP/s on real tokens) for the same passages."""
    from flashrank import Ranker, RerankRequest

    directory = models / "flashrank" / STAGE1_NAME
    cores = os.cpu_count() or 1
    runner = FlashRankRunner(directory, directory / STAGE1_FILE, threads=1)
    encodings = runner.prepare([(query, d) for d in docs])
    ops = model_ops([len(e.ids) for e in encodings])
    rows = []
    with ThreadPoolExecutor(cores) as pool:
        ours = best_of(lambda: list(pool.map(lambda e: runner.run([e]), encodings)), repeats)
    rows.append((f"this server: each pair alone, {cores} runs x 1 thread", ours, ops / ours / 1e9))
    padded = FlashRankRunner(directory, directory / STAGE1_FILE, threads=cores)
    one_batch = best_of(lambda: padded._forward(encodings), repeats)
    rows.append(
        (
            f"one padded batch, {cores} threads (int8 scores change)",
            one_batch,
            ops / one_batch / 1e9,
        )
    )
    ranker = Ranker(model_name=STAGE1_NAME, cache_dir=str(models / "flashrank"))
    passages = [{"id": i, "text": d} for i, d in enumerate(docs)]
    naive = best_of(lambda: ranker.rerank(RerankRequest(query=query, passages=passages)), repeats)
    rows.append(("flashrank.Ranker.rerank (the naive server's stage 1)", naive, ops / naive / 1e9))
    return rows


def stage2_precision_rows(
    models: Path, docs: Sequence[str], query: str
) -> list[tuple[str, float, float]]:
    """(precision, seconds for the pairs on one thread, max |score - fp32 score|)."""
    from reranker_server.runners.cross_encoder import CrossEncoderRunner

    rows = []
    reference: list[float] | None = None
    for precision in ("fp32", "bf16"):
        runner = CrossEncoderRunner(
            str(models / "cross-encoder"), threads=1, precision=precision, batch_size=len(docs)
        )
        scores = runner.score(query, docs)
        seconds = best_of(lambda r=runner: r.score(query, docs), 3)
        reference = reference or scores
        rows.append((precision, seconds, float(np.max(np.abs(np.subtract(scores, reference))))))
    return rows


def report(models: Path, docs: Sequence[str], query: str) -> str:
    peak = int8_matmul_peak()
    lines = [
        f"int8 matmul peak (ONNX Runtime MatMulInteger 1024^3, {os.cpu_count()} cores): "
        f"**{peak:,.0f} GOP/s**\n",
        f"Stage 1 on {len(docs)} passages (effective GOP/s counts the real tokens, no padding):\n",
        "| way | ms | effective GOP/s | share of int8 peak |",
        "|---|---:|---:|---:|",
    ]
    for way, seconds, gops in stage1_rows(models, docs, query):
        lines.append(f"| {way} | {seconds * 1000:.0f} | {gops:,.0f} | {gops / peak:.0%} |")
    lines += [
        "",
        f"Stage 2 on the CPU, {min(10, len(docs))} pairs, one thread "
        "(`RERANKER_STAGE2_CPU_PRECISION`):\n",
        "| precision | ms | max score difference vs fp32 |",
        "|---|---:|---:|",
    ]
    for precision, seconds, diff in stage2_precision_rows(models, docs[:10], query):
        lines.append(f"| {precision} | {seconds * 1000:.0f} | {diff:.1e} |")
    return "\n".join(lines)


def main() -> None:
    from bench.workloads import QUERY, short_documents

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", type=Path, default=Path("/tmp/bench-models"))
    args = parser.parse_args()
    print(report(args.models, short_documents(0), QUERY))


if __name__ == "__main__":
    main()
