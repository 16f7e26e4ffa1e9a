"""The runner contract: every attribute and method the engine and the scheduler use, declared.

A runner scores (query, document) pairs with one model on one device: Python floats in [0, 1],
in the pairs' order. It never sees HTTP, settings objects beyond its own arguments, or other
runners. All calls are synchronous and may take long: the engine calls them from worker threads.

The scheduler (engine/scheduler.py) drives a runner in three steps, so that pairs of concurrent
requests can share one model call:

- `prepare(pairs)`: tokenize, in the request's own thread; one item per pair;
- `length(item)`: the item's tokens, which bound the batch (`max_pairs`, `batch_tokens`);
- `run(items)`: one model call over items the scheduler grouped; one score per item.

Scoring a whole request outside the scheduler (warm-up, readiness) is a function over those
steps (`score`, `score_pairs`), not a member. `PairwiseRunner` gives the steps to a runner that
only knows how to score pairs (`score_pairs`, which batches itself): items are the pairs
themselves, lengths are estimated from words. Stage 1 also needs a tokenizer for long documents
(`TokenizingRunner`, engine/windows.py). A runner kind (kind.py) builds a runner from its
StageSpec.
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
    """Scores (query, document) pairs with one model: identity, batch bounds, three steps."""

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


# Optional: `stats() -> dict[str, float]`, counters for metrics (e.g. `oom_retries`).


def runner_stats(runner: Runner) -> dict[str, float]:
    """The runner's counters for metrics (empty when it keeps none)."""
    stats = getattr(runner, "stats", None)
    return dict(stats()) if callable(stats) else {}


def plan_batches(
    lengths: Sequence[int], batch_tokens: int, max_pairs: int | None = None
) -> list[list[int]]:
    """Group positions into batches, longest first, each at most `batch_tokens` padded tokens
    and `max_pairs` items.

    Sorting by length keeps padding small; every batch holds at least one item.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for position in order:
        length = lengths[position]
        width = max(longest, length)
        full = max_pairs is not None and len(current) >= max_pairs
        if current and (full or width * (len(current) + 1) > batch_tokens):
            batches.append(current)
            current, width = [], length
        current.append(position)
        longest = width
    if current:
        batches.append(current)
    return batches


def score_pairs(runner: Runner, pairs: Sequence[Pair]) -> list[float]:
    """Scores of any number of pairs, in order: prepared, grouped into the runner's allowed
    batches (length-sorted), run. A `PairwiseRunner` batches itself: its `score_pairs`."""
    if not pairs:
        return []
    if isinstance(runner, PairwiseRunner):
        return [float(s) for s in runner.score_pairs(pairs)]
    items = runner.prepare(pairs)
    scores = [0.0] * len(items)
    lengths = [runner.length(item) for item in items]
    for batch in plan_batches(lengths, runner.batch_tokens, runner.max_pairs):
        for position, value in zip(batch, runner.run([items[i] for i in batch]), strict=True):
            scores[position] = float(value)
    return scores


def score(runner: Runner, query: str, documents: Sequence[str]) -> list[float]:
    """Scores of one query's documents."""
    return score_pairs(runner, [(query, document) for document in documents])


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
