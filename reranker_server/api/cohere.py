"""Cohere's dialect: `POST /v1/rerank` and `POST /v2/rerank`.

What the cohere SDK's `Client` (v1) and `ClientV2` send, and what Jina-style clients (Open WebUI,
Dify, RAGFlow) send to `/v1/rerank`. Read leniently: unknown fields are ignored, null means the
default, `top_n` null/0/too large means all documents, booleans may be strings.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr

from ..settings import Settings
from ..types import RerankJob, RerankOutcome, RerankWork
from .answer import (
    answer_bytes,
    document_texts,
    json_bytes,
    new_id,
    result_count,
    returned_document,
    search_units,
    usage,
)
from .long_documents import MaxChunksPerDoc, MaxTokensPerDoc, long_doc_policy
from .schemas import Documents, ModelName, RankFields, ReturnDocuments, TopN, Usage

NAME = "cohere"

COHERE_EXAMPLE: dict[str, Any] = {
    "model": "rerank-v3.5",
    "query": "What is the capital of France?",
    "documents": [
        "Paris is the capital and most populous city of France.",
        "Berlin is the capital of Germany.",
    ],
    "top_n": 1,
}


class CohereRerankRequest(BaseModel):
    """Cohere's rerank body (v1 and v2; both accept strings or objects as documents)."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [COHERE_EXAMPLE]})

    model: ModelName
    query: StrictStr = Field(..., min_length=1, description="The search query (not empty).")
    documents: Documents = Field(..., description="Strings, or objects with `text`.")
    top_n: TopN
    rank_fields: RankFields
    return_documents: ReturnDocuments
    max_chunks_per_doc: MaxChunksPerDoc
    max_tokens_per_doc: MaxTokensPerDoc
    priority: int | None = Field(None, description="Accepted and ignored.")


class CohereResult(BaseModel):
    index: int = Field(..., description="The document's position in the request.")
    relevance_score: float = Field(..., ge=0.0, le=1.0)
    document: dict[str, Any] | None = Field(
        None,
        exclude_if=lambda v: v is None,
        description="Only with return_documents: `{text}` for a string, an object as sent.",
    )


class ApiVersion(BaseModel):
    version: Literal["1", "2"]


class BilledUnits(BaseModel):
    search_units: int


class MetaTokens(BaseModel):
    input_tokens: int = Field(..., description="Tokens ranked (usage.total_tokens).")
    output_tokens: int = 0


class CohereMeta(BaseModel):
    api_version: ApiVersion
    billed_units: BilledUnits
    tokens: MetaTokens


class CohereRerankResponse(BaseModel):
    """Results best first, exactly `min(top_n, len(documents))` of them."""

    id: str
    model: str = Field(..., description="The model that produced the final order.")
    results: list[CohereResult]
    meta: CohereMeta
    usage: Usage


def to_job(body: CohereRerankRequest, settings: Settings) -> RerankJob:
    texts = document_texts(body.documents, body.rank_fields)
    policy = long_doc_policy(
        settings,
        max_chunks=body.max_chunks_per_doc,
        max_tokens=body.max_tokens_per_doc,
        documents=len(texts),
    )
    return RerankJob(
        body.query, texts, result_count(body.top_n, len(texts)), policy=policy, model=body.model
    )


def to_work(body: CohereRerankRequest, settings: Settings) -> RerankWork:
    """The request's work: one job; its answer echoes the documents with return_documents."""
    count = len(body.documents)
    echoes = (
        (json_bytes(returned_document(doc)) for doc in body.documents)
        if body.return_documents
        else ()
    )
    return RerankWork(
        documents=count,
        queries=1,
        answer_bytes=answer_bytes(echoes, result_count(body.top_n, count)),
        build=lambda: [to_job(body, settings)],
        answer_field="return_documents",
        model=body.model,
    )


def from_outcome(
    outcome: RerankOutcome,
    body: CohereRerankRequest,
    model: str,
    version: Literal["1", "2"] = "2",
) -> CohereRerankResponse:
    count = len(body.documents)
    return CohereRerankResponse(
        id=new_id(),
        model=model,
        results=[
            CohereResult(
                index=r.index,
                relevance_score=r.score,
                document=returned_document(body.documents[r.index])
                if body.return_documents
                else None,
            )
            for r in outcome.results
        ],
        meta=CohereMeta(
            api_version=ApiVersion(version=version),
            billed_units=BilledUnits(search_units=search_units(count)),
            tokens=MetaTokens(input_tokens=outcome.pair_tokens),
        ),
        usage=usage(outcome, count),
    )
