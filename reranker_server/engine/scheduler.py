"""The scheduler: one FIFO queue of pairs from all requests, batched, on a fixed set of threads.

A request's pairs are prepared (tokenized) in the request's own thread, sorted longest first and
queued. `runs` worker threads own the cores: each takes the oldest queued pair, whichever request
it belongs to, plus the pairs queued right behind it for the same model (a *lane*), as far as the
lane's batch allows (`max_pairs`, and `batch_tokens` padded tokens), and runs them as one batch.
So pairs of concurrent requests share batches (micro-batching across requests), and only `runs`
model calls compute at once (each with its own threads: runs x threads <= cores, see
Settings.runs).

Order is by request, then pair: every pair of a `RerankJob`, stage 2's too, keeps the job's
`order` (its place in line). So no request overtakes one admitted before it (FIFO: nothing
starves), and a request's stage 2 does not wait behind the stage 1 of requests admitted after it.
A job past its `deadline` gets `RequestTimeoutError`, a job whose `cancel` handle is set gets
`RequestCancelledError`; either way its queued pairs are dropped before they run (a batch already
running finishes, and its scores for that job are discarded). Pairs are tokenized
`PREPARE_SLICE` at a time, so a job cancelled while tokenizing stops too. `close()` drops
whatever is still queued.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ..errors import RequestCancelledError, RequestTimeoutError, raise_if_cancelled
from ..runners.base import Pair, PairwiseRunner, Runner, runner_stats, score_pairs
from ..types import Cancellation, SchedulerStatus, next_arrival

logger = logging.getLogger(__name__)

# How often a waiting request looks at its cancellation handle.
CANCEL_POLL_S = 0.05
# Pairs tokenized per call before the request's cancellation handle is looked at again (and
# other requests' tokenization gets a turn).
PREPARE_SLICE = 64


class RunnerCopies(PairwiseRunner):
    """Copies of a runner that two threads must not use at once (a Hugging Face tokenizer changes
    its padding state on every call): each call takes a free copy, or waits for the first one.
    With one copy per scheduler worker, no call waits."""

    def __init__(self, copies: Sequence[Runner]) -> None:
        first = copies[0]
        self.name = first.name
        self.device = first.device
        self.precision = first.precision
        self.max_pairs = first.max_pairs
        self.batch_tokens = first.batch_tokens
        self.files = first.files
        self._copies = [(runner, threading.Lock()) for runner in copies]

    def _take(self) -> tuple[Runner, threading.Lock]:
        for copy in self._copies:
            if copy[1].acquire(blocking=False):
                return copy
        self._copies[0][1].acquire()
        return self._copies[0]

    def score_pairs(self, pairs: Sequence[Pair]) -> list[float]:
        runner, lock = self._take()
        try:
            return score_pairs(runner, pairs)
        finally:
            lock.release()

    def stats(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for runner, _ in self._copies:
            for key, value in runner_stats(runner).items():
                totals[key] = totals.get(key, 0.0) + value
        return totals


@dataclass(frozen=True)
class Lane:
    """One model behind the scheduler, and how big its batches may be."""

    name: str
    runner: Runner
    max_pairs: int = 1
    batch_tokens: int = 8192

    @classmethod
    def of(cls, name: str, runner: Runner) -> Lane:
        """A lane with the runner's own batch bounds."""
        return cls(name, runner, runner.max_pairs, runner.batch_tokens)


class Scored(NamedTuple):
    """What `Scheduler.score` and `Submission.wait` return."""

    scores: list[float]
    tokens: int  # the pairs' tokens (`Runner.length`)
    queued_s: float  # from queuing to the first of its batches starting


@dataclass
class _Ticket:
    """One request's pairs in one lane."""

    scores: list[float]
    remaining: int
    submitted: float
    started: float | None = None
    error: BaseException | None = None
    cancelled: bool = False
    sealed: bool = False  # every pair is queued: done once none remains
    done: threading.Event = field(default_factory=threading.Event)


