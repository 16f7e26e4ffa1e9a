"""Stage 1 under way while the window plan is still tokenizing (tokenize once, overlap it).

`Windower.plan` hands each group of windows to a sink as soon as the group is tokenized
(engine/windows.py). `Stage1Stream` is that sink: it looks the group's pairs up in the score
cache and queues the rest at once, with the items the plan built from its own tokens, so the
compute threads work on the first documents while the next ones are tokenized. The engine then
waits for the scores (`wait`) or, when planning failed, drops what was queued (`drop`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from .cache import ScoreCache, pair_keys
from .scheduler import Scored, Submission


class Stage1Stream:
    """A request's stage-1 pairs, looked up and queued a group of windows at a time."""

    def __init__(self, submission: Submission, cache: ScoreCache | None, namespace: str) -> None:
        self.submission = submission
        self.cache = cache
        self.namespace = namespace
        self.started: float | None = None  # when the first group was queued
        self.keys: list[str] = []  # cache keys of every window (none without a cache)
        self.found: list[float | None] = []  # every window's cached score, or None

    def __call__(self, query: str, texts: Sequence[str], items: Sequence[Any] | None) -> None:
        """The sink: look `texts` up, queue the pairs the cache lacks."""
        if self.started is None:
            self.started = time.perf_counter()
        found: list[float | None] = [None] * len(texts)
        if self.cache is not None:
            keys = pair_keys(self.namespace, query, texts)
            self.keys += keys
            found = self.cache.get_many(keys)
        self.found += found
        todo = [i for i, score in enumerate(found) if score is None]
        self.submission.add(
            [(query, texts[i]) for i in todo],
            [items[i] for i in todo] if items is not None else None,
        )

    def wait(self) -> Scored:
        """Scores of the queued pairs, in order, their tokens and how long they waited."""
        return self.submission.wait()

    def drop(self) -> None:
        self.submission.drop()
