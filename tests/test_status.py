"""Data, not live objects: the service's status is a frozen snapshot (what /health and /metrics
read), and each outcome carries its own timings (what headers, metrics and logs are built from)."""

from __future__ import annotations

import asyncio
import dataclasses
import pickle
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from reranker_server.devices import GpuGate
from reranker_server.engine.cache import MemoryScoreCache
from reranker_server.engine.cascades import Cascades, ServedCascade
from reranker_server.engine.engine import Engine
from reranker_server.engine.scheduler import Scheduler
from reranker_server.service import RerankService
from reranker_server.settings import Settings
from reranker_server.types import RerankJob, ServiceStatus

from .fakes import FakeAccelerator, KeywordRunner
from .test_scheduler import wait_until

QUERY = "capital of france"
DOCS = ["paris is the capital of france", "berlin is in germany", "bananas", "rome"]
PRIMITIVES = (str, int, float, bool, type(None))


class CountingAccelerator(FakeAccelerator):
    """Counts the device memory reads."""

    def __init__(self) -> None:
        super().__init__(free_mb=3000, total_mb=4096)
        self.reads = 0

    def free_memory_mb(self) -> float:
        self.reads += 1
        return super().free_memory_mb()


def two_cascades(accelerator: FakeAccelerator) -> Cascades:
    """Two engines sharing a stage-1 runner, scheduler, GPU gate and cache, as the loader builds
    them."""
    stage1, scheduler = KeywordRunner(), Scheduler(1)
    gate = GpuGate(accelerator, min_free_vram_mb=512, cooldown_s=30)
    cache = MemoryScoreCache(1 << 20)
    shared: dict[str, Any] = {"gate": gate, "cache": cache, "scheduler": scheduler}
    gpu = Engine(stage1, stage2_gpu=KeywordRunner("kw-gpu", device="cuda:0"), **shared)
    cpu = Engine(stage1, stage2_cpu=KeywordRunner("kw-cpu"), **shared)
    return Cascades([ServedCascade("gpu", gpu, default=True), ServedCascade("cpu", cpu, ("c",))])


def service(accelerator: FakeAccelerator) -> RerankService:
    settings = Settings(stage1_model="unused", offline=True, device="cpu")
    return RerankService(settings, engine_factory=lambda _s: two_cascades(accelerator))


def assert_frozen_data(value: object, path: str = "status") -> None:
    """`value` is plain data all the way down: frozen dataclasses, tuples and primitives."""
    if isinstance(value, PRIMITIVES):
        return
    if isinstance(value, tuple):
        for i, item in enumerate(value):
            assert_frozen_data(item, f"{path}[{i}]")
        return
    assert dataclasses.is_dataclass(value), f"{path} is a live {type(value).__name__}"
    assert type(value).__dataclass_params__.frozen, f"{path} is not frozen"  # type: ignore[attr-defined]
    for item in dataclasses.fields(value):
        assert_frozen_data(getattr(value, item.name), f"{path}.{item.name}")


def test_the_status_is_frozen_data() -> None:
    async def use() -> tuple[ServiceStatus, ServiceStatus]:
        svc = service(CountingAccelerator())
        before = svc.status()
        await svc.start()
        await svc.rerank(RerankJob(QUERY, DOCS, top_k=2, model="cpu"))
        status = await svc.snapshot()
        await svc.close()
        return before, status

    before, status = asyncio.run(use())
    assert not before.loaded and before.engine is None and before.gpu is None
    assert_frozen_data(before)
    assert_frozen_data(status)
    assert pickle.loads(pickle.dumps(status)) == status  # nothing in it but values
    # ... and it says what the live objects did
    assert [c.name for c in status.cascades] == ["gpu", "cpu"]
    gpu_engine, cpu_engine = (c.engine for c in status.cascades)
    assert gpu_engine.stage2_gpu is not None and gpu_engine.stage2_gpu.device == "cuda:0"
    assert cpu_engine.stage2 is not None and cpu_engine.stage2.name == "kw-cpu"
    assert gpu_engine.stage1 == cpu_engine.stage1  # one model, shared
    assert [s.name for s in status.schedulers] == ["cpu"]  # one scheduler, shared
    assert status.engine == gpu_engine  # the default cascade's
    assert status.engine.cache is not None and status.engine.cache.entries == 2 * len(DOCS)
    assert status.gpu is not None
    assert (status.gpu.state, status.gpu.free_mb, status.gpu.total_mb) == ("ok", 3000, 4096)


