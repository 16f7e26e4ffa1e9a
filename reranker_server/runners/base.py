"""The runner contract: pairs in, Python floats in [0, 1] out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Runner(Protocol):
    """Scores (query, document) pairs with one model.

    A runner never sees HTTP, settings objects beyond its own arguments, or other runners.
    `score` is synchronous and may take long: the engine calls it from a worker thread.
    """

    name: str
    device: str

    def score(self, query: str, documents: Sequence[str]) -> list[float]:
        """One score in [0, 1] per document, in the documents' order."""
        ...
