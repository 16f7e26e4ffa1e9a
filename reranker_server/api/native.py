"""The native dialect: `POST /rerank {query, documents, top_k}`.

The same route also reads TEI's shape (a body with `texts`, answered by api/tei.py) and the
Cohere-like bodies Jina-style clients send here (`top_n`, object documents, `return_documents`).
Results carry Cohere's `relevance_score` (and `document` when asked) beside the native fields.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body
from pydantic import Discriminator, Tag

from ..engine.cascade import Engine
from ..errors import InvalidRequestError
from ..settings import Settings
from ..types import RerankOutcome
from .auth import API_KEY_REQUIRED
from .deps import EngineDep, PoolDep, SettingsDep
from .long_documents import long_doc_policy
from .ranking import (
    RankJob,
    check_model,
    document_texts,
    new_id,
    rank,
    result_count,
    returned_document,
    served_model,
    usage,
)
from .schemas import (
    ERROR_RESPONSES,
    NATIVE_SHAPE,
    SPEC_EXAMPLE,
    TEI_SHAPE,
    RerankRequest,
    RerankResponse,
    RerankResult,
    ScoredWindow,
    StageInfo,
)
from .tei import TEI_EXAMPLE, TeiRank, TeiRerankRequest, answer_tei

router = APIRouter(tags=["rerank"], dependencies=API_KEY_REQUIRED)


def _body_shape(body: Any) -> str:
    return TEI_SHAPE if isinstance(body, dict) and "texts" in body else NATIVE_SHAPE


RerankBody = Annotated[
    Annotated[RerankRequest, Tag(NATIVE_SHAPE)] | Annotated[TeiRerankRequest, Tag(TEI_SHAPE)],
    Discriminator(_body_shape),
    Body(
        openapi_examples={
            "native": {"summary": "native", "value": SPEC_EXAMPLE},
            "cohere-like": {
                "summary": "Cohere-like (Jina, Open WebUI, Dify, RAGFlow)",
                "value": {
                    "model": "rerank-v3.5",
                    "query": SPEC_EXAMPLE["query"],
                    "documents": SPEC_EXAMPLE["documents"],
                    "top_n": None,
                    "return_documents": "true",
                },
            },
            "tei": {"summary": "TEI (a body with texts)", "value": TEI_EXAMPLE},
        }
    ),
]


@router.post(
    "/rerank",
    response_model=RerankResponse | list[TeiRank],
    responses=ERROR_RESPONSES,
    summary="Rerank (native; also TEI and Cohere-like bodies)",
)
async def rerank(
    body: RerankBody, engine: EngineDep, pool: PoolDep, settings: SettingsDep
) -> RerankResponse | list[TeiRank]:
    """Order `documents` by relevance to `query`; return the best `top_k`, best first.

    A body with `texts` is read as TEI's and answered with TEI's bare list of every text.
    """
    if isinstance(body, TeiRerankRequest):
        return await answer_tei(body, engine, pool, settings)
    check_model(body.model, engine, settings)
    job = native_job(body, settings)
    outcome = await rank(job, engine, pool, settings)
    return to_native(outcome, engine, body)


def native_job(body: RerankRequest, settings: Settings, prefix: str = "") -> RankJob:
    """The engine's work for a native request; `prefix` locates it inside a batch."""
    texts = document_texts(body.documents, body.rank_fields, f"{prefix}documents")
    given = body.model_fields_set
    if body.top_k is not None:
        top_k = body.top_k
    elif "top_k" not in given and "top_n" not in given:
        raise InvalidRequestError(
            f"{prefix}top_k is required (an integer >= 1; or send top_n, where null or 0 = all "
            "documents)",
            field=f"{prefix}top_k",
        )
    else:
        top_k = result_count(body.top_n, len(texts))
    policy = long_doc_policy(
        settings,
        mode=body.long_documents,
        max_chunks=body.max_chunks_per_doc,
        max_tokens=body.max_tokens_per_doc,
        direction=body.truncation_direction,
        documents=len(texts),
        prefix=prefix,
        documents_field=f"{prefix}documents",
    )
    return RankJob(
        body.query,
        texts,
        min(top_k, len(texts)),
        query_field=f"{prefix}query",
        documents_field=f"{prefix}documents",
        policy=policy,
    )


def to_native(outcome: RerankOutcome, engine: Engine, body: RerankRequest) -> RerankResponse:
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
            )
            for r in outcome.results
        ],
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
        id=new_id(),
        model=served_model(outcome, engine),
        usage=usage(outcome, len(body.documents)),
    )
