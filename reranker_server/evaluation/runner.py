"""Send every query at every depth to a server and measure quality, latency and CPU.

A *depth* is the request's `candidates`: how many of stage 1's best documents stage 2 reorders.
Each request asks for `top_k = candidates` (the API allows no more) and `return_stages`, so every
answer holds the stage-2 order of its candidates and each one's stage-1 rank. A query's ranking at
depth d is scored as a cascade would return it: the d reordered documents, then stage 1's next
ones (metrics.cascade_ranking); so the sweep needs stage 1's order of the top max(10, top_k), which
the deepest pass provides (a depth of max(10, top_k) is added when none reaches it).

*Stage 1 alone* cannot be asked for: the server always runs stage 2 when it can. Its quality comes
from the stage-1 ranks in the answers; its cost is measured with `candidates = top_k = 1`: stage 1
over every document plus one stage-2 pair, which cannot reorder anything (the server's floor).

Requests go one at a time (latency of an idle server) with `Cache-Control: no-cache`, so that no
depth is answered from scores an earlier depth computed. CPU seconds: the process's own CPU time
in-process (the server and this command: the client's share is small), or the server's
`process_cpu_seconds_total` from /metrics when it exports it (one worker's), else n/a.
"""

from __future__ import annotations

import logging
import re
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, TextIO

import httpx
import numpy as np

from ..client import ConnectionFailed, Ranking, RerankerClient, RerankerClientError
from ..settings import Settings
from . import EvalError
from .data import Dataset, EvalQuery
from .metrics import cascade_ranking, mrr_at, ndcg_at, recall_at

NDCG_MRR_AT = 10
STAGE1 = 0  # the depth of the "stage 1 alone" row
ALL = None  # the depth "every document of the query"
Depth = int | None

CPU_METRIC = re.compile(r"^process_cpu_seconds_total(?:\{[^}]*\})?\s+(\S+)", re.MULTILINE)


@dataclass(frozen=True)
class Target:
    """A server to evaluate: a client, and a reading of its CPU seconds (None: unknown)."""

    client: RerankerClient
    cpu_seconds: Callable[[], float | None]
    where: str


@dataclass
class Row:
    """One line of the report: a depth (or stage 1 alone) of one cascade."""

    label: str  # "stage 1", "5", ..., "all"
    depth: Depth  # STAGE1, a number of candidates, or ALL
    ndcg: float = 0.0
    mrr: float = 0.0
    recall: float = 0.0
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    cpu_s: float | None = None  # per query
    stage2: Counter[str] = field(default_factory=Counter)  # where stage 2 ran -> queries
    fallbacks: Counter[str] = field(default_factory=Counter)


@dataclass
class CascadeResult:
    model: str | None  # the `model` sent (None: the server's default)
    served: str  # the model the answers name
    stages: list[str]  # "name on device" per stage, from the first answer
    rows: list[Row]


@dataclass
class EvalResult:
    dataset: Dataset
    top_k: int
    where: str
    cascades: list[CascadeResult]
    notes: list[str] = field(default_factory=list)


def parse_depths(text: str) -> list[Depth]:
    """ "5,10,20,50,all" -> [5, 10, 20, 50, None]."""
    depths: list[Depth] = []
    for part in text.split(","):
        word = part.strip().lower()
        if word == "all":
            depths.append(ALL)
        elif word.isdigit() and int(word) >= 1:
            depths.append(int(word))
        else:
            raise EvalError(f"--depths: {part.strip()!r} is not a number >= 1 or 'all'")
    return sorted(set(depths), key=lambda d: float("inf") if d is None else d)


# --- targets


@contextmanager
def remote_target(url: str, api_key: str | None, timeout_s: float) -> Iterator[Target]:
    headers = {
        "Cache-Control": "no-cache",
        **({"Authorization": f"Bearer {api_key}"} if api_key else {}),
    }
    with httpx.Client(base_url=url, headers=headers, timeout=timeout_s) as http:
        client = RerankerClient(http_client=http)
        try:
            client.health()
        except ConnectionFailed as exc:
            raise EvalError(
                f"cannot reach {url} ({exc}): start the server (reranker-server serve) or fix --url"
            ) from None
        except RerankerClientError as exc:
            raise EvalError(f"{url}/health answered {exc}: is it a reranker-server?") from None
        yield Target(client, lambda: _scraped_cpu(http), url)


