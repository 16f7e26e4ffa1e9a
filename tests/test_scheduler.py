"""The scheduler: cross-request batching, FIFO order, deadlines, failures, thread sizing."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest

from reranker_server.devices import GpuGate
from reranker_server.engine.engine import Engine
from reranker_server.engine.loader import load_engine
from reranker_server.engine.scheduler import PREPARE_SLICE, Lane, RunnerCopies, Scheduler
from reranker_server.errors import RequestCancelledError, RequestTimeoutError
from reranker_server.settings import Settings
from reranker_server.types import Cancellation, RerankJob, next_arrival

from .fakes import KeywordRunner

Pair = tuple[str, str]


class GatedRunner(KeywordRunner):
    """Records every call's pairs; the first call waits until `release` is set."""

    def __init__(self) -> None:
        super().__init__("gated")
        self.release = threading.Event()
        self.batches: list[list[Pair]] = []
        self.fail = False

    def score_pairs(self, pairs: Sequence[Pair]) -> list[float]:
        self.release.wait(10)
        if self.fail:
            raise RuntimeError("model exploded")
        self.batches.append(list(pairs))
        return [self.score(q, [d])[0] for q, d in pairs]


def wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def submit_in_order(
    scheduler: Scheduler,
    lane: Lane,
    jobs: list[list[Pair]],
    pool: ThreadPoolExecutor,
    orders: list[int] | None = None,
) -> list:  # type: ignore[type-arg]
    """Submit jobs one after the other (each queued before the next), as admitted requests."""
    futures = []
    submitted = scheduler.submitted
    for i, pairs in enumerate(jobs):
        order = orders[i] if orders else next_arrival()

        def call(pairs: list[Pair] = pairs, order: int = order):  # type: ignore[no-untyped-def]
            return scheduler.score(lane, pairs, order=order)

        futures.append(pool.submit(call))
        submitted += len(pairs)
        wait_until(lambda n=submitted: scheduler.submitted >= n)  # type: ignore[misc]
    return futures


def test_pairs_of_concurrent_requests_share_a_batch() -> None:
    runner = GatedRunner()
    scheduler = Scheduler(1)
    lane = Lane("stage2", runner, max_pairs=8)
    with ThreadPoolExecutor(4) as pool:
        blocker = submit_in_order(scheduler, lane, [[("q0", "warm")]], pool)
        wait_until(lambda: scheduler.busy == 1)  # the worker is held inside the first call
        a = [("paris", "paris is nice"), ("paris", "berlin")]
        b = [("dogs", "a dog"), ("dogs", "a cat"), ("dogs", "dogs dogs")]
        futures = submit_in_order(scheduler, lane, [a, b], pool)
        runner.release.set()
        results = [f.result(10) for f in blocker + futures]
    scheduler.close()
    assert len(runner.batches) == 2  # the blocker, then one batch with both requests' pairs
    assert sorted(runner.batches[1]) == sorted(a + b)
    # each request gets its own scores, in its own order
    assert results[1][0] == runner.score("paris", ["paris is nice", "berlin"])
    assert results[2][0] == runner.score("dogs", ["a dog", "a cat", "dogs dogs"])


def test_batches_respect_the_token_budget_and_pair_cap() -> None:
    runner = GatedRunner()
    runner.release.set()
    scheduler = Scheduler(1)
    docs = [" ".join(["word"] * n) for n in (30, 5, 5, 5, 5, 5)]
    lane = Lane("l", runner, max_pairs=3, batch_tokens=40)
    scores, tokens, _ = scheduler.score(lane, [("q", d) for d in docs])
    scheduler.close()
    assert scores == runner.score("q", docs)
    assert tokens == sum(3 + len(d.split()) for d in docs)
    for batch in runner.batches:
        lengths = [runner.length(p) for p in batch]
        assert len(batch) <= 3
        assert len(batch) == 1 or max(lengths) * len(batch) <= 40
        assert lengths == sorted(lengths, reverse=True)  # length-sorted: little padding


def test_requests_are_served_first_come_first_served() -> None:
    """No starvation: a request's pairs all run before those of a request admitted later,
    whatever their number or length, and stage 2 of a request keeps its place in line."""
    runner = GatedRunner()
    scheduler = Scheduler(1)
    stage1 = Lane("stage1", runner, max_pairs=1)
    stage2 = Lane("stage2", runner, max_pairs=1)
    with ThreadPoolExecutor(8) as pool:
        blocker = submit_in_order(scheduler, stage1, [[("q0", "x")]], pool)
        wait_until(lambda: scheduler.busy == 1)
        jobs = [
            [("A", "a " * 50), ("A", "a"), ("A", "a a")],
            [("B", "b")],
            [("C", "c " * 100), ("C", "c")],
        ]
        orders = [next_arrival() for _ in jobs]
        futures = submit_in_order(scheduler, stage1, jobs, pool, orders)
        # request A's next stage, queued last, still goes before B and C

        def stage2_of_oldest() -> tuple[list[float], int]:
            return scheduler.score(stage2, [("Z", "z")], order=orders[0])

        late = pool.submit(stage2_of_oldest)
        wait_until(lambda: scheduler.queued == 7)
        runner.release.set()
        for f in [*blocker, *futures, late]:
            f.result(10)
    scheduler.close()
    served = [batch[0][0] for batch in runner.batches]
    assert served == ["q0", "A", "A", "A", "Z", "B", "C", "C"]