def test_a_snapshot_stays_as_it_was_taken() -> None:
    async def use() -> tuple[ServiceStatus, ServiceStatus]:
        svc = service(FakeAccelerator())
        await svc.start()
        first = svc.status()
        await svc.rerank(RerankJob(QUERY, DOCS, top_k=2))
        second = svc.status()
        await svc.close()
        return first, second

    first, second = asyncio.run(use())
    assert first.engine is not None and first.engine.cache is not None
    assert second.engine is not None and second.engine.cache is not None
    assert first.engine.cache.entries == 0 and second.engine.cache.entries == 2 * len(DOCS)


def test_gpu_memory_is_read_only_when_asked() -> None:
    """`status()` touches no device (it may run on the event loop); `snapshot()` reads the
    GPU's memory, in a thread."""
    accelerator = CountingAccelerator()

    async def use() -> tuple[ServiceStatus, int, ServiceStatus, int]:
        svc = service(accelerator)
        await svc.start()
        reads = accelerator.reads
        cheap = svc.status()
        after_cheap = accelerator.reads - reads
        full = await svc.snapshot()
        after_full = accelerator.reads - reads
        await svc.close()
        return cheap, after_cheap, full, after_full

    cheap, cheap_reads, full, full_reads = asyncio.run(use())
    assert cheap_reads == 0 and cheap.gpu is not None and cheap.gpu.free_mb is None
    assert full_reads == 1 and full.gpu is not None and full.gpu.free_mb == 3000


class GatedRunner(KeywordRunner):
    """Its first model call waits for `release`; `entered` is set once a call started."""

    def __init__(self) -> None:
        super().__init__()
        self.entered, self.release = threading.Event(), threading.Event()

    def score_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        self.entered.set()
        self.release.wait(10)
        return super().score_pairs(pairs)


def test_the_outcome_carries_the_time_it_waited_in_line() -> None:
    """A job queued behind another's running batch: its stage report says how long its pairs
    waited for the compute thread, and the outcome's queue wait adds up its stages'."""
    runner, scheduler = GatedRunner(), Scheduler(1)
    engine = Engine(runner, gate=GpuGate(None, 0, 0), scheduler=scheduler)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(engine.rerank, RerankJob("a", ["a"], top_k=1))
        assert runner.entered.wait(10)
        second = pool.submit(engine.rerank, RerankJob(QUERY, DOCS, top_k=2))
        wait_until(lambda: scheduler.queued == len(DOCS))
        runner.release.set()
        waited = second.result(10)
        first.result(10)
    scheduler.close()
    (stage1,) = waited.stages
    assert stage1.queued_s > 0 and stage1.seconds >= stage1.queued_s
    assert waited.queue_wait_s == stage1.queued_s
    assert not waited.plan_chosen  # RERANKER_STAGE1=always: no plan was chosen per request


def test_a_batch_waits_for_its_thread_once() -> None:
    """The time a request waited for a request thread is counted once, on its first job; the
    other jobs of a batch carry only their own stages' waits."""

    async def use() -> list[Any]:
        svc = service(FakeAccelerator())
        await svc.start()
        outcomes = await svc.rerank_batch([RerankJob(QUERY, DOCS, top_k=2) for _ in range(3)])
        await svc.close()
        return outcomes

    outcomes = asyncio.run(use())
    stage_waits = [sum(s.queued_s for s in o.stages) for o in outcomes]
    assert outcomes[0].queue_wait_s >= stage_waits[0]
    assert [o.queue_wait_s for o in outcomes[1:]] == stage_waits[1:]
