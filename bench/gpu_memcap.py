"""Stage 2 under memory pressure on a real GPU: `python bench/gpu_memcap.py --models DIR`.

Two checks, each printed as a table row with PASS/FAIL (exit status 1 if any fails):

1. The OOM ladder forced by a memory cap: a batch of 128 long pairs is measured uncapped, then
   torch's per-process memory fraction is set so that the batch's activations can't fit but a
   quarter of them can; the runner must take rungs down the ladder (`oom_retries`) and return the
   uncapped scores (within 1e-3).
2. Another process holding most of the card (plain cudaMalloc through torch): the free-VRAM
   figure must see it; with room left above RERANKER_MIN_FREE_VRAM_MB stage 2 still answers on the
   GPU (batches bounded by what is free, no failure); with less left the gate answers from stage
   1 (`low_vram`) and /health's state is `degraded`; once the other process lets go the GPU is
   used again.

Models: `make-test-models --full-size` output (bench/gpu_check.sh builds them).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from reranker_server.devices import CudaAccelerator, detect_accelerator
from reranker_server.engine.loader import load_engine
from reranker_server.model_generator import STAGE1_NAME
from reranker_server.runners.cross_encoder import CrossEncoderRunner
from reranker_server.settings import Settings
from reranker_server.types import RerankJob

QUERY = "what is the capital of france"
WORDS = "paris capital france river city history population europe tower famous".split()
HOG = """
import sys, time, torch
leave = int(float(sys.argv[1]) * 2**20)
free, _ = torch.cuda.mem_get_info(0)
held = torch.empty(max(0, free - leave), dtype=torch.uint8, device="cuda:0")
print("held", held.numel() // 2**20, "MiB", flush=True)
sys.stdin.read()  # until the parent closes it
"""

results: list[tuple[str, bool, str]] = []


def check(name: str, ok: bool, detail: str) -> None:
    results.append((name, ok, detail))
    print(f"{'PASS' if ok else 'FAIL'}: {name}: {detail}", flush=True)


def long_docs(count: int) -> list[str]:
    return [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(600)) for i in range(count)]


def ladder(models: Path) -> None:
    acc = detect_accelerator("cuda:0")
    assert acc is not None
    runner = CrossEncoderRunner(
        str(models / "cross-encoder"), accelerator=acc, batch_size=128, vram_fraction=1.0
    )
    docs = long_docs(128)
    runner.score(QUERY, docs[:4])  # lazy initialisation
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(0)
    torch.cuda.reset_peak_memory_stats(0)
    reference = runner.score(QUERY, docs)
    torch.cuda.synchronize()
    activations = torch.cuda.max_memory_allocated(0) - base
    total = torch.cuda.mem_get_info(0)[1]
    cap = base + 0.4 * activations  # 128 pairs can't fit; 32 can
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(cap / total, 0)
    try:
        before = runner.oom_retries
        capped = runner.score(QUERY, docs)
    except Exception as exc:  # an OOM at one pair, or a device fault: the ladder failed
        check("OOM ladder under a memory cap", False, f"{type(exc).__name__}: {exc}")
        return
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
        torch.cuda.empty_cache()
    rungs = runner.oom_retries - before
    diff = max(abs(a - b) for a, b in zip(reference, capped, strict=True))
    check(
        "OOM ladder under a memory cap",
        rungs >= 1 and diff <= 1e-3,
        f"cap {cap / 2**20:.0f} MiB (weights {base / 2**20:.0f} MiB + 40% of a 128-pair "
        f"batch's {activations / 2**20:.0f} MiB): {rungs} rungs, max score diff {diff:.1e}",
    )


def neighbour(models: Path, leave_mb: float, min_free_mb: float) -> None:
    """Another process leaves `leave_mb` free; the engine needs `min_free_mb`."""
    settings = Settings(
        stage1_model=str(models / "flashrank" / STAGE1_NAME),
        stage2_model=str(models / "cross-encoder"),
        offline=True,
        device="cuda:0",
        min_free_vram_mb=int(min_free_mb),
        cache_enabled=False,
        candidates=50,
    )
    engine = load_engine(settings)
    hog = subprocess.Popen(
        [sys.executable, "-c", HOG, str(leave_mb)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert hog.stdout is not None
        line = hog.stdout.readline().strip()
        acc = engine.gate.accelerator
        assert isinstance(acc, CudaAccelerator)
        free = acc.free_memory_mb()
        out = engine.rerank(RerankJob(QUERY, long_docs(50), top_k=5))
        state = engine.gate.snapshot().state
        if leave_mb > min_free_mb:
            ok = out.backend == "gpu" and out.fallback is None and state == "ok"
        else:
            ok = out.fallback == "low_vram" and state == "degraded"
        check(
            f"another process leaves {leave_mb:.0f} MiB (min free {min_free_mb:.0f})",
            ok and free < leave_mb + 1024,
            f"{line}; free seen {free:.0f} MiB; backend {out.backend}, fallback {out.fallback}, "
            f"gpu_state {state}",
        )
    finally:
        if hog.stdin is not None:
            hog.stdin.close()
        hog.wait(timeout=60)
    time.sleep(1)
    out = engine.rerank(RerankJob(QUERY, long_docs(50), top_k=5))
    check(
        "GPU used again once the other process let go",
        out.backend == "gpu" and out.fallback is None,
        f"backend {out.backend}, fallback {out.fallback}",
    )
    engine.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", type=Path, required=True)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    ladder(args.models)
    neighbour(args.models, leave_mb=3072, min_free_mb=512)  # a 4 GB card's worth left
    neighbour(args.models, leave_mb=256, min_free_mb=512)  # too little: stage 1 answers
    print("\n| check | result | detail |\n|---|---|---|")
    for name, ok, detail in results:
        print(f"| {name} | {'PASS' if ok else 'FAIL'} | {detail} |")
    return 0 if all(ok for _, ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
