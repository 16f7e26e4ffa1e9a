"""This server at two git revisions, side by side in one run: `python bench/compare_revisions.py
--base REV` (default: the previous commit).

Each round serves the same workload from the base revision's code and from the working tree's,
one server at a time on 127.0.0.1 (full-size generated models, stage 2 on the CPU, no cache), and
drives it with bench/load.py. Rounds alternate (base, new, base, new, ...) so that a noisy,
shared machine slows both alike. The fair figure is the server's CPU seconds per request; p50
latency is printed too. Bounded: each level stops starting requests after `--level-seconds`.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.load import run_load
from bench.run_all import ROOT, cpu_name, serve
from bench.workloads import body
from reranker_server.model_generator import STAGE1_NAME, write_test_models


def measure(
    root: Path, models: Path, workload: str, concurrency: int, args: argparse.Namespace
) -> tuple[float, float]:
    """(server CPU seconds per request, p50 seconds) of one level."""
    env = {"RERANKER_STAGE2_ON_CPU": "true"}
    with serve("this", models, env, root=root) as (url, pid):
        run_load(  # warm-up, not counted
            url,
            lambda n: body(workload, n),
            concurrency=1,
            requests=1,
            time_limit_s=120,
            server_pid=pid,
        )
        result = run_load(
            url,
            lambda n: body(workload, n),
            concurrency=concurrency,
            requests=max(args.min_requests, 2 * concurrency),
            time_limit_s=args.level_seconds,
            server_pid=pid,
        )
    return result.cpu_per_request, result.percentile(50)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", default="HEAD~1", help="git revision to compare against")
    parser.add_argument("--models", type=Path, default=Path("/tmp/bench-models"))
    parser.add_argument(
        "--tokenizer", type=Path, default=Path("/work/shared/models/bert-base-uncased-tokenizer")
    )
    parser.add_argument("--workloads", default="20 short,100 mixed")
    parser.add_argument("--levels", default="1,4")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--min-requests", type=int, default=6)
    parser.add_argument("--level-seconds", type=float, default=30)
    args = parser.parse_args()
    if not (args.models / "flashrank" / STAGE1_NAME).exists():
        tokenizer = args.tokenizer if args.tokenizer.exists() else None
        write_test_models(args.models, full_size=True, tokenizer_dir=tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(base), args.base],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        try:
            lines = [
                f"CPU {cpu_name()}; base {args.base} vs working tree; {args.rounds} alternating "
                "rounds per level; server CPU s/request (median of rounds)\n",
                "| workload | concurrency | base CPU s/req | new CPU s/req | new/base | "
                "base p50 s | new p50 s |",
                "|---|---:|---:|---:|---:|---:|---:|",
            ]
            for workload in args.workloads.split(","):
                for level in [int(c) for c in args.levels.split(",")]:
                    runs: dict[str, list[tuple[float, float]]] = {"base": [], "new": []}
                    for _ in range(args.rounds):
                        for name, root in (("base", base), ("new", ROOT)):
                            runs[name].append(measure(root, args.models, workload, level, args))
                            print(
                                f"  {workload} c={level} {name}: {runs[name][-1]}", file=sys.stderr
                            )
                    cpu = {k: statistics.median(c for c, _ in v) for k, v in runs.items()}
                    p50 = {k: statistics.median(p for _, p in v) for k, v in runs.items()}
                    lines.append(
                        f"| {workload} | {level} | {cpu['base']:.3f} | {cpu['new']:.3f} | "
                        f"{cpu['new'] / cpu['base']:.2f} | {p50['base']:.2f} | {p50['new']:.2f} |"
                    )
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=False
            )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
