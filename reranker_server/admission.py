"""Admission: every request, whatever its dialect, checked as a whole before any job runs.

The service calls `admit` with the `RerankWork` a dialect built. In order: the totals (queries in
a batch, documents or pairs in the request, the answer's size), then each job (query, texts,
`candidates`) as the jobs are built. Errors name the job's parts (`query`, `documents[3]`); the
service renames them with the work's `fields` into the request's own field paths (`text_1[3]`,
`requests[1].documents[3]`). The model name is the service's (it knows the cascades).

Checks are cheap and bounded: the totals come first, so a request over a count limit is refused
before its jobs exist; texts are only looked at once their number is within the limits.
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import AnswerTooLargeError, InvalidRequestError, RerankerError
from .settings import Settings
from .types import RerankJob, RerankWork, unencodable


def check_totals(work: RerankWork, limits: Settings) -> None:
    """The request as a whole: counts and the answer's size."""
    if work.batch and work.queries > limits.max_batch_requests:
        raise InvalidRequestError(
            f"{work.documents_field} has {work.queries} items; the limit is "
            f"{limits.max_batch_requests} (max_batch_requests)",
            field=work.documents_field,
        )
    if not work.batch and work.documents > limits.max_documents:
        raise InvalidRequestError(
            f"{work.documents_field} has {work.documents} items; the limit is "
            f"{limits.max_documents} (max_documents)",
            field=work.documents_field,
        )
    if work.answer_bytes > limits.max_answer_bytes:
        raise AnswerTooLargeError(
            f"the answer would take about {work.answer_bytes} bytes ({work.answer_field} echoes "
            f"the texts back); the limit is {limits.max_answer_bytes} bytes (max_answer_bytes): "
            "ask for fewer results (top_n / top_k) or leave out the documents in the answer",
            field=work.answer_field,
        )


def built_jobs(work: RerankWork) -> list[RerankJob]:
    """The work's jobs, which must hold what its totals say (else the dialect is broken: 500)."""
    jobs = list(work.build())
    documents = sum(len(job.texts) for job in jobs)
    if len(jobs) != work.queries or documents != work.documents:
        raise RerankerError(
            f"a dialect's work declared {work.queries} jobs with {work.documents} documents, "
            f"but built {len(jobs)} with {documents}"
        )
    return jobs


def check_job(job: RerankJob, limits: Settings) -> None:
    """One job: its query, its texts and its `candidates`. Raises InvalidRequestError naming the
    job's part and the limit it breaks."""
    if type(job.query) is not str:  # a dialect that let a non-string through: still a 422
        raise InvalidRequestError(
            f"query should be a string, not {type(job.query).__name__}", field="query"
        )
    if not job.query.strip():
        raise InvalidRequestError("query must not be empty", field="query")
    if len(job.query) > limits.max_query_chars:
        raise InvalidRequestError(
            f"query has {len(job.query)} characters; the limit is {limits.max_query_chars} "
            "(max_query_chars)",
            field="query",
        )
    _check_text(job.query, "query")
    if len(job.texts) > limits.max_documents:
        raise InvalidRequestError(
            f"documents has {len(job.texts)} items; the limit is {limits.max_documents} "
            "(max_documents)",
            field="documents",
        )
    _check_texts(job.texts, limits)
    if job.candidates is not None and job.candidates > limits.max_candidates:
        raise InvalidRequestError(
            f"candidates is {job.candidates}; the limit is {limits.max_candidates} "
            "(RERANKER_MAX_CANDIDATES)",
            field="candidates",
        )


def _check_texts(texts: Sequence[str], limits: Settings) -> None:
    for i, text in enumerate(texts):
        if type(text) is not str:  # a dialect that let a number through: still a 422
            raise InvalidRequestError(
                f"documents[{i}] should be a string, not {type(text).__name__}",
                field=f"documents[{i}]",
            )
        if len(text) > limits.max_document_chars:
            raise InvalidRequestError(
                f"documents[{i}] has {len(text)} characters; the limit is "
                f"{limits.max_document_chars} (max_document_chars)",
                field=f"documents[{i}]",
            )
        _check_text(text, f"documents[{i}]")


def _check_text(text: str, field: str) -> None:
    problem = unencodable(text)
    if problem is not None:
        raise InvalidRequestError(
            f"{field} should be valid Unicode text; it has {problem} (replace or remove it)",
            field=field,
        )
