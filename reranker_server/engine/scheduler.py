"""The scheduler: one FIFO queue of pairs from all requests, batched, on a fixed set of threads.

A request's pairs are prepared (tokenized) in the request's own thread, sorted longest first and
queued. `runs` worker threads own the cores: each takes the oldest queued pair, whichever request
it belongs to, plus the pairs queued right behind it for the same model (a *lane*), as far as the
lane's batch allows (`max_pairs`, and `batch_tokens` padded tokens), and runs them as one batch.
So pairs of concurrent requests share batches (micro-batching across requests), and only `runs`
model calls compute at once (each with its own threads: runs x threads <= cores, see
Settings.runs).

Order is by request, then pair: `InferencePool` gives each request an `Admission` (its place in
line and its deadline) through a context variable, and every pair of that request, stage 2's too,
keeps that place. So no request overtakes one admitted before it (FIFO: nothing starves), and a
request's stage 2 does not wait behind the stage 1 of requests admitted after it. A request past
its deadline is cancelled: its queued pairs are dropped and the caller gets `RequestTimeoutError`.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..errors import RequestTimeoutError
from ..runners.base import Runner
from .trace import current_trace

logger = logging.getLogger(__name__)

Pair = tuple[str, str]

_arrivals = itertools.count()


@dataclass(frozen=True)
class Admission:
    """A request's place in line, and the `time.monotonic()` by which it must finish."""

    order: int = field(default_factory=lambda: next(_arrivals))
    deadline: float | None = None


current_admission: ContextVar[Admission | None] = ContextVar("reranker_admission", default=None)


class BatchRunner(Protocol):
    """What a lane runs: `prepare` (pre, in the caller's thread) then `run` (core, in a worker)."""

    def prepare(self, pairs: Sequence[Pair]) -> list[Any]:
        """One item per pair; `length(item)` is its token count."""
        ...

    def length(self, item: Any) -> int: ...

    def run(self, items: Sequence[Any]) -> list[float]:
        """One score per item, in order."""
        ...


class PairRunner:
    """A `BatchRunner` over any `Runner`: items are the pairs, run with `score_pairs` if the runner
    has it, else one `score` call per query. Lengths are estimated from words (no tokenizer)."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    def prepare(self, pairs: Sequence[Pair]) -> list[Any]:
        return list(pairs)

    def length(self, item: Any) -> int:
        query, document = item
        return 2 + len(query.split()) + len(document.split())

    def run(self, items: Sequence[Any]) -> list[float]:
        score_pairs = getattr(self.runner, "score_pairs", None)
        if score_pairs is not None:
            return list(score_pairs(items))
        scores: list[float] = [0.0] * len(items)
        by_query: dict[str, list[int]] = {}
        for i, (query, _) in enumerate(items):
            by_query.setdefault(query, []).append(i)
        for query, positions in by_query.items():
            found = self.runner.score(query, [items[i][1] for i in positions])
            for i, score in zip(positions, found, strict=True):
                scores[i] = score
        return scores


class RunnerCopies:
    """Copies of a runner that two threads must not use at once (a Hugging Face tokenizer changes
    its padding state on every call): each call takes a free copy, or waits for the first one.
    With one copy per scheduler worker, no call waits."""

    def __init__(self, copies: Sequence[Runner]) -> None:
        self.name = copies[0].name
        self.device = copies[0].device
        self._copies = [(runner, threading.Lock()) for runner in copies]

    def _take(self) -> tuple[Runner, threading.Lock]:
        for copy in self._copies:
            if copy[1].acquire(blocking=False):
                return copy
        self._copies[0][1].acquire()
        return self._copies[0]

    def _call(self, method: str, *args: Any) -> list[float]:
        runner, lock = self._take()
        try:
            if method == "score_pairs":
                return PairRunner(runner).run(args[0])
            return runner.score(*args)
        finally:
            lock.release()

    def score(self, query: str, documents: Sequence[str]) -> list[float]:
        return self._call("score", query, documents)

    def score_pairs(self, pairs: Sequence[Pair]) -> list[float]:
        return self._call("score_pairs", pairs)


@dataclass(frozen=True)
class Lane:
    """One model behind the scheduler, and how big its batches may be."""

    name: str
    runner: BatchRunner
    max_pairs: int = 1
    batch_tokens: int = 8192


@dataclass
class _Ticket:
    """One request's pairs in one lane."""

    scores: list[float]
    remaining: int
    submitted: float
    started: float | None = None
    error: BaseException | None = None
    cancelled: bool = False
    done: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True, order=True)
