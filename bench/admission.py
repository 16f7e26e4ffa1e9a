"""Admission before -> after, in one run: `python bench/admission.py --base REV [--models DIR]`.

Serves the base revision's code (a `git worktree` of REV) and then the working tree's, one server
at a time on 127.0.0.1 (`reranker-server serve`, generated models from `make-test-models`: tiny
ones unless `--models` names others, stage 2 on the CPU, `RERANKER_ACCEPTED_MODELS` set), sends
each probe below and prints one table row per probe: status, error field, seconds, answer bytes,
and the server's RSS growth. Bounded: every request has a client timeout (`--timeout`); a probe
that times out prints `timeout` (the server cancels the work when the client goes away).

Probes: 5,000 pairs on /v1/score; a `--huge-pairs` body (1.5 M pairs: 15 MB); lone surrogates on
/score and /v1/score; the four /score field names of issue 22; a 1 MB model name; and
`return_documents` on 1,000 x 16,000 characters (a 31.5 MB answer).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.run_all import ROOT, serve
from reranker_server.model_generator import write_test_models

Probe = tuple[str, str, Callable[[argparse.Namespace], bytes]]


def _json(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()


PROBES: list[Probe] = [
    (
        "5,000 pairs",
        "/v1/score",
        lambda a: _json({"text_1": ["q"] * 5000, "text_2": ["a"] * 5000}),
    ),
    (
        "huge pairs body",
        "/v1/score",
        lambda a: _json({"text_1": ["q"] * a.huge_pairs, "text_2": ["a"] * a.huge_pairs}),
    ),
    ("surrogate /score", "/score", lambda a: _json({"text_1": "q", "text_2": ["a", "\udfff"]})),
    (
        "surrogate /v1/score pairs",
        "/v1/score",
        lambda a: _json({"text_1": ["q", "q\udfff"], "text_2": ["a", "b"]}),
    ),
    ("empty text_1", "/score", lambda a: _json({"text_1": "", "text_2": ["a"]})),
    ("text_1[1] empty", "/score", lambda a: _json({"text_1": ["q", ""], "text_2": ["a", "b"]})),
    (
        "text_2[1] too long",
        "/score",
        lambda a: _json({"text_1": ["q", "q"], "text_2": ["a", "b" * 30_000]}),
    ),
    ("text_2[0] a number", "/score", lambda a: _json({"text_1": "q", "text_2": [1]})),
    (
        "batch item's model",
        "/rerank/batch",
        lambda a: _json(
            {
                "requests": [
                    {"query": "q", "documents": ["a"]},
                    {"query": "q", "documents": ["a"], "model": "nope"},
                ]
            }
        ),
    ),
    (
        "1 MB model name",
        "/rerank",
        lambda a: _json({"query": "q", "documents": ["a"], "model": "m" * 1_000_000}),
    ),
    (
        "return_documents 1,000 x 16,000",
        "/rerank",
        lambda a: _json(
            {"query": "q", "documents": ["x" * 16_000] * 1000, "return_documents": True}
        ),
    ),
]


def probe(url: str, pid: int, path: str, raw: bytes, timeout: float) -> str:
    server = psutil.Process(pid)
    rss = server.memory_info().rss
    started = time.perf_counter()
    try:
        response = httpx.post(
            f"{url}{path}",
            content=raw,
            headers={"Content-Type": "application/json"},
            timeout=timeout,
        )
    except httpx.TimeoutException:
        grown = (server.memory_info().rss - rss) / 2**20
        return f"no answer: client timeout | {timeout:g} s | | {grown:+.0f} MiB"
    except httpx.HTTPError as exc:  # e.g. a header line over h11's limit
        seconds = time.perf_counter() - started
        grown = (server.memory_info().rss - rss) / 2**20
        return f"unreadable: {type(exc).__name__} ({exc}) | {seconds:.1f} s | | {grown:+.0f} MiB"
    seconds = time.perf_counter() - started
    grown = (server.memory_info().rss - rss) / 2**20
    try:
        field = response.json().get("field") if response.status_code >= 400 else ""
    except ValueError:
        field = "(not JSON)"
    return (
        f"{response.status_code} `{field or ''}` | {_duration(seconds)} | "
        f"{len(response.content):,} B | {grown:+.0f} MiB"
    )


def _duration(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"


def run(root: Path, models: Path, args: argparse.Namespace) -> list[str]:
    env = {"RERANKER_STAGE2_ON_CPU": "true", "RERANKER_ACCEPTED_MODELS": "rerank-v3.5"}
    env["RERANKER_REQUEST_TIMEOUT_S"] = "120"
    results = []
    with serve("this", models, env, root=root) as (url, pid):
        for name, path, make in PROBES:
            results.append(probe(url, pid, path, make(args), args.timeout))
            print(f"  {root.name}: {name}: {results[-1]}", file=sys.stderr)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="bfcc69e", help="revision before the change")
    parser.add_argument("--models", type=Path, help="make-test-models directory (default: tiny)")
    parser.add_argument("--huge-pairs", type=int, default=1_500_000)
    parser.add_argument("--timeout", type=float, default=150.0, help="client timeout, seconds")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        models = args.models
        if models is None:
            models = Path(tmp) / "models"
            write_test_models(models)
        base = Path(tmp) / "base"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(base), args.base], cwd=ROOT, check=True
        )
        try:
            before = run(base, models, args)
            after = run(ROOT, models, args)
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=False
            )
    columns = "status `field` | time | answer | RSS"
    print(f"| probe | route | before: {columns} | after: {columns} |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (name, path, _), old, new in zip(PROBES, before, after, strict=True):
        print(f"| {name} | `{path}` | {old} | {new} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
