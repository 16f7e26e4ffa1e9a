"""Request and response models of the native dialect, and the lenient field types every dialect
shares (what /docs shows). Cohere's, TEI's and the batch models live in their dialect's module."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    StrictInt,
    StrictStr,
    WithJsonSchema,
)
from pydantic_core import PydanticCustomError

from ..types import unencodable
from .long_documents import (
    LongDocuments,
    MaxChunksPerDoc,
    MaxTokensPerDoc,
    NotBool,
    TruncationDirection,
)

# Tags of the request shapes `POST /rerank` accepts; validation errors leave them out of the field.
NATIVE_SHAPE = "native"
TEI_SHAPE = "tei"
BODY_SHAPE_TAGS = frozenset({NATIVE_SHAPE, TEI_SHAPE})


# Object documents nested deeper than this are refused (they would fail when echoed back).
MAX_DOCUMENT_DEPTH = 64


def unicode_error(problem: str, where: str = "", index: int | None = None) -> PydanticCustomError:
    """The validation error for text that is not valid Unicode; `index`: the list item it is in
    (api/errors.py adds it to the field: `text_2[1]`)."""
    context: dict[str, Any] = {"problem": problem, "where": f" in {where}" if where else ""}
    if index is not None:
        context["index"] = index
    return PydanticCustomError(
        "string_unicode" if index is None else "list_item_unicode",
        "Input should be valid Unicode text; it has {problem}{where} (replace or remove it)",
        context,
    )


def unicode_text(value: str) -> str:
    problem = unencodable(value)
    if problem is not None:
        raise unicode_error(problem)
    return value


def _check_object(document: dict[str, Any]) -> None:
    """Every key and string in an object document is valid Unicode, and it nests at most
    MAX_DOCUMENT_DEPTH levels of objects and arrays.

    Depth first, without recursion, holding one iterator per level: this runs on the event loop
    over whatever a 16 MB body holds (millions of values), so it stays lean; the path that names
    the place (`meta.tags[1]`) is only worked out for an error."""
    levels: list[tuple[Any, Iterator[Any]]] = []

    def enter(container: dict[str, Any] | list[Any]) -> None:
        if type(container) is dict:
            for key in container:
                if (problem := unencodable(key)) is not None:
                    where = ".".join(filter(None, (_path(levels, container), ascii(key))))
                    raise unicode_error(problem, f"the key {where}")
            levels.append((container, iter(container.values())))
        else:
            levels.append((container, iter(container)))

    enter(document)
    while levels:
        for item in levels[-1][1]:
            kind = type(item)
            if kind is str:
                if (problem := unencodable(item)) is not None:
                    raise unicode_error(problem, _path(levels, item))
            elif kind is dict or kind is list:
                if len(levels) >= MAX_DOCUMENT_DEPTH:
                    raise PydanticCustomError(
                        "document_depth",
                        "Object documents may nest at most {limit} levels of objects and arrays; "
                        "this one nests deeper ({path})",
                        {"limit": MAX_DOCUMENT_DEPTH, "path": _path(levels, item)},
                    )
                enter(item)
                break
        else:
            levels.pop()


def _path(levels: Sequence[tuple[Any, Any]], item: object) -> str:
    """Where `item` sits: each level's container holds the next level's, the last one `item`."""
    if not levels:  # the document itself
        return ""
    children = [container for container, _ in levels[1:]] + [item]
    parts = []
    for (container, _), child in zip(levels, children, strict=True):
        if type(container) is dict:
            key = next(k for k, v in container.items() if v is child)
            parts.append("." + (key if unencodable(key) is None else ascii(key)))
        else:
            parts.append(f"[{next(i for i, v in enumerate(container) if v is child)}]")
    path = "".join(parts).lstrip(".")
    return path if len(path) < 60 else path[:57] + "..."


def _document(value: Any) -> str | dict[str, Any]:
    if isinstance(value, str):
        return unicode_text(value)
    if isinstance(value, dict):
        _check_object(value)
        return value
    raise PydanticCustomError(
        "document_type", 'Input should be a string or an object with a "text" field'
    )


# Text read from a request: refuses lone surrogates with a 422 naming the field.
UnicodeStr = Annotated[str, AfterValidator(unicode_text)]


# A passage: a string, or an object whose `text` (or `rank_fields`) is ranked.
Document = Annotated[
    str | dict[str, Any],
    PlainValidator(_document),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string"},
                {
                    "type": "object",
                    "properties": {"text": {"type": "string"}},
                    "additionalProperties": True,
                },
            ]
        }
    ),
]


def fail_fast(*allowed: type, what: str) -> BeforeValidator:
    """A list validator that stops at the first item of the wrong type with ONE error.

    Pydantic (and FastAPI after it) would otherwise build one error per bad item on the event
    loop: a 1 MB body of 300,000 numbers took seconds and hundreds of MB for a single 422.
    """

    def check(value: Any) -> Any:
        if isinstance(value, list):
            for i, item in enumerate(value):
                if not isinstance(item, allowed):
                    raise PydanticCustomError(
                        "list_item_type",
                        "Input should be {what}",
                        {"index": i, "what": what},
                    )
        return value

    return BeforeValidator(check)


# A list of passages, checked item by item before pydantic's per-item validation.
Documents = Annotated[list[Document], fail_fast(str, dict, what="a string or an object")]
Texts = Annotated[
    list[Annotated[StrictStr, AfterValidator(unicode_text)]], fail_fast(str, what="a string")
]

# Counts and flags as sloppy clients send them: null = default, "3" = 3, "true" = true.
TopN = Annotated[
    Annotated[int, NotBool, Field(ge=0)] | None,
    Field(
        None,
        description="How many results to return; null, 0 or missing = all; more than the "
        "documents = all.",
    ),
]
ReturnDocuments = Annotated[
    bool | None,
    Field(
        None,
        description='Add `document: {"text": ...}` to each result ("true"/"false" strings ok).',
    ),
]
RankFields = Annotated[
    list[UnicodeStr] | None,
    Field(
        None,
        description='Keys of object documents to rank on (default ["text"]); several are '
        'ranked as "key: value" lines.',
    ),
]
ModelName = Annotated[
    UnicodeStr | None,
    Field(None, description="Any name by default; the answer names the model that served it."),
]

SPEC_EXAMPLE: dict[str, Any] = {
    "query": "What is the capital of France?",
    "documents": [
        "Paris is the capital and most populous city of France.",
        "Berlin is the capital of Germany.",
        "The Eiffel Tower is located in Paris.",
    ],
    "top_k": 2,
}


class RerankRequest(BaseModel):
    """`POST /rerank`: a query and the passages to order."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={"examples": [SPEC_EXAMPLE]},
    )

    query: StrictStr = Field(..., min_length=1, description="The search query (not empty).")
    documents: Documents = Field(
        ...,
        description="Passages to rerank: strings, or objects with `text`. An empty list returns "
        "no results.",
    )
    top_k: StrictInt | None = Field(
        None,
        ge=1,
        description="How many results to return (>= 1). Missing or null (and no `top_n`): all "
        "documents, best first.",
    )
    top_n: TopN
    model: ModelName
    rank_fields: RankFields
    return_documents: ReturnDocuments
    long_documents: LongDocuments
    max_chunks_per_doc: MaxChunksPerDoc
    max_tokens_per_doc: MaxTokensPerDoc
    truncation_direction: TruncationDirection
    return_window: bool | None = Field(
        None,
        description="Add `window: {start, end, text}` to results whose score came from part of "
        "the document (truncated, or its best chunk).",
    )
    candidates: StrictInt | None = Field(
        None,
        ge=1,
        description="Documents stage 1 passes to stage 2 for this request (at least top_k; at "
        "most the server's max_candidates). Null: the server's default (candidates).",
    )
    return_stages: bool | None = Field(
        None,
        description="Add each result's stage-1 score and rank (`stage1_score`, `stage1_rank`: "
        "its 1-based place in stage 1's order of all documents); none under plan gpu_only, "
        "where stage 1 did not run.",
    )


