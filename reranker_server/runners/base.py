"""The runner contract: every attribute and method the engine and the scheduler use, declared.

A runner scores (query, document) pairs with one model on one device: Python floats in [0, 1],
in the pairs' order. It never sees HTTP, settings objects beyond its own arguments, or other
runners. All calls are synchronous and may take long: the engine calls them from worker threads.

The scheduler (engine/scheduler.py) drives a runner in three steps, so that pairs of concurrent
requests can share one model call:

- `prepare(pairs)`: tokenize, in the request's own thread; one item per pair;
- `length(item)`: the item's tokens, which bound the batch (`max_pairs`, `batch_tokens`);
- `run(items)`: one model call over items the scheduler grouped; one score per item.

`PairwiseRunner` gives all of that to a runner that only knows how to score pairs
(`score_pairs`): items are the pairs themselves, lengths are estimated from words. Stage 1 also
needs a tokenizer for long documents (`TokenizingRunner`, engine/windows.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..types import TextTokens

Pair = tuple[str, str]


@runtime_checkable
class Runner(Protocol):
    """Scores (query, document) pairs with one model."""

    name: str  # what clients see: a hub id or a directory's last part, never a local path
    device: str  # "cpu", "cuda:0", ...
    precision: str  # "fp32", "fp16", "int8", ...: scores differ a little between them
    max_pairs: int  # most pairs in one `run`
    batch_tokens: int  # most padded tokens (pairs x longest) in one `run`
    files: Path | None  # the model's files (score-cache keys fingerprint them); None: none

    def prepare(self, pairs: Sequence[Pair]) -> list[Any]:
        """One item per pair (tokenized, truncated to the model's length)."""
        ...

    def length(self, item: Any) -> int:
        """Tokens of a prepared item."""
        ...

    def run(self, items: Sequence[Any]) -> list[float]:
        """One score per item, in order; the items fit `max_pairs` and `batch_tokens`."""
        ...

    def score_pairs(self, pairs: Sequence[Pair]) -> list[float]:
        """Scores of any number of pairs (the runner batches them itself)."""
        ...

    def score(self, query: str, documents: Sequence[str]) -> list[float]:
        """Scores of one query's documents."""
        ...

    def stats(self) -> dict[str, float]:
        """Counters for metrics (e.g. `oom_retries`); empty when there are none."""
        ...


@runtime_checkable
class TokenizingRunner(Runner, Protocol):
    """A runner that can also tokenize texts alone: stage 1, which cuts long documents into
    windows with its own tokenizer (engine/windows.py)."""

    max_length: int  # tokens of query + document, special tokens included
    pair_special_tokens: int  # special tokens a (query, document) pair adds

    def encode_texts(self, texts: Sequence[str]) -> list[TextTokens]:
        """Each text alone, untruncated, without special tokens."""
        ...


class PairwiseRunner(ABC):
    """Base class for a runner that scores pairs and batches them itself: implement
    `score_pairs` (and set `name`, `device`). The scheduler then hands it up to `max_pairs`
    pairs per call."""

    name: str = "runner"
    device: str = "cpu"
    precision: str = "fp32"
    max_pairs: int = 1
    batch_tokens: int = 8192
    files: Path | None = None

    @abstractmethod
    def score_pairs(self, pairs: Sequence[Pair]) -> list[float]: ...

    def score(self, query: str, documents: Sequence[str]) -> list[float]:
        return self.score_pairs([(query, doc) for doc in documents])

    def prepare(self, pairs: Sequence[Pair]) -> list[Any]:
        return list(pairs)

    def length(self, item: Any) -> int:
        """Words of the pair, plus its special tokens: an estimate (no tokenizer here)."""
        query, document = item
        return 2 + len(query.split()) + len(document.split())

    def run(self, items: Sequence[Any]) -> list[float]:
        return self.score_pairs(items)

    def stats(self) -> dict[str, float]:
        return {}
