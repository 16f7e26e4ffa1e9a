"""Schemathesis against the server's own OpenAPI schema: every route and dialect, generated
bodies (valid and invalid), no 5xx and no response that breaks the schema. Bounded for CI."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import checks

from reranker_server.app import create_app
from reranker_server.settings import Settings

from .conftest import running

MAX_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "40"))  # per operation; more by hand
CASES_RUN: list[str] = []
API_KEY = "fuzz-key"

# The schema depends on routes only, not on loaded models: read it from an app never started.
schema = schemathesis.openapi.from_dict(create_app(Settings()).openapi())


@pytest.fixture(scope="module")
def fuzz_server(tiny_models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:  # type: ignore[no-untyped-def]
    settings_ = Settings(
        stage1_model=str(tiny_models.stage1),
        stage2_model=str(tiny_models.stage2),
        model_cache_dir=tmp_path_factory.mktemp("cache"),
        offline=True,
        device="cpu",
        stage2_on_cpu=True,
        cpu_threads=1,
        max_documents=50,
        max_document_chars=2000,
        max_query_chars=500,
        api_key=API_KEY,  # the schema declares bearer auth: fuzz it with a key required
    )
    with running(create_app(settings_)) as url:
        yield url
    print(f"\nschemathesis: {len(CASES_RUN)} cases, {len(set(CASES_RUN))} distinct method + path")


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors_and_schema_conformance(case: schemathesis.Case, fuzz_server: str) -> None:
    CASES_RUN.append(f"{case.method} {case.path}")
    case.call_and_validate(
        base_url=fuzz_server,
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=30,
        # What counts here: no 5xx, status codes and bodies as the schema documents them.
        # Left out: lenient parsing accepts some schema-invalid input on purpose ("true" for a
        # boolean), and the server's limits (documents, characters; settings) and cross-field
        # rules (an object document needs `text` or a `rank_fields` entry) reject some
        # schema-valid input with a documented 422.
        excluded_checks=[checks.negative_data_rejection, checks.positive_data_acceptance],
    )


def test_schema_covers_every_dialect() -> None:
    paths = set(create_app(Settings()).openapi()["paths"])
    assert {"/rerank", "/v1/rerank", "/v2/rerank", "/rerank/batch", "/health"} <= paths