class RerankResult(BaseModel):
    index: int = Field(..., description="The document's position in the request.")
    text: str
    score: float = Field(..., ge=0.0, le=1.0)
    relevance_score: float = Field(
        ..., ge=0.0, le=1.0, description="The same score, for Cohere-style clients."
    )
    document: dict[str, Any] | None = Field(
        None,
        exclude_if=lambda v: v is None,
        description="The document as sent (only with return_documents).",
    )
    window: ScoredWindow | None = Field(
        None,
        exclude_if=lambda v: v is None,
        description="Only with return_window, for a document scored in part: the part that gave "
        "the score.",
    )
    stage1_score: float | None = Field(
        None, exclude_if=lambda v: v is None, description="Only with return_stages."
    )
    stage1_rank: int | None = Field(
        None,
        exclude_if=lambda v: v is None,
        description="Only with return_stages: 1-based place in stage 1's order of all documents.",
    )


class Usage(BaseModel):
    documents: int = Field(..., description="Documents ranked.")
    search_units: int = Field(..., description="Cohere's unit: one per 100 documents (min 1).")
    total_tokens: int = Field(
        0,
        description="Tokens of the (query, document window) pairs stage 1 ranked, special "
        "tokens included, counted with the stage-1 model's tokenizer (cache hits included).",
    )
    prompt_tokens: int = Field(0, description="The same count (vLLM's and infinity's name for it).")


