"""vLLM's score API and the OpenAI model list.

`POST /score` and `/v1/score`: `{model?, text_1: str | [str], text_2: str | [str]}`. One query
(`text_1` a string or a one-item list) against every `text_2`, or pairs (`text_1` and `text_2` of
the same length). Answer: `{id, object: "list", created, model, data: [{index, object: "score",
score}], usage}` with `data` in `text_2`'s order. Every text is scored by the whole cascade (all
documents go to stage 2), so a score here equals the score `/rerank` gives with `top_n` = all.

`GET /v1/models`: the names this server answers to, in OpenAI's list shape.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr

from ..errors import InvalidRequestError
from ..types import RerankJob, RerankOutcome
from .answer import new_id
from .schemas import ModelName, fail_fast

NAME = "vllm"

SCORE_EXAMPLE: dict[str, Any] = {
    "model": "cross-encoder/ms-marco-MiniLM-L-6-v2",
    "text_1": "What is the capital of France?",
    "text_2": ["Paris is the capital of France.", "Berlin is the capital of Germany."],
}

Texts1 = Annotated[
    StrictStr | Annotated[list[StrictStr], fail_fast(str, what="a string")], Field(...)
]


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [SCORE_EXAMPLE]})

    model: ModelName
    text_1: Texts1 = Field(..., description="The query, or one query per text_2 item.")
    text_2: Texts1 = Field(..., description="The texts to score against text_1.")


class ScoreData(BaseModel):
    index: int
    object: Literal["score"] = "score"
    score: float


class ScoreUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class ScoreResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ScoreData]
    usage: ScoreUsage


def to_jobs(body: ScoreRequest) -> list[RerankJob]:
    """One job per distinct query, each scoring all of its texts (no top-k cut)."""
    queries = [body.text_1] if isinstance(body.text_1, str) else body.text_1
    texts = [body.text_2] if isinstance(body.text_2, str) else body.text_2
    if len(queries) == 1:
        return [RerankJob(queries[0], texts, len(texts), model=body.model)]
    if len(queries) != len(texts):
        raise InvalidRequestError(
            f"text_1 has {len(queries)} items and text_2 {len(texts)}; send one text_1, or "
            "one per text_2",
            field="text_1",
        )
    return [
        RerankJob(query, [text], 1, model=body.model)
        for query, text in zip(queries, texts, strict=True)
    ]


def from_outcomes(outcomes: list[RerankOutcome], model: str) -> ScoreResponse:
    if len(outcomes) == 1:
        scores = {r.index: r.score for r in outcomes[0].results}
        data = [ScoreData(index=i, score=scores[i]) for i in sorted(scores)]
    else:
        data = [ScoreData(index=i, score=o.results[0].score) for i, o in enumerate(outcomes)]
    tokens = sum(o.pair_tokens for o in outcomes)
    return ScoreResponse(
        id=f"score-{new_id()}",
        created=int(time.time()),
        model=model,
        data=data,
        usage=ScoreUsage(prompt_tokens=tokens, total_tokens=tokens),
    )


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "reranker-server"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def model_list(names: list[str]) -> ModelList:
    now = int(time.time())
    return ModelList(data=[ModelCard(id=name, created=now) for name in names])
