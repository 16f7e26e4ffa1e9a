"""`POST /rerank/batch`: several native requests in one call, answered in order.

The whole batch is one unit of work for the engine (one queue slot, one worker run), not a loop of
single requests. Any invalid item fails the batch with a 422 that names it (`requests[2].top_k`).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from ..errors import InvalidRequestError
from .auth import API_KEY_REQUIRED
from .deps import EngineDep, PoolDep, SettingsDep
from .native import native_job, to_native
from .ranking import check_model, new_id, rank_many
from .schemas import (
    ERROR_RESPONSES,
    SPEC_EXAMPLE,
    ModelName,
    RerankRequest,
    RerankResponse,
    fail_fast,
)

router = APIRouter(tags=["batch"], dependencies=API_KEY_REQUIRED)

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


@router.post("/rerank/batch", response_model=BatchRerankResponse, responses=ERROR_RESPONSES)
async def rerank_batch(
    body: BatchRerankRequest, engine: EngineDep, pool: PoolDep, settings: SettingsDep
) -> BatchRerankResponse:
    """Rerank several queries' documents in one call; the answers come back in request order."""
    if len(body.requests) > settings.max_batch_requests:
        raise InvalidRequestError(
            f"requests has {len(body.requests)} items; the limit is "
            f"{settings.max_batch_requests} (max_batch_requests)",
            field="requests",
        )
    check_model(body.model, engine, settings)
    for item in body.requests:
        check_model(item.model, engine, settings)
    jobs = [native_job(item, settings, f"requests[{i}].") for i, item in enumerate(body.requests)]
    outcomes = await rank_many(jobs, engine, pool, settings)
    return BatchRerankResponse(
        id=new_id(),
        responses=[
            to_native(outcome, engine, item)
            for outcome, item in zip(outcomes, body.requests, strict=True)
        ],
    )
