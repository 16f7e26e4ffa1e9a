"""`reranker-server eval DATA_DIR`: the command's flags and what it does with them."""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import AbstractContextManager
from pathlib import Path

from ..settings import Settings
from . import EvalError
from .data import load_dataset
from .report import as_json, svg, table
from .runner import Progress, Target, evaluate, in_process_target, parse_depths, remote_target

DESCRIPTION = """Measure the cascade on a labelled set: NDCG@10, MRR@10, Recall@top_k, p50/p95
latency and CPU seconds per query, for stage 1 alone and for each candidates depth. DATA_DIR is a
BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv; candidates from --run or from BM25)
or a .jsonl file of {"query", "documents", "relevant"} lines. Without --url the server runs
in-process, configured by the setting flags after the eval flags and RERANKER_* variables."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.add_argument("data", type=Path, metavar="DATA_DIR", help="BEIR folder or .jsonl file")
    parser.add_argument("--url", help="a running server (default: start one in-process)")
    parser.add_argument(
        "--api-key",
        dest="eval_api_key",
        metavar="KEY",
        default=os.environ.get("RERANKER_API_KEY"),
        help="the server's key with --url [env RERANKER_API_KEY]",
    )
    parser.add_argument("--split", default="test", help="qrels/<split>.tsv (default test)")
    parser.add_argument(
        "--run", type=Path, metavar="FILE", help="TREC run file with each query's candidates"
    )
    parser.add_argument(
        "--top-n",
        type=int,
        default=100,
        metavar="N",
        help="candidates per query from the run or BM25 (100)",
    )
    parser.add_argument(
        "--depths",
        default="5,10,20,50,all",
        metavar="LIST",
        help="candidates depths to try (5,10,20,50,all)",
    )
    parser.add_argument(
        "--top-k", dest="eval_top_k", type=int, default=10, metavar="K", help="Recall@K (10)"
    )
    parser.add_argument(
        "--models", metavar="A,B", help="cascades to compare, a,b (sent as `model`)"
    )
    parser.add_argument(
        "--max-queries", type=int, metavar="N", help="evaluate only the first N queries"
    )
    parser.add_argument(
        "--timeout", type=float, default=130.0, metavar="S", help="seconds per request"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--plot", type=Path, metavar="FILE.svg", help="write an SVG chart")


def run(args: argparse.Namespace, settings: Settings | None) -> int:
    """Run the evaluation; an EvalError is one line on stderr and exit status 1."""
    try:
        return _run(args, settings)
    except EvalError as exc:
        print(f"reranker-server eval: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace, settings: Settings | None) -> int:
    if args.plot is not None and args.plot.suffix.lower() != ".svg":
        raise EvalError(f"--plot {args.plot}: the chart is SVG; name the file .svg")
    if args.plot is not None and not args.plot.resolve().parent.is_dir():
        raise EvalError(f"--plot {args.plot}: folder {args.plot.parent} does not exist")
    if args.top_n < 1 or args.eval_top_k < 1:
        raise EvalError("--top-n and --top-k must be >= 1")
    depths = parse_depths(args.depths)
    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else [None]
    dataset = load_dataset(
        args.data,
        split=args.split,
        run_file=args.run,
        top_n=args.top_n,
        max_queries=args.max_queries,
    )
    progress = Progress()
    progress.note(f"{len(dataset.queries)} queries; candidates: {dataset.source}")
    target: AbstractContextManager[Target]
    if args.url:
        target = remote_target(args.url.rstrip("/"), args.eval_api_key, args.timeout)
    else:
        progress.note("loading the models in-process (use --url for a running server)")
        target = in_process_target(settings or Settings(), args.timeout)
    with target as server:
        result = evaluate(
            server,
            dataset,
            depths=depths,
            top_k=args.eval_top_k,
            models=models,
            progress=progress,
        )
    if args.plot is not None:
        try:
            args.plot.write_text(svg(result), encoding="utf-8")
        except OSError as exc:
            raise EvalError(f"--plot {args.plot}: {exc.strerror}") from None
        progress.note(f"chart written to {args.plot}")
    print(json.dumps(as_json(result), indent=2) if args.json else table(result))
    return 0
