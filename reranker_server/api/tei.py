"""The TEI dialect (HF text-embeddings-inference): `POST /rerank {query, texts}` -> a bare list.

Served by the `/rerank` route (api/routes.py reads a body with `texts` as this shape). TEI answers
every text, best first (or the best `top_n`, which LiteLLM sends); `raw_scores` gives the logit
behind each score. `GET /info` describes the model in TEI's shape (Dify checks its `model_type`).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictStr

from ..settings import Settings
from ..types import LongDocMode, RerankJob, RerankOutcome, RerankWork
from .answer import answer_bytes, json_bytes, logit, result_count
from .long_documents import TruncationDirection, long_doc_policy
from .schemas import ModelName, Texts, TopN

NAME = "tei"

# TEI calls the documents `texts`.
FIELDS = {"documents": "texts"}


def _fields(_position: int) -> dict[str, str]:
    return FIELDS


TEI_EXAMPLE: dict[str, Any] = {
    "query": "What is the capital of France?",
    "texts": ["Berlin is the capital of Germany.", "Paris is the capital of France."],
    "return_text": True,
}


class TeiRerankRequest(BaseModel):
    """TEI's rerank body: every text comes back, best first."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [TEI_EXAMPLE]})

    query: StrictStr = Field(..., min_length=1, description="The search query (not empty).")
    texts: Texts = Field(..., description="Passages to rerank.")
    raw_scores: bool | None = Field(
        None, description="Scores as raw logits instead of sigmoid scores in [0, 1]."
    )
    return_text: bool | None = Field(None, description="Add each text to its result.")
    truncate: bool | None = Field(
        None,
        description="true: truncate texts too long for the model; false: score them in windows "
        "(the best one counts). Null: the server's default (long_documents).",
    )
    truncation_direction: TruncationDirection
    model: ModelName
    top_n: TopN  # not TEI's own, but LiteLLM's huggingface provider sends it


class TeiRank(BaseModel):
    index: int = Field(..., description="The text's position in the request.")
    score: float = Field(..., description="In [0, 1], or a logit with raw_scores.")
    text: str | None = Field(None, exclude_if=lambda v: v is None)


def to_job(body: TeiRerankRequest, settings: Settings) -> RerankJob:
    mode: LongDocMode | None = (
        None if body.truncate is None else ("truncate" if body.truncate else "chunk")
    )
    policy = long_doc_policy(settings, mode=mode, direction=body.truncation_direction)
    return RerankJob(
        body.query,
        body.texts,
        result_count(body.top_n, len(body.texts)),
        policy=policy,
        model=body.model,
    )


def to_work(body: TeiRerankRequest, settings: Settings) -> RerankWork:
    """The request's work: one job; its answer echoes the texts with return_text."""
    count = len(body.texts)
    echoes = (json_bytes(text) for text in body.texts) if body.return_text else ()
    return RerankWork(
        documents=count,
        queries=1,
        answer_bytes=answer_bytes(echoes, result_count(body.top_n, count)),
        build=lambda: [to_job(body, settings)],
        fields=_fields,
        documents_field="texts",
        answer_field="return_text",
        model=body.model,
    )


def from_outcome(outcome: RerankOutcome, body: TeiRerankRequest, model: str) -> list[TeiRank]:
    return [
        TeiRank(
            index=r.index,
            score=logit(r.score) if body.raw_scores else r.score,
            text=r.text if body.return_text else None,
        )
        for r in outcome.results
    ]


class TeiModelType(BaseModel):
    reranker: dict[str, Any] = Field(default_factory=dict)


class TeiInfo(BaseModel):
    """TEI's `GET /info` (the fields clients read)."""

    model_id: str
    model_sha: str | None = None
    model_dtype: str
    model_type: TeiModelType = Field(
        default_factory=TeiModelType, description="Always a reranker here."
    )
    max_concurrent_requests: int
    max_input_length: int
    max_batch_tokens: int
    max_batch_requests: int | None = None
    max_client_batch_size: int
    auto_truncate: bool = True
    tokenization_workers: int
    version: str


def info(model: str, precision: str, settings: Settings, version: str) -> TeiInfo:
    return TeiInfo(
        model_id=model,
        model_dtype=precision,
        max_concurrent_requests=settings.runs() + settings.max_queue,
        max_input_length=settings.max_length,
        max_batch_tokens=settings.stage1_batch_tokens,
        max_client_batch_size=settings.max_documents,
        tokenization_workers=settings.runs(),
        version=version,
    )
