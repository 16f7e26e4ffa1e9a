"""An app whose engine scores with KeywordRunner: the right order is known by construction, and
it starts in milliseconds. For tests of the HTTP layer (dialects, auth, client, batch)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from reranker_server.app import RerankerApp, create_app
from reranker_server.devices import GpuGate
from reranker_server.engine.engine import Engine
from reranker_server.settings import Settings

from .fakes import KeywordRunner

DOCUMENTS = [
    "Berlin is the capital of Germany.",
    "Paris is the capital and most populous city of France.",
    "The Eiffel Tower is in Paris, France.",
    "Bananas are rich in potassium.",
]
QUERY = "capital of France"
BEST_FIRST = [1, 0, 2, 3]  # KeywordRunner's order for QUERY over DOCUMENTS


def keyword_app(engine: Callable[[], Engine] | None = None, **overrides: Any) -> RerankerApp:
    """An app on `engine()` (default: KeywordRunner alone) with settings that load no model."""
    values: dict[str, Any] = {
        "stage1_model": "unused",
        "stage2_model": "unused",
        "offline": True,
        "device": "cpu",
        "cpu_threads": 1,
    }
    values.update(overrides)
    settings = Settings(**values)
    return create_app(settings, engine_factory=lambda _s: (engine or keyword_engine)())


def keyword_engine() -> Engine:
    return Engine(KeywordRunner(), gate=GpuGate(None, 0, 0))