class Submission:
    """One request's pairs in one lane, queued as they come: the engine queues a group of
    windows while the next group is tokenized (engine/windows.py). `wait` returns all their
    scores in the order added; `drop` forgets them (the request failed or gave up)."""

    def __init__(
        self,
        scheduler: Scheduler,
        lane: Lane,
        order: int,
        deadline: float | None,
        cancel: Cancellation | None,
    ) -> None:
        self._scheduler = scheduler
        self._lane = lane
        self._order = order
        self._deadline = deadline
        self._cancel = cancel
        self._ticket = _Ticket(scores=[], remaining=0, submitted=time.monotonic())
        self.tokens = 0

    def add(self, pairs: Sequence[Pair], items: Sequence[Any] | None = None) -> None:
        """Queue `pairs`; `items`: the lane runner's items of them (None: prepared here,
        `PREPARE_SLICE` at a time, stopping when the request is cancelled)."""
        if items is None:
            prepared: list[Any] = []
            for start in range(0, len(pairs), PREPARE_SLICE):
                if self._cancel is not None and self._cancel.cancelled:  # tokenize no further
                    self.drop()
                    with self._scheduler._cond:
                        self._scheduler.dropped += len(pairs)
                    raise_if_cancelled(self._cancel)
                prepared += self._lane.runner.prepare(pairs[start : start + PREPARE_SLICE])
            items = prepared
        if len(items) != len(pairs):
            raise ValueError(f"{len(items)} items for {len(pairs)} pairs")
        if items:
            if not self._ticket.scores:  # the first pairs queued: their wait starts now
                self._ticket.submitted = time.monotonic()
            self.tokens += self._scheduler._queue(self._lane, self._order, self._ticket, items)

    def wait(self) -> Scored:
        """Scores of every pair added, in order, their tokens and how long they waited for a
        compute thread; blocks until all are scored (or raises: the deadline passed, the
        request was cancelled, the model failed)."""
        ticket = self._ticket
        with self._scheduler._cond:
            ticket.sealed = True
            if ticket.remaining == 0:
                ticket.done.set()
        self._scheduler._wait(ticket, self._deadline, self._cancel)
        started = ticket.started if ticket.started is not None else ticket.submitted
        return Scored(ticket.scores, self.tokens, started - ticket.submitted)

    def drop(self) -> None:
        """Forget the pairs still queued (a batch already running discards its scores)."""
        self._scheduler._drop(self._ticket)


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
        self.dropped = 0  # pairs dropped unrun or discarded: their request gave up
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

    def status(self, name: str) -> SchedulerStatus:
        """Its queue, busy threads and dropped pairs as data, labelled `name`."""
        return SchedulerStatus(name, self.queued, self.busy, self.dropped)

    def score(
        self,
        lane: Lane,
        pairs: Sequence[Pair],
        *,
        order: int | None = None,
        deadline: float | None = None,
        cancel: Cancellation | None = None,
        items: Sequence[Any] | None = None,
    ) -> Scored:
        """Scores of `pairs` (in order), their total tokens and how long they waited for a
        compute thread; blocks until all are scored.

        `order`: the request's place in line (None: now); `deadline` (`time.monotonic()`) and
        `cancel`: when to give up, see the module docstring. `items`: the pairs already
        prepared by the lane's runner (tokenize once); None: prepared here."""
        if not pairs:
            return Scored([], 0, 0.0)
        submission = self.open(lane, order=order, deadline=deadline, cancel=cancel)
        submission.add(pairs, items)
        return submission.wait()

    def open(
        self,
        lane: Lane,
        *,
        order: int | None = None,
        deadline: float | None = None,
        cancel: Cancellation | None = None,
    ) -> Submission:
        """A request's pairs in `lane`, queued as they come (`Submission.add`), then waited for
        (`Submission.wait`) or dropped (`Submission.drop`)."""
        return Submission(self, lane, next_arrival() if order is None else order, deadline, cancel)

    def _queue(self, lane: Lane, order: int, ticket: _Ticket, items: Sequence[Any]) -> int:
        """Queue `items` (longest first) after the ticket's earlier ones; their tokens."""
        lengths = [lane.runner.length(item) for item in items]
        positions = sorted(range(len(items)), key=lambda i: (-lengths[i], i))
        with self._cond:
            if self._closed:
                raise RuntimeError("scheduler is shut down")
            base = len(ticket.scores)
            ticket.scores += [0.0] * len(items)
            ticket.remaining += len(items)
            queue = self._queues.setdefault(lane.name, [])
            for position in positions:
                self._sequence += 1
                key = (order, self._sequence)
                entry = _Entry(
                    key, lane, items[position], lengths[position], ticket, base + position
                )
                heapq.heappush(queue, entry)
            self.submitted += len(items)
            self._cond.notify_all()
        return sum(lengths)

    def _wait(self, ticket: _Ticket, deadline: float | None, cancel: Cancellation | None) -> None:
        while True:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            if cancel is not None:
                timeout = CANCEL_POLL_S if timeout is None else min(timeout, CANCEL_POLL_S)
            if ticket.done.wait(timeout):
                break
            if cancel is not None and cancel.cancelled:
                self._drop(ticket)
                raise_if_cancelled(cancel)
            if deadline is not None and time.monotonic() >= deadline:
                self._drop(ticket)
                raise RequestTimeoutError(
                    "request did not finish in time; retry later", retry_after_s=1
                )
        if ticket.error is not None:
            raise ticket.error

    def _drop(self, ticket: _Ticket) -> None:
        """Forget a ticket's queued pairs; a batch already running discards its scores."""
        with self._cond:
            ticket.cancelled = True
            for name, queue in list(self._queues.items()):
                self._queues[name] = [e for e in queue if e.ticket is not ticket]
                heapq.heapify(self._queues[name])
            self.dropped += ticket.remaining

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
                if ticket.remaining == 0 and ticket.sealed:
                    ticket.done.set()

    def close(self) -> None:
        """Stop the workers: queued pairs are dropped (a caller still waiting gets
        `RequestCancelledError`), a batch already running finishes."""
        with self._cond:
            self._closed = True
            for queue in self._queues.values():
                for entry in queue:
                    ticket = entry.ticket
                    if not ticket.done.is_set():
                        self.dropped += ticket.remaining
                        ticket.cancelled = True
                        ticket.error = RequestCancelledError("the server is shutting down")
                        ticket.done.set()
                queue.clear()
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=60)