def _scraped_cpu(http: httpx.Client) -> float | None:
    try:
        response = http.get("/metrics")
    except httpx.HTTPError:
        return None
    found = CPU_METRIC.search(response.text) if response.status_code == 200 else None
    return float(found.group(1)) if found else None


@contextmanager
def in_process_target(settings: Settings, timeout_s: float) -> Iterator[Target]:
    """The app built from `settings`, served by uvicorn on a free 127.0.0.1 port in a thread of
    this process (its lifespan loads the models); CPU seconds are this process's."""
    import uvicorn

    from ..app import create_app

    app = _StartupWatch(create_app(settings))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = int(listener.getsockname()[1])
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on")
    server = uvicorn.Server(config)

    def serve() -> None:
        with suppress(SystemExit):  # uvicorn's answer to a failed startup; app.failure says why
            server.run(sockets=[listener])

    thread = threading.Thread(target=serve, daemon=True)
    logging.getLogger("uvicorn.error").setLevel(logging.CRITICAL)  # a failure is our one line
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                reason = (app.failure or "").strip().splitlines() or ["see the log above"]
                raise EvalError(f"the server could not start in-process: {reason[-1]}")
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}"
        with remote_target(url, settings.required_api_key(), timeout_s) as target:
            yield Target(target.client, time.process_time, f"in-process ({url})")
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        listener.close()