class _Entry:
    key: tuple[int, int]  # (request order, pair sequence): heaps pop the oldest request first
    lane: Lane = field(compare=False)
    item: Any = field(compare=False)
    length: int = field(compare=False)
    ticket: _Ticket = field(compare=False)
    position: int = field(compare=False)


class Scheduler:
    """`runs` worker threads over per-lane FIFO queues; see the module docstring."""

    def __init__(self, runs: int, name: str = "scheduler") -> None:
        self.runs = runs
        self._queues: dict[str, list[_Entry]] = {}  # heaps
        self._cond = threading.Condition()
        self._sequence = 0
        self._closed = False
        self._busy = 0
        self.batches = 0  # model calls made, for tests and metrics
        self.submitted = 0  # pairs ever queued
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
            for i in range(runs)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def queued(self) -> int:
        """Pairs waiting for a worker."""
        with self._cond:
            return sum(len(q) for q in self._queues.values())

    @property
    def busy(self) -> int:
        """Workers running a batch now."""
        return self._busy

    def score(self, lane: Lane, pairs: Sequence[Pair]) -> tuple[list[float], int]:
        """Scores of `pairs` (in order) and their total tokens; blocks until all are scored."""
        if not pairs:
            return [], 0
        items = lane.runner.prepare(pairs)
        lengths = [lane.runner.length(item) for item in items]
        ticket = _Ticket(
            scores=[0.0] * len(items), remaining=len(items), submitted=time.monotonic()
        )
        order = sorted(range(len(items)), key=lambda i: (-lengths[i], i))
        admission = current_admission.get() or Admission()
        with self._cond:
            if self._closed:
                raise RuntimeError("scheduler is shut down")
            queue = self._queues.setdefault(lane.name, [])
            for position in order:
                self._sequence += 1
                key = (admission.order, self._sequence)
                entry = _Entry(key, lane, items[position], lengths[position], ticket, position)
                heapq.heappush(queue, entry)
            self.submitted += len(items)
            self._cond.notify_all()
        self._wait(ticket, admission.deadline)
        trace = current_trace.get()
        if trace is not None and ticket.started is not None:
            trace.queue_wait_s = (trace.queue_wait_s or 0.0) + ticket.started - ticket.submitted
        return ticket.scores, sum(lengths)

    def _wait(self, ticket: _Ticket, deadline: float | None) -> None:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not ticket.done.wait(timeout):
            with self._cond:
                ticket.cancelled = True
                for name, queue in list(self._queues.items()):
                    self._queues[name] = [e for e in queue if e.ticket is not ticket]
                    heapq.heapify(self._queues[name])
            raise RequestTimeoutError(
                "request did not finish in time; retry later", retry_after_s=1
            )
        if ticket.error is not None:
            raise ticket.error

    def _take(self) -> list[_Entry]:
        """The oldest queued pair and those right behind it in its lane that fit one batch."""
        heads = [q for q in self._queues.values() if q]
        queue = min(heads, key=lambda q: q[0].key)
        lane = queue[0].lane
        batch = [heapq.heappop(queue)]
        width = batch[0].length
        while queue and len(batch) < lane.max_pairs:
            width = max(width, queue[0].length)
            if width * (len(batch) + 1) > lane.batch_tokens:
                break
            batch.append(heapq.heappop(queue))
        return batch

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not any(self._queues.values()):
                    self._cond.wait()
                if self._closed and not any(self._queues.values()):
                    return
                batch = self._take()
                self._busy += 1
                self.batches += 1
            try:
                self._run(batch)
            finally:
                with self._cond:
                    self._busy -= 1

    def _run(self, batch: list[_Entry]) -> None:
        now = time.monotonic()
        for entry in batch:
            if entry.ticket.started is None:
                entry.ticket.started = now
        batch.sort(key=lambda e: -e.length)  # little padding
        try:
            scores = batch[0].lane.runner.run([e.item for e in batch])
            if len(scores) != len(batch):
                raise RuntimeError(f"lane {batch[0].lane.name} returned {len(scores)} scores")
        except BaseException as exc:  # a worker failure fails its callers; it never hangs them
            logger.warning("batch of %d pairs failed: %s", len(batch), exc)
            for entry in batch:
                entry.ticket.error = exc
                entry.ticket.done.set()
            return
        with self._cond:  # several workers may finish pairs of one ticket
            for entry, score in zip(batch, scores, strict=True):
                ticket = entry.ticket
                ticket.scores[entry.position] = float(score)
                ticket.remaining -= 1
                if ticket.remaining == 0:
                    ticket.done.set()

    def close(self) -> None:
        """Finish queued work, then stop the workers."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=60)