def test_a_request_past_its_deadline_is_dropped_from_the_queue() -> None:
    runner = GatedRunner()
    scheduler = Scheduler(1)
    lane = Lane("l", runner)
    with ThreadPoolExecutor(2) as pool:
        blocker = submit_in_order(scheduler, lane, [[("q0", "x")]], pool)
        wait_until(lambda: scheduler.busy == 1)
        with pytest.raises(RequestTimeoutError):
            scheduler.score(lane, [("late", "a"), ("late", "b")], deadline=time.monotonic() + 0.1)
        assert scheduler.queued == 0  # its pairs are gone, not computed for nobody
        runner.release.set()
        blocker[0].result(10)
    scheduler.close()
    assert [b[0][0] for b in runner.batches] == ["q0"]


def test_a_cancelled_request_is_dropped_from_the_queue() -> None:
    """A job whose cancellation handle is set (its client went away) loses its queued pairs and
    its caller gets RequestCancelledError; nothing is computed for it."""
    runner = GatedRunner()
    scheduler = Scheduler(1)
    lane = Lane("l", runner)
    cancel = Cancellation()
    with ThreadPoolExecutor(2) as pool:
        blocker = submit_in_order(scheduler, lane, [[("q0", "x")]], pool)
        wait_until(lambda: scheduler.busy == 1)
        gone = pool.submit(scheduler.score, lane, [("gone", "a"), ("gone", "b")], cancel=cancel)
        wait_until(lambda: scheduler.queued == 2)
        cancel.cancel("client closed the connection")
        with pytest.raises(RequestCancelledError, match="client closed"):
            gone.result(10)
        assert scheduler.queued == 0 and scheduler.dropped == 2
        runner.release.set()
        blocker[0].result(10)
    scheduler.close()
    assert [b[0][0] for b in runner.batches] == ["q0"]


def test_a_failing_batch_fails_its_callers_and_the_worker_goes_on() -> None:
    runner = GatedRunner()
    runner.release.set()
    runner.fail = True
    scheduler = Scheduler(2)
    lane = Lane("l", runner, max_pairs=4)
    with pytest.raises(RuntimeError, match="model exploded"):
        scheduler.score(lane, [("q", "a"), ("q", "b")])
    runner.fail = False
    assert scheduler.score(lane, [("q", "q")])[0] == runner.score("q", ["q"])
    scheduler.close()


def keyword_engine(scheduler: Scheduler | None) -> Engine:
    return Engine(
        KeywordRunner("stage1"),
        gate=GpuGate(None, 0, 0),
        stage2_cpu=KeywordRunner("stage2", weight=lambda d: len(d) / 100),
        candidates=3,
        scheduler=scheduler,
    )


def test_engine_answers_are_the_same_through_the_scheduler() -> None:
    docs = ["paris is the capital of france", "berlin", "capital of france", "france", "tower"]
    direct = keyword_engine(None)
    scheduled = keyword_engine(Scheduler(2))
    queries = ["capital of france", "paris", "berlin tower", "what"]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda q: scheduled.rerank(RerankJob(q, docs, top_k=3)), queries))
    scheduled.close()
    for query, outcome in zip(queries, got, strict=True):
        expected = direct.rerank(RerankJob(query, docs, top_k=3))
        assert [(r.index, r.score) for r in outcome.results] == [
            (r.index, r.score) for r in expected.results
        ]


def test_real_stage1_through_the_scheduler_equals_direct_scores(
    make_settings: Callable[..., Settings],
) -> None:
    """Concurrent requests, merged in the queue, get the scores each gets alone, exactly."""
    engine = load_engine(make_settings(cpu_threads=2, cache_enabled=False))
    assert engine.scheduler is not None and engine.scheduler.runs == 2
    docs = [f"paris {' '.join(['capital'] * i)} france tower river" for i in range(12)]
    queries = ["capital of france", "river", "tower of paris", "music"]
    expected = [engine.stage1.score(q, docs) for q in queries]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda q: engine.rerank(RerankJob(q, docs, top_k=12)), queries))
    engine.close()
    for want, outcome in zip(expected, got, strict=True):
        assert {r.index: r.score for r in outcome.results} == dict(enumerate(want))
        assert outcome.tokens > len(docs)  # counted by the scheduler's tokenizer


