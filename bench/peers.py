"""This server against its peers, side by side in one interleaved run: `python bench/peers.py`.

Contestants, each served in turn on 127.0.0.1 with the same full-size generated models
(`make-test-models --full-size`, the real BERT tokenizer):

- `default`: this server as a CPU host runs it (stage 1 only: FlashRank MiniLM-L12 int8);
- `fast`: the same with `RERANKER_STAGE1_ONNX_GRAPH=fast` (the opt-in fast graph, docs/models.md);
- `base` (with `--base REV`): the same at another git revision (a before/after of one change);
- `naive`: the seed server (bench/naive_server.py: FlashRank + the L-6 cross-encoder on the CPU);
- `infinity`: Infinity (`infinity_emb v2`, torch engine, the L-6 cross-encoder on every passage),
  from its own virtual environment (`--infinity`); skipped, with one line saying why, when it is
  not installed or does not answer.

Each repeat starts every contestant once (the order rotates between repeats), and on each
workload measures p50 latency at concurrency 1, requests/s at concurrency 8, and the server's CPU
seconds per request. Ratios are taken within a repeat (the machine is shared: figures across runs
are not comparable) and their median over repeats is printed. For this server it also measures the
time outside the stages at concurrency 1: client latency minus the sum of `stages[].seconds`.

The int8 anchor: ONNX Runtime's `MatMulInteger` at the model's own shapes (a 128-token pair
through the 384x384, 384x1536 and 1536x384 weights), one thread, in the same run: the per-thread
int8 peak. Stage 1's share of it is the model's work per request (bench/stage1_micro.py
`model_ops`, the pairs' real token counts) over the default server's CPU seconds per request at
concurrency 8, over that peak.

Bounded: each level stops starting requests after `--level-seconds`; every request has a timeout.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.load import run_load, tree_cpu
from bench.run_all import ROOT, cpu_name, free_port, serve
from bench.stage1_micro import HIDDEN, INTERMEDIATE, model_ops
from bench.workloads import WORKLOADS, body
from reranker_server.model_generator import STAGE1_NAME, write_test_models

INFINITY = Path("/work/venv-infinity/bin/infinity_emb")
CONTESTANTS = ("default", "fast", "base", "naive", "infinity")
# this server's own contestants: name -> settings
OURS = {"default": {}, "fast": {"RERANKER_STAGE1_ONNX_GRAPH": "fast"}, "base": {}}


@dataclass
class Level:
    """One contestant on one workload in one repeat."""

    p50_c1: float
    rps_c8: float  # at `concurrency`
    concurrency: int
    cpu_per_request: float
    outside_ms: list[float] = field(default_factory=list)  # this server: latency - stage sum


@contextmanager
def serve_infinity(executable: Path, models: Path) -> Iterator[tuple[str, int]]:
    """Infinity serving the L-6 cross-encoder on the CPU (torch engine), offline."""
    port = free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "DO_NOT_TRACK": "1",
        "INFINITY_ANONYMOUS_USAGE_STATS": "0",
        "TOKENIZERS_PARALLELISM": "false",
    }
    env.pop("PYTHONPATH", None)
    cmd = [
        str(executable),
        "v2",
        "--model-id",
        str(models / "cross-encoder"),
        "--engine",
        "torch",
        "--device",
        "cpu",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 300
            while True:
                try:
                    if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    tail = log.read().decode(errors="replace").strip().splitlines()[-3:]
                    raise RuntimeError(f"infinity did not start: {' / '.join(tail)}")
                time.sleep(0.5)
            yield url, proc.pid
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def infinity_body(models: Path) -> Callable[[dict[str, Any]], dict[str, Any]]:
    name = f"{models.name}/cross-encoder"  # the name Infinity serves a local directory under

    def convert(request: dict[str, Any]) -> dict[str, Any]:
        return {
            "query": request["query"],
            "documents": request["documents"],
            "top_n": request["top_k"],
            "return_documents": False,
            "model": name,
        }

    return convert


def measure(
    url: str,
    pid: int,
    workload: str,
    convert: Callable[[dict[str, Any]], dict[str, Any]],
    args: argparse.Namespace,
) -> Level:
    """Warm-up, then c=1 (sequential, responses read) and c=8 (bench/load.py)."""

    def request(n: int) -> dict[str, Any]:
        return convert(body(workload, n))

    timeout = httpx.Timeout(600)
    with httpx.Client(timeout=timeout) as client:
        client.post(f"{url}/rerank", json=request(10_000)).raise_for_status()  # warm-up
        cpu = tree_cpu(pid)
        latencies: list[float] = []
        outside: list[float] = []
        started = time.perf_counter()
        for n in range(args.mixed_c1_requests if workload == "100 mixed" else args.c1_requests):
            if time.perf_counter() - started > args.level_seconds:
                break
            sent = time.perf_counter()
            response = client.post(f"{url}/rerank", json=request(n))
            latency = time.perf_counter() - sent
            response.raise_for_status()
            latencies.append(latency)
            stages = response.json().get("stages")
            if isinstance(stages, list) and stages:
                outside.append(1000 * (latency - sum(float(s["seconds"]) for s in stages)))
        cpu_c1 = tree_cpu(pid) - cpu
    concurrency, count = (8, args.c8_requests)
    if workload == "100 mixed":
        concurrency, count = args.mixed_concurrency, args.mixed_requests
    load = run_load(
        f"{url}",
        lambda n: request(1_000 + n),
        concurrency=concurrency,
        requests=count,
        time_limit_s=args.level_seconds,
        server_pid=pid,
    )
    if load.errors:
        print(f"    {load.errors} errors at c={concurrency}", file=sys.stderr)
    answered = len(latencies) + load.ok
    return Level(
        statistics.median(latencies),
        load.rps,
        concurrency,
        (cpu_c1 + load.cpu_s) / answered if answered else float("nan"),
        outside,
    )


def int8_peak_per_thread(tokens: int = 128, repeats: int = 30) -> float:
    """GOP/s of one thread of ONNX Runtime's MatMulInteger at a layer's shapes (four 384x384
    projections, 384x1536 and 1536x384), `tokens` rows: the int8 kernel stage 1 runs."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    total_ops = 0.0
    total_s = 0.0
    for k, n, count in ((HIDDEN, HIDDEN, 4), (HIDDEN, INTERMEDIATE, 1), (INTERMEDIATE, HIDDEN, 1)):
        weight = rng.integers(-127, 127, size=(k, n), dtype=np.int8)
        graph = helper.make_graph(
            [helper.make_node("MatMulInteger", ["a", "w"], ["y"])],
            "anchor",
            [helper.make_tensor_value_info("a", TensorProto.UINT8, [tokens, k])],
            [helper.make_tensor_value_info("y", TensorProto.INT32, [tokens, n])],
            [numpy_helper.from_array(weight, "w")],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = 8
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        feed = {"a": rng.integers(0, 255, size=(tokens, k), dtype=np.uint8)}
        session.run(None, feed)
        best = float("inf")
        for _ in range(repeats):
            began = time.perf_counter()
            session.run(None, feed)
            best = min(best, time.perf_counter() - began)
        total_ops += count * 2.0 * tokens * k * n
        total_s += count * best
    return total_ops / total_s / 1e9


def pair_lengths(models: Path, workload: str, requests: int) -> list[float]:
    """Tokens of each (query, passage) pair of `requests` bodies, per request (512 at most)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(models / "flashrank" / STAGE1_NAME / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=512)
    ops = []
    for n in range(requests):
        request = body(workload, 1_000 + n)
        pairs = [(request["query"], d) for d in request["documents"]]
        ops.append(model_ops([len(e.ids) for e in tokenizer.encode_batch(pairs)]))
    return ops


@contextmanager
def base_tree(rev: str | None) -> Iterator[Path | None]:
    """A detached worktree of `rev` (None: none)."""
    if rev is None:
        yield None
        return
    directory = Path(tempfile.mkdtemp()) / "base"
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(directory), rev],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    try:
        yield directory
    finally:
        subprocess.run(
            ["git", "worktree", "remove", "--force", str(directory)], cwd=ROOT, check=False
        )
        shutil.rmtree(directory.parent, ignore_errors=True)


def level_of(results: dict[tuple[str, str], list[Level]], workload: str) -> int:
    runs = [r for (_, w), levels in results.items() if w == workload for r in levels]
    return runs[0].concurrency if runs else 8


def median_ratio(values: list[float]) -> str:
    good = [v for v in values if v > 0 and v == v]
    if not good:
        return "n/a"
    if len(good) == 1:
        return f"{good[0]:.2f}x"
    return f"{statistics.median(good):.2f}x ({min(good):.2f}-{max(good):.2f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", type=Path, default=Path("/tmp/bench-models"))
    parser.add_argument(
        "--tokenizer", type=Path, default=Path("/work/shared/models/bert-base-uncased-tokenizer")
    )
    parser.add_argument("--workloads", default="20 short,100 mixed")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--c1-requests", type=int, default=6)
    parser.add_argument("--c8-requests", type=int, default=16)
    parser.add_argument(
        "--mixed-concurrency",
        type=int,
        default=2,
        help="the throughput level of 100 mixed: the naive server pads 100 passages to 512 "
        "tokens in one ONNX batch (GBs each), so 8 at once would exhaust the memory",
    )
    parser.add_argument("--mixed-requests", type=int, default=4)
    parser.add_argument("--mixed-c1-requests", type=int, default=3)
    parser.add_argument("--level-seconds", type=float, default=60)
    parser.add_argument("--base", help="also serve this server at git revision BASE")
    parser.add_argument("--infinity", type=Path, default=INFINITY)
    parser.add_argument("--skip", default="", help="contestants not to run, comma-separated")
    args = parser.parse_args()
    if not (args.models / "flashrank" / STAGE1_NAME).exists():
        tokenizer = args.tokenizer if args.tokenizer.exists() else None
        write_test_models(args.models, full_size=True, tokenizer_dir=tokenizer)
    workloads = [w.strip() for w in args.workloads.split(",")]
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workloads {unknown}; known: {list(WORKLOADS)}")
    skipped = {name.strip() for name in args.skip.split(",") if name.strip()}
    notes: list[str] = []
    if not args.infinity.exists():
        skipped.add("infinity")
        notes.append(f"Infinity skipped: {args.infinity} not installed")
    if args.base is None:
        skipped.add("base")
    names = [c for c in CONTESTANTS if c not in skipped]
    results: dict[tuple[str, str], list[Level]] = {}
    peaks: list[float] = []
    started = time.perf_counter()
    with base_tree(args.base) as base:
        for repeat in range(args.repeats):
            peaks.append(int8_peak_per_thread())
            print(f"repeat {repeat + 1}: int8 anchor {peaks[-1]:.0f} GOP/s", file=sys.stderr)
            order = names[repeat % len(names) :] + names[: repeat % len(names)]
            for name in order:
                with ExitStack() as stack:
                    convert: Callable[[dict[str, Any]], dict[str, Any]] = dict
                    try:
                        if name == "infinity":
                            url, pid = stack.enter_context(
                                serve_infinity(args.infinity, args.models)
                            )
                            convert = infinity_body(args.models)
                        elif name == "naive":
                            url, pid = stack.enter_context(serve("naive", args.models, {}))
                        else:
                            root = base if name == "base" and base is not None else ROOT
                            url, pid = stack.enter_context(
                                serve("this", args.models, OURS[name], root=root)
                            )
                    except RuntimeError as exc:
                        if name != "infinity":
                            raise
                        notes.append(f"Infinity skipped: {exc}")
                        names.remove(name)
                        continue
                    for workload in workloads:
                        level = measure(url, pid, workload, convert, args)
                        results.setdefault((name, workload), []).append(level)
                        outside = (
                            f" outside the stages {statistics.median(level.outside_ms):.1f} ms"
                            if level.outside_ms
                            else ""
                        )
                        print(
                            f"  {name:8s} {workload:9s} p50 {level.p50_c1:.3f}s "
                            f"c={level.concurrency} {level.rps_c8:.2f} req/s "
                            f"CPU {level.cpu_per_request:.2f} s/req" + outside,
                            file=sys.stderr,
                            flush=True,
                        )
    print(report(results, names, workloads, peaks, notes, args, time.perf_counter() - started))
    return 0


def report(
    results: dict[tuple[str, str], list[Level]],
    names: list[str],
    workloads: list[str],
    peaks: list[float],
    notes: list[str],
    args: argparse.Namespace,
    seconds: float,
) -> str:
    lines = [
        f"CPU {cpu_name()} ({os.cpu_count()} cores); {args.repeats} repeats, contestants "
        f"interleaved; medians of repeats, ratios within each repeat (median, min-max); "
        f"{seconds / 60:.0f} min",
        *notes,
    ]
    peers = [n for n in ("naive", "infinity", "base") if n in names]
    for workload in workloads:
        lines += [
            "",
            f"| {workload} passages | p50 c=1 | req/s c={level_of(results, workload)} | "
            "CPU s/req | " + " | ".join(f"vs {p} (p50 / req/s / CPU)" for p in peers) + " |",
            "|---|---:|---:|---:|" + "---|" * len(peers),
        ]
        for name in names:
            runs = results.get((name, workload), [])
            if not runs:
                continue
            row = [
                name,
                f"{statistics.median(r.p50_c1 for r in runs) * 1000:.0f} ms",
                f"{statistics.median(r.rps_c8 for r in runs):.2f}",
                f"{statistics.median(r.cpu_per_request for r in runs):.2f}",
            ]
            for peer in peers:
                theirs = results.get((peer, workload), [])
                if name == peer or not theirs or name not in ("default", "fast"):
                    row.append("")
                    continue
                pairs = list(zip(runs, theirs, strict=False))
                row.append(
                    " / ".join(
                        median_ratio(values)
                        for values in (
                            [t.p50_c1 / r.p50_c1 for r, t in pairs],
                            [r.rps_c8 / t.rps_c8 for r, t in pairs],
                            [t.cpu_per_request / r.cpu_per_request for r, t in pairs],
                        )
                    )
                )
            lines.append("| " + " | ".join(row) + " |")
    outside = [
        (name, workload, [statistics.median(r.outside_ms) for r in results[(name, workload)]])
        for workload in workloads
        for name in ("base", "default", "fast")
        if (name, workload) in results and all(r.outside_ms for r in results[(name, workload)])
    ]
    if outside:
        lines += [
            "",
            "Server time outside the stages, c=1 (client latency minus the stages' seconds; "
            "median per repeat):",
            "",
            "| workload | server | ms per repeat |",
            "|---|---|---|",
        ]
        for name, workload, values in outside:
            lines.append(f"| {workload} | {name} | {', '.join(f'{v:.1f}' for v in values)} |")
    default = [r for w in workloads for r in results.get(("default", w), [])]
    if default and peaks:
        lines += [
            "",
            f"int8 anchor (MatMulInteger at the model's shapes, one thread): "
            f"{', '.join(f'{p:.0f}' for p in peaks)} GOP/s per repeat.",
        ]
        for workload in workloads:
            ops = statistics.mean(pair_lengths(args.models, workload, 8))
            shares = [
                ops / r.cpu_per_request / 1e9 / peak
                for r, peak in zip(results.get(("default", workload), []), peaks, strict=False)
            ]
            if shares:
                lines.append(
                    f"Stage 1 ({workload}): {ops / 1e9:.0f} GOP per request; "
                    f"{', '.join(f'{s:.0%}' for s in shares)} of the int8 peak per CPU second."
                )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