class ScoredWindow(BaseModel):
    start: int = Field(..., description="First character of the window in the document.")
    end: int = Field(..., description="One past its last character.")
    text: str


class StageInfo(BaseModel):
    name: str = Field(..., description="Model that ran this stage.")
    device: str = Field(..., description="cpu, cuda:0, ...")
    documents: int
    seconds: float
    cached: int | None = Field(
        None, description="Documents whose score came from the cache (null: cache not used)."
    )


class RerankResponse(BaseModel):
    """Results best first. `backend` says what produced the final order: "gpu" when the
    cross-encoder ran on the GPU, else "cpu"."""

    results: list[RerankResult]
    backend: Literal["gpu", "cpu"]
    fallback: str | None = Field(
        None, description="Why the GPU was not used: no_gpu, low_vram, cooldown, oom, cuda_error."
    )
    stages: list[StageInfo] = Field(default_factory=list, description="Stages that ran, in order.")
    plan: Literal["cascade", "gpu_only"] | None = Field(
        None,
        exclude_if=lambda v: v is None,
        description="Only with RERANKER_STAGE1=auto: cascade (stage 1 scored every document, "
        "stage 2 the candidates) or gpu_only (stage 2 on the GPU scored every document, stage 1 "
        "was skipped).",
    )
    plan_reason: str | None = Field(
        None,
        exclude_if=lambda v: v is None,
        description='Only with RERANKER_STAGE1=auto: why this plan, e.g. "gpu est 12 ms < cpu '
        'est 300 ms".',
    )
    id: str = Field(..., description="A new id per answer.")
    model: str = Field(..., description="The model that produced the final order.")
    usage: Usage


class HealthResponse(BaseModel):
    model_config = ConfigDict(extra="allow")

    status: Literal["ok", "loading"]
    cuda_available: bool
    gpu_model_loaded: bool


class ErrorResponse(BaseModel):
    error: str = Field(..., description="What went wrong, naming the field and the limit.")
    error_type: str = Field(..., description="Stable machine-readable kind.")
    field: str | None = None
    detail: str = Field(..., description="The same message (Jina-style clients read `detail`).")


# The error statuses every rerank route may answer, for the OpenAPI docs.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 415, 422, 429, 500, 503)
}