@pytest.mark.parametrize(("cpu_threads", "workers"), [(2, 0), (2, 1), (2, 2), (8, 3), (3, 5)])
def test_threads_times_runs_never_exceed_the_cores(
    make_settings: Callable[..., Settings], cpu_threads: int, workers: int
) -> None:
    settings = make_settings(cpu_threads=cpu_threads, workers=workers)
    assert settings.runs() == (workers or cpu_threads)
    if settings.runs() <= cpu_threads:
        assert settings.runs() * settings.threads_per_worker() <= cpu_threads
    else:  # more runs than threads asked for: one thread each
        assert settings.threads_per_worker() == 1


def test_loader_sizes_the_scheduler_and_onnx_threads(
    make_settings: Callable[..., Settings],
) -> None:
    engine = load_engine(make_settings(cpu_threads=2, workers=1, warmup=False))
    try:
        assert engine.scheduler is not None and engine.scheduler.runs == 1
        options = engine.stage1._session.get_session_options()  # type: ignore[attr-defined]
        assert options.intra_op_num_threads == 2
    finally:
        engine.close()


def test_cpu_stage2_serves_concurrent_requests_in_parallel_runs(
    make_settings: Callable[..., Settings],
) -> None:
    """Two CPU runs score stage 2 at once (a cross-encoder copy each: a shared Hugging Face
    tokenizer breaks when two threads use it), and answers equal the direct ones."""
    engine = load_engine(
        make_settings(cpu_threads=2, stage2_on_cpu=True, cache_enabled=False, candidates=6)
    )
    docs = [" ".join(["paris capital france river"] * (1 + i % 7)) for i in range(16)]
    queries = [f"capital of france {i}" for i in range(12)]
    with ThreadPoolExecutor(12) as pool:
        got = list(pool.map(lambda q: engine.rerank(RerankJob(q, docs, top_k=6)), queries))
    for query, outcome in zip(queries, got, strict=True):
        assert outcome.stages[-1].stage == "stage2"
        expected = engine.stage2_cpu.score(query, [docs[r.index] for r in outcome.results])  # type: ignore[union-attr]
        assert [r.score for r in outcome.results] == pytest.approx(
            expected, abs=1e-5
        )  # fp32 moves ~1e-6 with padding
    engine.close()


def test_runner_copies_are_never_shared_by_two_threads_at_once() -> None:
    barrier = threading.Barrier(2, timeout=5)

    class Exclusive(KeywordRunner):
        def __init__(self) -> None:
            super().__init__("copy")
            self.users = 0

        def score(self, query: str, documents: Sequence[str]) -> list[float]:
            self.users += 1
            assert self.users == 1, "two threads in one copy"
            barrier.wait()  # both calls must be inside a copy at the same time
            self.users -= 1
            return super().score(query, documents)

    copies = RunnerCopies([Exclusive(), Exclusive()])
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda q: copies.score_pairs([(q, "q")]), ["a", "b"]))
    assert results == [
        [KeywordRunner().score("a", ["q"])[0]],
        [KeywordRunner().score("b", ["q"])[0]],
    ]


class CancelOnPrepare(KeywordRunner):
    """Tokenizing its first slice cancels the request (the client leaves mid-tokenization)."""

    def __init__(self, cancel: Cancellation) -> None:
        super().__init__("cancel-on-prepare")
        self.cancel = cancel
        self.prepared = 0

    def prepare(self, pairs: Sequence[Pair]) -> list[Pair]:
        self.prepared += len(pairs)
        self.cancel.cancel("client closed the connection")
        return list(pairs)


def test_a_request_cancelled_while_tokenizing_stops_before_the_queue() -> None:
    cancel = Cancellation()
    runner = CancelOnPrepare(cancel)
    scheduler = Scheduler(1)
    pairs = [("q", f"doc {i}") for i in range(PREPARE_SLICE * 3)]
    with pytest.raises(RequestCancelledError):
        scheduler.score(Lane("l", runner), pairs, cancel=cancel)
    assert runner.prepared == PREPARE_SLICE  # one slice, not all of them
    assert scheduler.submitted == 0 and scheduler.dropped == len(pairs)
    scheduler.close()
    assert runner.calls == []


def test_close_drops_queued_pairs_and_fails_their_callers() -> None:
    runner = GatedRunner()
    scheduler = Scheduler(1)
    lane = Lane("l", runner)
    with ThreadPoolExecutor(3) as pool:
        running = submit_in_order(scheduler, lane, [[("q0", "x")]], pool)
        wait_until(lambda: scheduler.busy == 1)
        waiting = pool.submit(scheduler.score, lane, [("q1", "a"), ("q1", "b")])
        wait_until(lambda: scheduler.queued == 2)
        closing = pool.submit(scheduler.close)
        with pytest.raises(RequestCancelledError, match="shutting down"):
            waiting.result(10)
        runner.release.set()  # the batch in flight finishes; then the worker stops
        running[0].result(10)
        closing.result(70)
    assert scheduler.dropped == 2
    assert [b[0][0] for b in runner.batches] == ["q0"]
