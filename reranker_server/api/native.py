"""The native dialect: `POST /rerank {query, documents, top_k}`."""

from __future__ import annotations

from fastapi import APIRouter

from ..types import RerankOutcome
from .deps import EngineDep, PoolDep, SettingsDep
from .limits import check_rerank_input
from .schemas import ErrorResponse, RerankRequest, RerankResponse, RerankResult, StageInfo

router = APIRouter(tags=["rerank"])

ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorResponse} for code in (400, 413, 415, 422, 429, 500, 503)
}


@router.post("/rerank", response_model=RerankResponse, responses=ERROR_RESPONSES)
async def rerank(
    body: RerankRequest, engine: EngineDep, pool: PoolDep, settings: SettingsDep
) -> RerankResponse:
    """Order `documents` by relevance to `query`; return the best `top_k`, best first."""
    check_rerank_input(body.query, body.documents, settings)
    outcome = await pool.run(lambda: engine.rerank(body.query, body.documents, body.top_k))
    return to_native(outcome)


def to_native(outcome: RerankOutcome) -> RerankResponse:
    return RerankResponse(
        results=[RerankResult(index=r.index, text=r.text, score=r.score) for r in outcome.results],
        backend=outcome.backend,
        fallback=outcome.fallback,
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
    )
