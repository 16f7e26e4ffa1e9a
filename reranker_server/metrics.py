"""Prometheus metrics, one `CollectorRegistry` per app (so several apps in one process, as in
tests, never collide). Names are `reranker_<thing>_<unit>`; every label has a bounded set of
values (routes are route templates, devices and stages come from the loaded models).

Counters and histograms are updated per request by the HTTP middleware (`observe_request`, from
the request's outcomes); gauges that describe the present (queue, GPU memory, cache size and
health, model-load time) are read at scrape time by `StateCollector` from the service's status
snapshot (frozen data, types.py), so nothing has to keep them up to date.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .types import (
    CacheStatus,
    EngineStatus,
    GpuStatus,
    RerankOutcome,
    SchedulerStatus,
    ServiceStatus,
)

# 0.5 ms .. 60 s: a cache hit is sub-millisecond, 1,000 long passages on a CPU take seconds.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
COUNT_BUCKETS = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)
TOKEN_BUCKETS = (0, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576)


class Metrics:
    """The app's metrics and its registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "reranker_requests_total",
            "HTTP requests by route template, dialect and status code.",
            ["route", "dialect", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "reranker_request_duration_seconds",
            "Time from request start to response end.",
            ["route", "dialect"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_seconds = Histogram(
            "reranker_stage_duration_seconds",
            "Time per stage of a rerank: queue_wait (for a worker), stage1 and stage2 (cache "
            "lookup + tokenization + inference of the pairs not cached).",
            ["stage", "device"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.documents = Histogram(
            "reranker_request_documents",
            "Documents per rerank request.",
            buckets=COUNT_BUCKETS,
            registry=r,
        )
        self.tokens = Histogram(
            "reranker_request_tokens",
            "Tokens the stage-1 model processed per request (cache hits cost none).",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.batch_pairs = Histogram(
            "reranker_batch_size_pairs",
            "Pairs one stage sent to its model in a request (after the cache).",
            ["stage", "device"],
            buckets=COUNT_BUCKETS,
            registry=r,
        )
        self.backend = Counter(
            "reranker_backend_requests_total",
            "Rerank answers by what produced the final order (gpu or cpu).",
            ["backend"],
            registry=r,
        )
        self.plans = Counter(
            "reranker_plans_total",
            "Rerank answers by plan: cascade (stage 1, then stage 2 on the candidates) or "
            "gpu_only (RERANKER_STAGE1=auto: stage 2 on the GPU scored every document).",
            ["plan"],
            registry=r,
        )
        self.fallbacks = Counter(
            "reranker_gpu_fallbacks_total",
            "Requests a loaded GPU model did not answer, by reason "
            "(oom, cuda_error, low_vram, cooldown).",
            ["reason"],
            registry=r,
        )
        self.cascades = Counter(
            "reranker_cascade_requests_total",
            "Rerank requests answered, by the cascade the request's `model` picked (a batch "
            "counts once per cascade it used).",
            ["cascade"],
            registry=r,
        )
        self.cache_hits = Counter(
            "reranker_cache_hits_total", "Pair scores found in the cache.", ["stage"], registry=r
        )
        self.cache_misses = Counter(
            "reranker_cache_misses_total",
            "Pair scores not in the cache (computed).",
            ["stage"],
            registry=r,
        )
        # process_cpu_seconds_total, process_resident_memory_bytes, ... (Linux: /proc), which
        # `reranker-server eval --url` reads; and the connections the server cut
        ProcessCollector(registry=r)
        r.register(ConnectionCollector())

    def observe_request(
        self,
        route: str,
        dialect: str,
        status: int,
        seconds: float,
        outcomes: Sequence[RerankOutcome] = (),
    ) -> None:
        """One HTTP request and the outcomes of its jobs (none when it failed)."""
        self.requests.labels(route, dialect, str(status)).inc()
        self.request_seconds.labels(route, dialect).observe(seconds)
        if outcomes:
            queue_wait = sum(o.queue_wait_s for o in outcomes)
            self.stage_seconds.labels("queue_wait", "none").observe(queue_wait)
        for cascade in dict.fromkeys(o.cascade for o in outcomes if o.cascade):
            self.cascades.labels(cascade).inc()
        for outcome in outcomes:
            self.documents.observe(outcome.documents)
            self.tokens.observe(outcome.tokens)
            self.backend.labels(outcome.backend).inc()
            self.plans.labels(outcome.plan).inc()
            if outcome.fallback is not None and outcome.fallback != "no_gpu":
                self.fallbacks.labels(outcome.fallback).inc()
            for stage in outcome.stages:
                self.stage_seconds.labels(stage.stage, stage.device).observe(stage.seconds)
                self.batch_pairs.labels(stage.stage, stage.device).observe(stage.computed)
                if stage.cached is not None:
                    self.cache_hits.labels(stage.stage).inc(stage.cached)
                    self.cache_misses.labels(stage.stage).inc(stage.documents - stage.cached)


class StateCollector(Collector):
    """Gauges read at scrape time from the service's status snapshot (`status` is called per
    scrape; the app hands in one that reads the GPU's memory)."""

    def __init__(self, status: Callable[[], ServiceStatus]) -> None:
        self._status = status

    def describe(self) -> Iterable[Metric]:
        return []  # dynamic: some families exist only with a GPU or a cache

    def collect(self) -> Iterable[Metric]:
        status = self._status()
        queued = GaugeMetricFamily(
            "reranker_queue_depth_requests", "Requests waiting for an inference worker."
        )
        running = GaugeMetricFamily(
            "reranker_in_flight_requests", "Requests running in an inference worker."
        )
        queued.add_metric([], status.queued)
        running.add_metric([], status.running)
        yield queued
        yield running

        if status.model_load_seconds is not None:
            load = GaugeMetricFamily(
                "reranker_model_load_seconds", "Time to load and warm up the models at startup."
            )
            load.add_metric([], status.model_load_seconds)
            yield load

        engine = status.engine
        if engine is None:
            return
        yield from _scheduler_metrics(status.schedulers or engine.schedulers)
        yield from _cache_metrics(engine.cache)
        if status.gpu is not None:
            yield from _gpu_metrics(status.gpu)
            yield from _breaker_metrics(status.gpu, [c.engine for c in status.cascades] or [engine])


def _cache_metrics(cache: CacheStatus | None) -> Iterable[Metric]:
    if cache is None:
        return
    labels = ["backend"]
    up = GaugeMetricFamily(
        "reranker_cache_up", "1 if the score cache backend answers, 0 if it is down.", labels=labels
    )
    up.add_metric([cache.kind], 1.0 if cache.available else 0.0)
    yield up
    errors = CounterMetricFamily(
        "reranker_cache_errors",
        "Cache operations that failed (the request went on without the cache).",
        labels=labels,
    )
    errors.add_metric([cache.kind], cache.errors)
    yield errors
    if cache.entries is not None:
        entries = GaugeMetricFamily(
            "reranker_cache_entries", "Scores held by the in-process cache.", labels=labels
        )
        entries.add_metric([cache.kind], cache.entries)
        yield entries
        size = GaugeMetricFamily(
            "reranker_cache_size_bytes", "Estimated memory of the in-process cache.", labels=labels
        )
        size.add_metric([cache.kind], cache.bytes or 0)
        yield size


def _gpu_metrics(gpu: GpuStatus) -> Iterable[Metric]:
    if gpu.device is None or gpu.free_mb is None or gpu.total_mb is None:
        return  # no GPU, or its memory was not read
    free, total, device = gpu.free_mb * 2**20, gpu.total_mb * 2**20, gpu.device
    used_family = GaugeMetricFamily(
        "reranker_gpu_memory_used_bytes", "GPU memory in use (all processes).", labels=["device"]
    )
    free_family = GaugeMetricFamily(
        "reranker_gpu_memory_free_bytes", "GPU memory free.", labels=["device"]
    )
    used_family.add_metric([device], total - free)
    free_family.add_metric([device], free)
    yield used_family
    yield free_family


def _breaker_metrics(gpu: GpuStatus, cascades: list[EngineStatus]) -> Iterable[Metric]:
    """The OOM ladder's rungs (every cascade's GPU models, each once) and the breaker's probes
    and state (only with a GPU model)."""
    gpu_runners = [c.stage2_gpu for c in cascades if c.stage2_gpu is not None]
    runners = {(r.name, r.device): r for r in gpu_runners}  # a model two cascades share: once
    if not runners:
        return
    rungs = CounterMetricFamily(
        "reranker_gpu_oom_retries",
        "Stage-2 batches retried with half the pairs after a CUDA out-of-memory.",
    )
    rungs.add_metric([], sum(r.stat("oom_retries") for r in runners.values()))
    yield rungs
    probes = CounterMetricFamily(
        "reranker_gpu_probes",
        "One-pair GPU probes after a cool-down, by result.",
        labels=["result"],
    )
    for result, count in gpu.probes:
        probes.add_metric([result], count)
    yield probes
    cooling = GaugeMetricFamily(
        "reranker_gpu_cooling_down", "1 while the GPU rests after a fault (answers from stage 1)."
    )
    cooling.add_metric([], 1.0 if gpu.state == "cooling_down" else 0.0)
    yield cooling


def _scheduler_metrics(schedulers: Sequence[SchedulerStatus]) -> Iterable[Metric]:
    """Pairs waiting for a compute thread, threads computing, and pairs dropped, per scheduler."""
    queued = GaugeMetricFamily(
        "reranker_queued_pairs", "Pairs waiting for a compute thread.", labels=["scheduler"]
    )
    busy = GaugeMetricFamily(
        "reranker_busy_compute_threads",
        "Compute threads running a batch now.",
        labels=["scheduler"],
    )
    dropped = CounterMetricFamily(
        "reranker_dropped_pairs",
        "Pairs dropped before they ran, or whose scores were discarded, because their request "
        "was cancelled (client gone, timeout, shutdown).",
        labels=["scheduler"],
    )
    for scheduler in schedulers:
        queued.add_metric([scheduler.name], scheduler.queued)
        busy.add_metric([scheduler.name], scheduler.busy)
        dropped.add_metric([scheduler.name], scheduler.dropped)
    yield queued
    yield busy
    yield dropped


class ConnectionTally:
    """Connections the server cut on its own, by reason (server.HttpProtocol). Process-wide, as
    the process metrics are: the protocol serves whatever app the process runs."""

    REASONS = ("header_timeout", "body_timeout", "write_timeout")

    def __init__(self) -> None:
        self.counts = dict.fromkeys(self.REASONS, 0)

    def add(self, reason: str) -> None:
        self.counts[reason] += 1


CLOSED_CONNECTIONS = ConnectionTally()


class ConnectionCollector(Collector):
    """`reranker_connections_closed_total{reason}` from `CLOSED_CONNECTIONS`, at scrape time."""

    def describe(self) -> Iterable[Metric]:
        return self.collect()

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(
            "reranker_connections_closed",
            "Connections the server cut: headers or body not sent in time, or an answer not "
            "read in time (write_timeout).",
            labels=["reason"],
        )
        for reason, count in CLOSED_CONNECTIONS.counts.items():
            family.add_metric([reason], count)
        yield family
