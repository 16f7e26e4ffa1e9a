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

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, WithJsonSchema
from pydantic_core import PydanticCustomError

from ..errors import InvalidRequestError
from ..types import RerankJob, RerankOutcome, RerankWork, unencodable
from .answer import answer_bytes, new_id
from .schemas import ModelName, unicode_error, unicode_text

NAME = "vllm"

SCORE_EXAMPLE: dict[str, Any] = {
    "model": "cross-encoder/ms-marco-MiniLM-L-6-v2",
    "text_1": "What is the capital of France?",
    "text_2": ["Paris is the capital of France.", "Berlin is the capital of Germany."],
}


def _one_or_more_texts(value: Any) -> str | list[str]:
    """A string, or a list of strings; an error names the item (`text_2[1]`), never the
    union's branches (`text_2.str`)."""
    if isinstance(value, str):
        return unicode_text(value)
    if not isinstance(value, list):
        raise PydanticCustomError("text_or_list", "Input should be a string or a list of strings")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise PydanticCustomError(
                "list_item_type", "Input should be {what}", {"index": i, "what": "a string"}
            )
        if (problem := unencodable(item)) is not None:
            raise unicode_error(problem, index=i)
    return value


OneOrMoreTexts = Annotated[
    str | list[str],
    PlainValidator(_one_or_more_texts),
    WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}),
]


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [SCORE_EXAMPLE]})

    model: ModelName
    text_1: OneOrMoreTexts = Field(..., description="The query, or one query per text_2 item.")
    text_2: OneOrMoreTexts = Field(..., description="The texts to score against text_1.")


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


def to_work(body: ScoreRequest) -> RerankWork:
    """One query against every text (one job, no top-k cut), or pairs (one job per pair). The
    totals count the texts (the pairs): `max_documents` applies to both forms."""
    one_query = isinstance(body.text_1, str)
    queries = [body.text_1] if isinstance(body.text_1, str) else body.text_1
    texts = [body.text_2] if isinstance(body.text_2, str) else body.text_2
    count = len(texts)
    scores = answer_bytes((), count)  # no text comes back: a score per text
    if len(queries) == 1:
        query, text_fields = queries[0], ("text_2" if isinstance(body.text_2, str) else None)
        names = {"query": "text_1" if one_query else "text_1[0]", "documents": "text_2"}
        if text_fields is not None:  # a single text_2 string: the job's documents[0]
            names["documents[0]"] = text_fields
        return RerankWork(
            documents=count,
            queries=1,
            answer_bytes=scores,
            build=lambda: [RerankJob(query, texts, count, model=body.model)],
            fields=lambda _position: names,
            documents_field="text_2",
            answer_field="text_2",
            model=body.model,
        )
    if len(queries) != count:
        raise InvalidRequestError(
            f"text_1 has {len(queries)} items and text_2 {count}; send one text_1, or "
            "one per text_2",
            field="text_1",
        )
    return RerankWork(
        documents=count,
        queries=count,
        answer_bytes=scores,
        build=lambda: [
            RerankJob(query, [text], 1, model=body.model)
            for query, text in zip(queries, texts, strict=True)
        ],
        fields=_pair_fields,
        documents_field="text_2",
        answer_field="text_2",
        model=body.model,
    )


def _pair_fields(position: int) -> dict[str, str]:
    """Pair `position` is the job of `text_1[position]` with the one text `text_2[position]`."""
    text = f"text_2[{position}]"
    return {"query": f"text_1[{position}]", "documents[0]": text, "documents": text}


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