class _StartupWatch:
    """Passes an ASGI app through, keeping the message of a failed lifespan startup."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.failure: str | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def watch(message: Any) -> None:
            if message["type"] == "lifespan.startup.failed":
                self.failure = str(message.get("message", ""))
            await send(message)

        await self.app(scope, receive, watch)


# --- the sweep


class Progress:
    """`cascade default, depth 20: 37/100` on stderr; rewritten in place on a terminal."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()

    def note(self, text: str) -> None:
        print(f"eval: {text}", file=self.stream, flush=True)

    def step(self, what: str, done: int, total: int) -> None:
        if self.live:
            end = "\n" if done == total else ""
            print(f"\reval: {what}: {done}/{total}", end=end, file=self.stream, flush=True)
        elif done == total or done % max(1, total // 4) == 0:
            print(f"eval: {what}: {done}/{total}", file=self.stream, flush=True)


def evaluate(
    target: Target,
    dataset: Dataset,
    *,
    depths: Sequence[Depth],
    top_k: int = 10,
    models: Sequence[str | None] = (None,),
    progress: Progress | None = None,
) -> EvalResult:
    """Every query at stage 1 alone and at each depth, for each cascade in `models`."""
    progress = progress or Progress()
    needed = max(NDCG_MRR_AT, top_k)
    result = EvalResult(dataset, top_k, target.where, [])
    sweep = list(depths)
    if ALL not in sweep and max((d for d in sweep if d is not None), default=0) < needed:
        sweep.append(needed)
        result.notes.append(
            f"depth {needed} added: stage 1's top {needed} is needed to score NDCG@10 and "
            f"Recall@{top_k} at the shallower depths"
        )
        progress.note(result.notes[-1])
    for model in models:
        result.cascades.append(_cascade(target, dataset, sweep, top_k, model, progress))
    return result


def _cascade(
    target: Target,
    dataset: Dataset,
    depths: Sequence[Depth],
    top_k: int,
    model: str | None,
    progress: Progress,
) -> CascadeResult:
    name = model or "default"
    queries = [q for q in dataset.queries if q.doc_ids]
    if not queries:
        raise EvalError("no query has a candidate document: check the run file or the corpus")
    first = _ask(target, queries[0], min(NDCG_MRR_AT, len(queries[0].doc_ids)), model, "warm-up")
    cascade = CascadeResult(
        model, first.model, [f"{s.name} on {s.device}" for s in first.stages], []
    )
    progress.note(f"cascade {name}: {' -> '.join(cascade.stages)} ({target.where})")
    stage1_ranks: list[dict[int, int]] = [{} for _ in dataset.queries]  # rank -> position
    answers: dict[Depth, list[Ranking | None]] = {}
    for depth in [STAGE1, *depths]:
        label = _label(depth)
        row = Row(label, depth)
        latencies: list[float] = []
        cpu_before = target.cpu_seconds()
        per_query: list[Ranking | None] = []
        for done, query in enumerate(dataset.queries, start=1):
            ranking = None
            if query.doc_ids:  # a query with no candidate scores 0, unasked
                count = _candidates(depth, len(query.doc_ids))
                started = time.perf_counter()
                ranking = _ask(target, query, count, model, f"cascade {name}, {label}")
                latencies.append(time.perf_counter() - started)
                for result, stage1 in zip(ranking.results, ranking.stage1 or [], strict=True):
                    stage1_ranks[done - 1][stage1.rank] = result.index
                row.stage2[ranking.stages[1].device if len(ranking.stages) > 1 else "none"] += 1
                if ranking.fallback:
                    row.fallbacks[ranking.fallback] += 1
            per_query.append(ranking)
            progress.step(f"cascade {name}, {label}", done, len(dataset.queries))
        cpu_after = target.cpu_seconds()
        if cpu_before is not None and cpu_after is not None and latencies:
            row.cpu_s = (cpu_after - cpu_before) / len(latencies)
        if latencies:
            row.p50_ms, row.p95_ms = (float(v) * 1000 for v in np.percentile(latencies, [50, 95]))
        answers[depth] = per_query
        cascade.rows.append(row)
    _score_rows(cascade.rows, answers, dataset.queries, stage1_ranks, top_k)
    skipped = cascade.rows[-1]
    if skipped.stage2.get("none"):
        progress.note(
            f"cascade {name}: stage 2 did not run for {skipped.stage2['none']} queries "
            f"({', '.join(skipped.fallbacks)}): there every depth is stage 1's ranking; give the "
            "server a GPU or set RERANKER_STAGE2_ON_CPU=true"
        )
    return cascade


def _score_rows(
    rows: list[Row],
    answers: dict[Depth, list[Ranking | None]],
    queries: Sequence[EvalQuery],
    stage1_ranks: list[dict[int, int]],
    top_k: int,
) -> None:
    length = max(NDCG_MRR_AT, top_k)
    stage1 = [[ranks[r] for r in sorted(ranks)] for ranks in stage1_ranks]
    for row in rows:
        ndcg, mrr, recall = [], [], []
        for q, query in enumerate(queries):
            answer = answers[row.depth][q]
            reranked = [] if row.depth == STAGE1 or answer is None else answer.indices
            ids = [query.doc_ids[i] for i in cascade_ranking(reranked, stage1[q], length)]
            ndcg.append(ndcg_at(ids, query.qrels, NDCG_MRR_AT))
            mrr.append(mrr_at(ids, query.qrels, NDCG_MRR_AT))
            recall.append(recall_at(ids, query.qrels, top_k))
        row.ndcg, row.mrr, row.recall = (float(np.mean(v)) for v in (ndcg, mrr, recall))


def _ask(target: Target, query: EvalQuery, count: int, model: str | None, what: str) -> Ranking:
    """One request: the best `count` of the query's candidates after `count` go to stage 2."""
    try:
        ranking = target.client.rerank(
            query.text,
            query.texts,
            top_k=count,
            model=model,
            candidates=count,
            return_stages=True,
        )
    except ConnectionFailed as exc:
        raise EvalError(f"{what}: lost {target.where} ({exc})") from None
    except RerankerClientError as exc:
        raise EvalError(f"{what}: query {query.qid!r}: the server answered {exc}") from None
    if ranking.results and ranking.stage1 is None:
        raise EvalError(
            f"{target.where} ignored return_stages (no stage1_rank in its answers): it predates "
            "per-request candidates; upgrade the server"
        )
    return ranking


def _candidates(depth: Depth, documents: int) -> int:
    if depth == STAGE1:
        return 1
    return documents if depth is ALL else min(depth, documents)


def _label(depth: Depth) -> str:
    return "stage 1" if depth == STAGE1 else "all" if depth is ALL else str(depth)
