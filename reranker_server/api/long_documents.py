"""The long-document fields of every dialect, mapped onto one `LongDocPolicy` (engine/windows.py).

| field (dialect)                                    | policy                                   |
|----------------------------------------------------|------------------------------------------|
| `long_documents: "truncate" / "chunk"` (native)     | that mode                                |
| `max_chunks_per_doc: N` (Cohere v1; native)          | chunk, at most N windows per document    |
| `max_tokens_per_doc: N` (Cohere v2, vLLM; native)    | chunk the document's first N tokens      |
| `truncate: true / false` (TEI)                       | truncate / chunk (no text is cut away)   |
| `truncation_direction: "left" / "right"` (TEI; native) | left keeps a document's last tokens    |

A field left out (or null) means the server's default (`RERANKER_LONG_DOCUMENTS`, ...); an explicit
mode wins over what the counts imply.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field
from pydantic_core import PydanticCustomError

from ..errors import InvalidRequestError
from ..settings import Settings
from ..types import LongDocMode, LongDocPolicy


def _not_bool(value: Any) -> Any:
    """Counts refuse true/false (lax int validation would read them as 1/0)."""
    if isinstance(value, bool):
        raise PydanticCustomError("int_type", "Input should be a valid integer, not a boolean")
    return value


# Counts refuse true / false, which lax integer validation would read as 1 / 0.
NotBool = BeforeValidator(_not_bool)


def _lower(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


LongDocuments = Annotated[
    Literal["truncate", "chunk"] | None,
    BeforeValidator(_lower),
    Field(
        None,
        description="Documents too long for the model beside the query: truncate (score the "
        "first tokens that fit) or chunk (score overlapping windows; the best one is the score). "
        "Null: the server's default.",
    ),
]
MaxChunksPerDoc = Annotated[
    Annotated[int, NotBool, Field(ge=1)] | None,
    Field(
        None,
        description="Chunk long documents into at most this many windows each (Cohere v1). "
        "documents x max_chunks_per_doc must stay within the server's max_windows_per_request.",
    ),
]
MaxTokensPerDoc = Annotated[
    Annotated[int, NotBool, Field(ge=1)] | None,
    Field(
        None,
        description="Score only a document's first this many tokens, in windows when they do not "
        "fit beside the query (Cohere v2, vLLM).",
    ),
]
TruncationDirection = Annotated[
    Literal["left", "right"] | None,
    BeforeValidator(_lower),
    Field(
        None,
        description="right (default): keep a long document's first tokens; left: its last ones.",
    ),
]


def long_doc_policy(
    settings: Settings,
    *,
    mode: LongDocMode | None = None,
    max_chunks: int | None = None,
    max_tokens: int | None = None,
    direction: Literal["left", "right"] | None = None,
    documents: int = 0,
) -> LongDocPolicy:
    """A request's policy: its fields over the server's defaults. Refuses at once, as Cohere
    does, when `documents` x `max_chunks` is past `max_windows_per_request`."""
    if mode is None:
        implied = max_chunks is not None or max_tokens is not None
        mode = "chunk" if implied else settings.long_documents
    limit = settings.max_windows_per_request
    if max_chunks is not None and documents * max_chunks > limit:
        raise InvalidRequestError(
            f"max_chunks_per_doc x documents is {max_chunks} x {documents} = "
            f"{max_chunks * documents}; the limit is {limit} windows per request "
            "(max_windows_per_request)",
            field="max_chunks_per_doc",
        )
    return LongDocPolicy(
        mode=mode,
        max_chunks=max_chunks if max_chunks is not None else settings.max_chunks_per_doc,
        max_tokens=max_tokens,
        keep="end" if direction == "left" else "start",
        max_windows=limit,
    )
