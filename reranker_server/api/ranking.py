"""What every dialect shares between parsing a request and answering it.

Documents (strings or objects) become texts, `top_n` becomes a count, the `model` name is checked,
and the texts go through the engine via the inference pool, after the same limits as everywhere.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..engine.cascade import Engine
from ..engine.pool import InferencePool
from ..errors import InvalidRequestError, ModelNotFoundError
from ..settings import Settings
from ..types import LongDocPolicy, RerankOutcome
from .limits import check_rerank_input
from .schemas import Usage

# raw_scores: logit(p) with p kept this far from 0 and 1 (|logit| <= 20.7).
LOGIT_EPSILON = 1e-9


@dataclass(frozen=True)
class RankJob:
    """One query's work for the engine, and where its fields were in the request (for errors)."""

    query: str
    texts: list[str]
    top_k: int
    query_field: str = "query"
    documents_field: str = "documents"
    policy: LongDocPolicy | None = None  # long documents (None: the server's default)

    def check(self, settings: Settings) -> None:
        check_rerank_input(
            self.query, self.texts, settings, self.documents_field, query_field=self.query_field
        )


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


def returned_document(doc: str | dict[str, Any]) -> dict[str, Any]:
    """What `return_documents` gives back: `{"text": ...}` for a string, an object as sent."""
    return {"text": doc} if isinstance(doc, str) else doc


def result_count(top_n: int | None, documents: int) -> int:
    """`top_n` as clients mean it: null, 0 or more than the documents = all of them."""
    if not top_n or top_n > documents:
        return documents
    return top_n


def check_model(name: str | None, engine: Engine, settings: Settings) -> None:
    """Refuse a model name only when the settings restrict the names (`accepted_models`)."""
    accepted = settings.accepted_model_names()
    if name is None or not accepted:
        return
    served = accepted | {settings.stage1_model, settings.stage2_model, engine.stage1.name}
    for runner in (engine.stage2_gpu, engine.stage2_cpu):
        if runner is not None:
            served.add(runner.name)
    if name not in served:
        raise ModelNotFoundError(
            f"model {name!r} is not served here; ask for one of: {', '.join(sorted(accepted))} "
            "(accepted_models)",
            field="model",
        )


def served_model(outcome: RerankOutcome, engine: Engine) -> str:
    """The model that produced the final order."""
    return outcome.stages[-1].name if outcome.stages else engine.stage1.name


def usage(outcome: RerankOutcome, documents: int) -> Usage:
    """The `usage` of an answer: documents, Cohere's search units, tokens ranked."""
    return Usage(
        documents=documents,
        search_units=search_units(documents),
        total_tokens=outcome.pair_tokens,
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


async def rank(
    job: RankJob, engine: Engine, pool: InferencePool, settings: Settings
) -> RerankOutcome:
    """Check the limits, then run the cascade in a worker thread."""
    job.check(settings)
    return await pool.run(lambda: engine.rerank(job.query, job.texts, job.top_k, policy=job.policy))


async def rank_many(
    jobs: Sequence[RankJob], engine: Engine, pool: InferencePool, settings: Settings
) -> list[RerankOutcome]:
    """Several queries in one worker run (one admission to the queue), answered in order."""
    for job in jobs:
        job.check(settings)
    work = [(job.query, job.texts, job.top_k) for job in jobs]
    policies = [job.policy for job in jobs]
    return await pool.run(lambda: engine.rerank_many(work, policies))
