"""Checks of request size that depend on settings (shared by every dialect)."""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import InvalidRequestError
from ..settings import Settings


def check_rerank_input(
    query: str, documents: Sequence[str], settings: Settings, documents_field: str = "documents"
) -> None:
    """Raise InvalidRequestError naming the field and the limit when the input breaks one."""
    if not query.strip():
        raise InvalidRequestError("query must not be empty", field="query")
    if len(query) > settings.max_query_chars:
        raise InvalidRequestError(
            f"query has {len(query)} characters; the limit is {settings.max_query_chars} "
            "(max_query_chars)",
            field="query",
        )
    if len(documents) > settings.max_documents:
        raise InvalidRequestError(
            f"{documents_field} has {len(documents)} items; the limit is {settings.max_documents} "
            "(max_documents)",
            field=documents_field,
        )
    for i, doc in enumerate(documents):
        if len(doc) > settings.max_document_chars:
            raise InvalidRequestError(
                f"{documents_field}[{i}] has {len(doc)} characters; the limit is "
                f"{settings.max_document_chars} (max_document_chars)",
                field=f"{documents_field}[{i}]",
            )
