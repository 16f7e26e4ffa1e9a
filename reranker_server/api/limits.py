"""Checks of request size that depend on settings (shared by every dialect)."""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import InvalidRequestError
from ..settings import Settings


def check_rerank_input(
    query: str,
    documents: Sequence[str],
    settings: Settings,
    documents_field: str = "documents",
    query_field: str = "query",
) -> None:
    """Raise InvalidRequestError naming the field and the limit when the input breaks one."""
    if not query.strip():
        raise InvalidRequestError(f"{query_field} must not be empty", field=query_field)
    if len(query) > settings.max_query_chars:
        raise InvalidRequestError(
            f"{query_field} has {len(query)} characters; the limit is {settings.max_query_chars} "
            "(max_query_chars)",
            field=query_field,
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
