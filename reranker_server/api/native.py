"""The native dialect: `POST /rerank {query, documents, top_k}` and `POST /rerank/batch`.

Also what Jina-style clients send to `/rerank` (`top_n`, object documents, `return_documents`):
results carry Cohere's `relevance_score` (and `document` when asked) beside the native fields.
A batch is several native requests answered as one unit of work; an invalid item fails the batch
with a 422 that names it (`requests[2].top_k`).
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from ..errors import InvalidRequestError
from ..settings import Settings
from ..types import RerankJob, RerankOutcome, RerankWork
from .answer import (
    answer_bytes,
    document_texts,
    json_bytes,
    new_id,
    ranked_bytes,
    result_count,
    returned_document,
    usage,
)
from .long_documents import long_doc_policy
from .schemas import (
    SPEC_EXAMPLE,
    ModelName,
    RerankRequest,
    RerankResponse,
    RerankResult,
    ScoredWindow,
    StageInfo,
    fail_fast,
)

NAME = "native"


def to_job(body: RerankRequest, settings: Settings) -> RerankJob:
    """The engine's work for a native request."""
    texts = document_texts(body.documents, body.rank_fields)
    # top_k wins; else top_n as clients mean it; neither (vLLM, Infinity, LiteLLM): all
    top_k = body.top_k if body.top_k is not None else result_count(body.top_n, len(texts))
    policy = long_doc_policy(
        settings,
        mode=body.long_documents,
        max_chunks=body.max_chunks_per_doc,
        max_tokens=body.max_tokens_per_doc,
        direction=body.truncation_direction,
        documents=len(texts),
    )
    return RerankJob(
        body.query,
        texts,
        min(top_k, len(texts)),
        candidates=body.candidates,
        policy=policy,
        model=body.model,
    )


def to_work(body: RerankRequest, settings: Settings) -> RerankWork:
    """The request's work: one job, its totals, and the size of its answer."""
    return RerankWork(
        documents=len(body.documents),
        queries=1,
        answer_bytes=answer_size(body),
        build=lambda: [to_job(body, settings)],
        answer_field="return_documents" if body.return_documents else "documents",
        model=body.model,
    )


def answer_size(body: RerankRequest) -> int:
    """The most bytes the answer can take: each result echoes its text (twice with
    return_window) and, with return_documents, the document as sent."""
    count = len(body.documents)
    results = min(body.top_k if body.top_k is not None else result_count(body.top_n, count), count)
    texts = 2 if body.return_window else 1
    echoes = (
        texts * ranked_bytes(doc, body.rank_fields)
        + (json_bytes(returned_document(doc)) if body.return_documents else 0)
        for doc in body.documents
    )
    return answer_bytes(echoes, results)


def from_outcome(outcome: RerankOutcome, body: RerankRequest, model: str) -> RerankResponse:
    stages = bool(body.return_stages)
    return RerankResponse(
        results=[
            RerankResult(
                index=r.index,
                text=r.text,
                score=r.score,
                relevance_score=r.score,
                document=returned_document(body.documents[r.index])
                if body.return_documents
                else None,
                window=ScoredWindow(
                    start=r.window[0], end=r.window[1], text=r.text[slice(*r.window)]
                )
                if body.return_window and r.window is not None
                else None,
                stage1_score=r.stage1_score if stages else None,
                stage1_rank=r.stage1_rank if stages else None,
            )
            for r in outcome.results
        ],
        backend=outcome.backend,
        fallback=outcome.fallback,
        plan=outcome.plan if outcome.plan_chosen else None,
        plan_reason=outcome.plan_reason if outcome.plan_chosen else None,
        stages=[
            StageInfo(
                name=s.name,
                device=s.device,
                documents=s.documents,
                seconds=round(s.seconds, 6),
                cached=s.cached,
            )
            for s in outcome.stages
        ],
        id=new_id(),
        model=model,
        usage=usage(outcome, len(body.documents)),
    )


# --- batch

BATCH_NAME = "batch"

BATCH_EXAMPLE: dict[str, Any] = {
    "requests": [
        SPEC_EXAMPLE,
        {"query": "Where is the Eiffel Tower?", "documents": SPEC_EXAMPLE["documents"], "top_k": 1},
    ]
}


class BatchRerankRequest(BaseModel):
    """Several native rerank requests (each `{query, documents, top_k}`)."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [BATCH_EXAMPLE]})

    requests: Annotated[list[RerankRequest], fail_fast(dict, what="an object")] = Field(
        ..., description="Answered in this order. At most max_batch_requests."
    )
    model: ModelName


class BatchRerankResponse(BaseModel):
    id: str
    responses: list[RerankResponse] = Field(..., description="One per request, in order.")


def batch_to_work(body: BatchRerankRequest, settings: Settings) -> RerankWork:
    """The batch's work: one job per item, each on its own model (else the batch's); errors name
    the item (`requests[2].top_k`, `requests[1].model`)."""
    items = body.requests

    def build() -> list[RerankJob]:
        jobs = []
        for i, item in enumerate(items):
            try:  # an item's own model, else the batch's
                job = to_job(item, settings)
            except InvalidRequestError as exc:
                raise exc.renamed(item_fields(i, item)) from exc
            jobs.append(dataclasses.replace(job, model=item.model or body.model))
        return jobs

    return RerankWork(
        documents=sum(len(item.documents) for item in items),
        queries=len(items),
        answer_bytes=sum(answer_size(item) for item in items),
        build=build,
        fields=lambda i: item_fields(i, items[i]),
        documents_field="requests",
        answer_field="requests",
        model=body.model,
        batch=True,
    )


def item_fields(position: int, item: RerankRequest) -> dict[str, str]:
    """How errors name the fields of the batch's item at `position`; a job's `model` is the
    item's own, else the batch's."""
    names = {name: f"requests[{position}].{name}" for name in RerankRequest.model_fields}
    if item.model is None:
        names["model"] = "model"
    return names


def batch_from_outcomes(
    outcomes: list[RerankOutcome], body: BatchRerankRequest, models: list[str]
) -> BatchRerankResponse:
    return BatchRerankResponse(
        id=new_id(),
        responses=[
            from_outcome(outcome, item, model)
            for outcome, item, model in zip(outcomes, body.requests, models, strict=True)
        ],
    )
