"""The auto plan's cost estimates against measured stage times: `python bench/plan_costs.py`.

    python bench/plan_costs.py [--models DIR] [--tokenizer DIR] [--device cpu|cuda]
                               [--workloads "20 short,100 mixed"] [--repeats 3]

Loads the engine as the server does (full-size generated models: stage 1 MiniLM-L12 int8 ONNX,
stage 2 MiniLM-L6; built here unless `--models` has them), seeds the per-token costs as warm-up
does under RERANKER_STAGE1=auto (`Engine.calibrate`: one synthetic request of 32 passages through
each stage; run twice, the first unmeasured, so that each of stage 2's CPU copies is warm), then
runs each workload with every document sent to stage 2 (candidates = all) and prints, per stage,
the warm-up estimate (seconds per token x the request's tokens) against the measured p50, and
what the live EWMA (weight 0.1) makes of the measured timings. On the CPU stage 2 runs on the CPU
(`stage2_on_cpu`), so its row says what the GPU's row would hold on a GPU host; with `--device
cuda` the plan column says what `auto` would choose.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.workloads import QUERY, WORKLOADS
from reranker_server.engine.loader import load_engine
from reranker_server.engine.plan import CPU_ROLE, GPU_ROLE, StageCosts, choose
from reranker_server.model_generator import STAGE1_NAME, write_test_models
from reranker_server.settings import Settings
from reranker_server.types import RerankJob

DEFAULT_TOKENIZER = Path("/work/shared/models/bert-base-uncased-tokenizer")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", type=Path, default=Path("/tmp/bench-models"))
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda / cuda:N")
    parser.add_argument("--workloads", default="20 short,100 mixed")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    if not (args.models / "flashrank" / STAGE1_NAME).exists():
        tokenizer = args.tokenizer if args.tokenizer.exists() else None
        print(f"building full-size models in {args.models} ...", flush=True)
        write_test_models(args.models, full_size=True, tokenizer_dir=tokenizer)
    on_gpu = args.device != "cpu"
    settings = Settings(
        stage1_model=str(args.models / "flashrank" / STAGE1_NAME),
        stage2_model=str(args.models / "cross-encoder"),
        offline=True,
        device=args.device,
        stage2_on_cpu=not on_gpu,
        cache_enabled=False,
        stage1="auto",
        stage1_auto_ewma_weight=0.0,  # keep the warm-up figures: they are what is compared
        max_length=512,
    )
    engine = load_engine(settings)
    stage2_role = GPU_ROLE if on_gpu else "stage2_cpu"
    if on_gpu and engine.stage2_gpu is None:
        print("no CUDA device: run with --device cpu", file=sys.stderr)
        return 2
    engine.calibrate(roles=(CPU_ROLE, stage2_role))  # unmeasured: warms every CPU copy
    started = time.perf_counter()
    seeded = engine.calibrate(roles=(CPU_ROLE, stage2_role))
    calibration_s = time.perf_counter() - started
    live = StageCosts(0.1, seeded)
    stage2_device = engine.stage2_gpu.device if on_gpu and engine.stage2_gpu else "cpu"

    print(
        f"\nplan cost estimates vs measured, {settings.runs()} CPU runs, stage 2 on "
        f"{stage2_device}; warm-up calibration took {calibration_s:.1f} s\n"
    )
    print(
        "warm-up seconds per token: "
        + ", ".join(f"{r} {v * 1e6:.1f} us" for r, v in seeded.items())
    )
    print(
        "\n| workload | docs | tokens | stage | device | estimate (ms) | measured p50 (ms) "
        "| measured / estimate | live EWMA estimate (ms) |"
    )
    print("|---|---:|---:|---|---|---:|---:|---:|---:|")
    plans = []
    for workload in [w.strip() for w in args.workloads.split(",") if w.strip()]:
        docs = WORKLOADS[workload](0)
        assert engine.windows is not None
        windows = engine.windows.plan(QUERY, docs, engine.long_documents)
        tokens = sum(windows.pair_tokens or ())
        times: dict[str, list[float]] = {CPU_ROLE: [], stage2_role: []}
        for _ in range(args.repeats):
            job = RerankJob(QUERY, docs, top_k=10, candidates=len(docs), use_cache=False)
            outcome = engine.rerank(job)
            for report, role in zip(outcome.stages, (CPU_ROLE, stage2_role), strict=False):
                times[role].append(report.seconds)
                live.observe(role, tokens, report.seconds)
        for role, label, device in (
            (CPU_ROLE, "stage 1", "cpu"),
            (stage2_role, "stage 2", stage2_device),
        ):
            if not times[role]:
                continue
            estimate = seeded[role] * tokens
            measured = statistics.median(times[role])
            print(
                f"| {workload} | {len(docs)} | {tokens:,} | {label} | {device} "
                f"| {estimate * 1e3:.0f} | {measured * 1e3:.0f} | {measured / estimate:.2f} "
                f"| {(live.estimate(role, tokens) or 0) * 1e3:.0f} |"
            )
        if on_gpu:
            plan = choose(gate=None, costs=StageCosts(0.0, seeded), tokens=tokens, pairs=len(docs))
            plans.append(f"- {workload}: auto would run `{plan.name}` ({plan.reason})")
    if plans:
        print("\n" + "\n".join(plans))
    else:
        print("\nno GPU: RERANKER_STAGE1=auto runs the cascade, as always.")
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
