"""What every dialect shares: documents -> texts, `top_n` -> a count, the answer's size, usage
figures, and the one answer path from a dialect's work through the service.

A dialect module is three parts: its request model, `to_work(body, settings)` (a `RerankWork`:
the request's totals, how to build its jobs and how its fields are named) and
`from_outcome(outcome, body, model)`; api/routes.py joins them with `answer` below. The service
admits the work as a whole (admission.py) before any job runs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import json
import math
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Request
from starlette.types import Receive

from ..errors import InvalidRequestError, RequestCancelledError
from ..service import RerankService
from ..types import Cancellation, RerankJob, RerankOutcome, RerankWork
from .schemas import Usage
from .telemetry import Answered, cache_wanted, record_answer

# raw_scores: logit(p) with p kept this far from 0 and 1 (|logit| <= 20.7).
LOGIT_EPSILON = 1e-9
# A server whose receive() answers at once after the body (not uvicorn) is asked this often.
DISCONNECT_POLL_S = 0.1
CLIENT_CLOSED = "client closed the connection"
# What one result of an answer takes in JSON besides the texts it echoes, at most about this
# (index, scores, stage figures, separators).
RESULT_BYTES = 160
# What an answer takes besides its results (id, model, usage, stages).
ANSWER_BYTES = 1024


async def answer(
    request: Request, service: RerankService, dialect: str, work: RerankWork
) -> list[RerankOutcome]:
    """Run a request's work through the service: admitted as a whole, then its jobs as one unit
    of work; the outcomes in the jobs' order.

    `dialect` labels the request in metrics and logs. The request's cache opt-out
    (`Cache-Control: no-cache`, `X-Reranker-Cache: off`) goes into the jobs. When the client
    disconnects before the answer is ready the jobs are cancelled (their queued pairs are
    dropped) and the request ends as `RequestCancelledError` (499). The jobs and their outcomes
    are handed to the telemetry middleware (`Answered`: headers, metrics, the log line).
    """
    record_answer(request.scope, Answered(dialect))
    use_cache = cache_wanted({k.lower(): v for k, v in request.headers.items()})
    cancel = Cancellation()
    build = work.build
    jobs: list[RerankJob] = []  # as the service builds them, once their totals pass

    def built() -> list[RerankJob]:
        jobs[:] = [dataclasses.replace(j, use_cache=use_cache, cancel=cancel) for j in build()]
        return jobs

    work = dataclasses.replace(work, build=built)
    async with cancelled_on_disconnect(request.receive, cancel):
        outcomes = await service.answer(work)
    if cancel.reason == CLIENT_CLOSED:  # it left while the last pairs ran: nobody reads this
        raise RequestCancelledError(f"request cancelled: {CLIENT_CLOSED}")
    record_answer(request.scope, Answered(dialect, tuple(jobs), tuple(outcomes)))
    return outcomes


@asynccontextmanager
async def cancelled_on_disconnect(receive: Receive, cancel: Cancellation) -> AsyncIterator[None]:
    """Set `cancel` if the client disconnects while the block runs.

    Starlette does not stop a handler whose client went away; once the body has been read, the
    ASGI server's next `receive()` message is `http.disconnect` when the connection closes.
    """

    async def watch() -> None:
        while True:
            try:
                message = await receive()
            except Exception:  # a server that can't say: no watching, the request runs on
                return
            if message["type"] == "http.disconnect":
                cancel.cancel(CLIENT_CLOSED)
                return
            await asyncio.sleep(DISCONNECT_POLL_S)

    watcher = asyncio.create_task(watch())
    try:
        yield
    finally:
        watcher.cancel()


def document_texts(
    documents: Sequence[str | dict[str, Any]],
    rank_fields: Sequence[str] | None,
    field: str = "documents",
) -> list[str]:
    """The text ranked for each document: a string as is, an object's `rank_fields` (default
    `text`); with several fields, one "key: value" line per field present."""
    keys = list(rank_fields) if rank_fields else ["text"]
    texts = []
    for i, doc in enumerate(documents):
        if isinstance(doc, str):
            texts.append(doc)
            continue
        present = [key for key in keys if doc.get(key) is not None]
        if not present:
            wanted = " or ".join(repr(k) for k in keys)
            raise InvalidRequestError(
                f"{field}[{i}] is an object without a {wanted} field (set rank_fields to rank "
                "other fields)",
                field=f"{field}[{i}]",
            )
        if len(keys) == 1:
            texts.append(_as_text(doc[present[0]]))
        else:
            texts.append("\n".join(f"{key}: {_as_text(doc[key])}" for key in present))
    return texts


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def json_bytes(value: Any) -> int:
    """The bytes `value` takes in an answer's JSON (UTF-8, escapes included)."""
    return len(json.dumps(value, ensure_ascii=False).encode("utf-8"))


def ranked_bytes(doc: str | dict[str, Any], rank_fields: Sequence[str] | None) -> int:
    """About the bytes of the text ranked for `doc` (see `document_texts`), in JSON."""
    if isinstance(doc, str):
        return json_bytes(doc)
    keys = rank_fields or ["text"]
    return sum(json_bytes(doc[k]) + len(k) + 3 for k in keys if doc.get(k) is not None)


def answer_bytes(echoes: Iterable[int], results: int) -> int:
    """The most bytes an answer of `results` results can take, each result echoing one document
    whose echo takes `echoes[i]` bytes (which documents come back is known only after scoring:
    the largest ones count)."""
    return ANSWER_BYTES + results * RESULT_BYTES + sum(heapq.nlargest(results, echoes))


def returned_document(doc: str | dict[str, Any]) -> dict[str, Any]:
    """What `return_documents` gives back: `{"text": ...}` for a string, an object as sent."""
    return {"text": doc} if isinstance(doc, str) else doc


def result_count(top_n: int | None, documents: int) -> int:
    """`top_n` as clients mean it: null, 0 or more than the documents = all of them."""
    if not top_n or top_n > documents:
        return documents
    return top_n


def usage(outcome: RerankOutcome, documents: int) -> Usage:
    """The `usage` of an answer: documents, Cohere's search units, tokens ranked."""
    return Usage(
        documents=documents,
        search_units=search_units(documents),
        total_tokens=outcome.pair_tokens,
        prompt_tokens=outcome.pair_tokens,
    )


def search_units(documents: int) -> int:
    """Cohere's billing unit: one query with up to 100 documents."""
    return max(1, math.ceil(documents / 100))


def new_id() -> str:
    return str(uuid.uuid4())


def logit(score: float) -> float:
    """The raw logit behind a sigmoid score (what TEI's `raw_scores` returns)."""
    p = min(max(score, LOGIT_EPSILON), 1.0 - LOGIT_EPSILON)
    return math.log(p / (1.0 - p))
