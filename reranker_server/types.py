"""Value types shared by the engine, the service and the HTTP layer. Imports nothing from the
package: `RerankJob` (one query's work), `RerankWork` (a whole request's jobs with its totals:
what every dialect turns its body into and hands the service), `RerankOutcome` (the engine's
answer, with its own timings and plan), the status snapshots (`ServiceStatus` and what it holds:
frozen data read by /health and /metrics, never live runners, gates, schedulers or caches) and
the small types they hold."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

Backend = Literal["gpu", "cpu"]
FallbackReason = Literal["no_gpu", "low_vram", "cooldown", "oom", "cuda_error", "invalid_scores"]
LongDocMode = Literal["truncate", "chunk"]
KeepSide = Literal["start", "end"]
PlanName = Literal["cascade", "gpu_only"]  # engine/plan.py


@dataclass(frozen=True)
class ScoredDocument:
    """One document of the answer: its position in the request, its text and its score in [0, 1]."""

    index: int
    text: str
    score: float
    # Characters [start, end) of the document that gave the score, when only part of it was
    # scored (truncated, or the best chunk); None: the whole document.
    window: tuple[int, int] | None = None
    stage1_score: float | None = None  # stage 1's score of the document (its best window's)
    stage1_rank: int | None = None  # 1-based place in stage 1's order of the whole request


@dataclass(frozen=True)
class StageReport:
    """What one stage did for a request."""

    name: str  # "flashrank" | "cross-encoder"
    device: str  # "cpu" | "cuda:0" ...
    documents: int
    seconds: float
    stage: str = ""  # "stage1" | "stage2"
    cached: int | None = None  # documents answered from the score cache; None: cache not used
    queued_s: float = 0.0  # of `seconds`, the time its pairs waited for a compute thread

    @property
    def computed(self) -> int:
        """Documents the model scored."""
        return self.documents - (self.cached or 0)


@dataclass(frozen=True)
class RerankOutcome:
    """The engine's answer: results best first, and how they were produced."""

    results: list[ScoredDocument]
    backend: Backend
    stages: list[StageReport] = field(default_factory=list)
    fallback: FallbackReason | None = None
    documents: int = 0  # documents in the request
    tokens: int = 0  # tokens the stage-1 model processed (cache hits cost none)
    windows: int = 0  # (query, window) pairs stage 1 ranked: documents, or more when chunked
    pair_tokens: int = 0  # tokens of those pairs, cache hits included (the request's usage)
    cascade: str = ""  # the cascade that answered (set by the service)
    plan: PlanName = "cascade"  # gpu_only: stage 1 skipped, stage 2 scored every document
    plan_reason: str = ""  # why (engine/plan.py), e.g. "gpu est 12 ms < cpu est 300 ms"
    plan_chosen: bool = False  # the plan was chosen for this request (RERANKER_STAGE1=auto)
    # Seconds the job waited in line: its stages' pairs for a compute thread and (the first job
    # of a unit of work only) the request for a request thread (service.py).
    queue_wait_s: float = 0.0

    @property
    def cache_hits(self) -> int:
        return sum(s.cached or 0 for s in self.stages)

    @property
    def cache_misses(self) -> int:
        return sum(s.documents - s.cached for s in self.stages if s.cached is not None)


@dataclass(frozen=True)
class LongDocPolicy:
    """What to do with a document longer than fits beside the query in one model input.

    `truncate`: score its first tokens that fit (its last ones with `keep="end"`). `chunk`: cut it
    into overlapping windows that fit, score every window, the document's score is the best one.
    `max_chunks`: most windows per document (the rest of the text is not scored); `max_tokens`:
    only this many tokens of the document are considered (None: all). `max_windows`: most windows
    in the whole request (past it the request is refused).
    """

    mode: LongDocMode = "truncate"
    max_chunks: int = 10
    max_tokens: int | None = None
    keep: KeepSide = "start"
    max_windows: int = 10_000


@dataclass(frozen=True)
class TextTokens:
    """A text's tokens alone (no special tokens, not truncated): each token's character span and
    the word it belongs to (None for a token outside any word), and their ids when the tokenizer
    gives them (stage 1 then builds its pairs from them instead of tokenizing again)."""

    spans: list[tuple[int, int]]
    words: list[int | None]
    ids: list[int] | None = field(default=None, compare=False, repr=False)


class Cancellation:
    """A request's cancellation handle: set once (client gone, deadline passed, shutdown); the
    scheduler drops the request's queued pairs and its caller gets `RequestCancelledError`."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""

    def cancel(self, reason: str = "client closed the connection") -> None:
        if not self._event.is_set():
            self.reason = reason
            self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


_arrivals = itertools.count()


def next_arrival() -> int:
    return next(_arrivals)


@dataclass(frozen=True)
class RerankJob:
    """One query's work: what every dialect's body becomes, and what the engine takes.

    `top_k`: results wanted (at most the documents). `candidates`: stage-1 documents passed to
    stage 2 (None: the engine's default; never fewer than `top_k`). `policy`: long documents
    (None: the engine's default). `use_cache`: read and write the score cache. `deadline`:
    `time.monotonic()` by which the work must be done (None: none); `cancel`: set when nobody waits
    for the answer any more. `order`: the job's place in line; the scheduler runs older jobs'
    pairs first, so no request overtakes one admitted before it. `model`: the name the request
    asked for; the service picks the cascade by it (None, or a name no cascade has: the default
    cascade).
    """

    query: str
    texts: Sequence[str]
    top_k: int
    candidates: int | None = None
    policy: LongDocPolicy | None = None
    use_cache: bool = True
    deadline: float | None = None
    cancel: Cancellation | None = None
    order: int = field(default_factory=next_arrival)
    model: str | None = None


# The parts of a job an error may name (service and engine errors name these; a dialect's
# `RerankWork.fields` turns them into the request's own field paths).
JOB_PARTS = ("query", "documents", "top_k", "candidates", "model")


def job_part_names(position: int) -> dict[str, str]:
    """How an error names the parts of the job at `position` of a batch (`jobs[2].documents`)."""
    return {part: f"jobs[{position}].{part}" for part in JOB_PARTS}


def same_names(_position: int) -> Mapping[str, str]:
    """A request whose fields are called like the job's parts (`query`, `documents`)."""
    return {}


@dataclass(frozen=True)
class RerankWork:
    """A whole request as a dialect hands it to the service: the request's totals, which the
    service checks against the limits before anything else, and how to build its jobs (only once
    the totals pass: a 1.5 M-pair body is refused before 1.5 M jobs exist).

    Every field but the last ones is required, so a dialect cannot hand over work without saying
    what it asks for; the service refuses work whose jobs disagree with its totals.

    `documents`: texts to score in the whole request (vLLM pairs: the pairs). `queries`: jobs.
    `answer_bytes`: the most bytes the answer can take (texts and documents it echoes; see
    api/answer.py). `build`: the jobs, `queries` of them holding `documents` texts in all.
    `fields(position)`: how the request names the parts of the job at `position`
    (`{"query": "text_1[3]", "documents[0]": "text_2[3]"}`; keys from JOB_PARTS, optionally
    with an index). `documents_field`: the request's name for all its texts (`text_2`);
    `answer_field`: what makes the answer large (`return_documents`). `model`: the name the
    request as a whole asks for (a batch item's own `model` is its job's). `batch`: several
    queries answered as one unit (`max_batch_requests` applies; `max_documents` per job).
    """

    documents: int
    queries: int
    answer_bytes: int
    build: Callable[[], Sequence[RerankJob]]
    fields: Callable[[int], Mapping[str, str]] = same_names
    documents_field: str = "documents"
    answer_field: str = "documents"
    model: str | None = None
    batch: bool = False

    @classmethod
    def of(cls, jobs: Sequence[RerankJob], batch: bool = False) -> RerankWork:
        """Work from jobs already built (the CLI, a notebook, tests): totals counted from them,
        nothing echoed."""
        held = list(jobs)
        return cls(
            documents=sum(len(job.texts) for job in held),
            queries=len(held),
            answer_bytes=0,
            build=lambda: held,
            fields=job_part_names if batch else same_names,
            batch=batch,
        )


def unencodable(text: str) -> str | None:
    """None for text that is valid Unicode; else where it is not (a lone UTF-16 surrogate, which
    JSON's \\uXXXX escapes can carry, but neither UTF-8 nor a tokenizer can)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"a lone UTF-16 surrogate (\\u{ord(text[exc.start]):04x}) at character {exc.start}"
    return None


# --- status snapshots: what /health and /metrics read (service.status()); frozen data only


@dataclass(frozen=True)
class RunnerStatus:
    """A loaded model: its name, device and precision, and its counters (`stats`, e.g.
    `oom_retries`) when the snapshot was taken."""

    name: str
    device: str
    precision: str
    stats: tuple[tuple[str, float], ...] = ()

    def stat(self, key: str) -> float:
        return dict(self.stats).get(key, 0.0)


@dataclass(frozen=True)
class SchedulerStatus:
    """A scheduler's pairs waiting for a compute thread, threads computing, pairs dropped."""

    name: str  # "cpu", "gpu"
    queued: int
    busy: int
    dropped: int


@dataclass(frozen=True)
class CacheStatus:
    """The score cache: its backend, whether it answers, failed operations, and (in-process
    cache only) its entries and estimated bytes."""

    kind: str  # "memory" | "redis"
    available: bool
    errors: int
    entries: int | None = None
    bytes: int | None = None


@dataclass(frozen=True)
class GpuStatus:
    """The GPU gate (the breaker in front of stage 2 on the GPU).

    `state`: `absent` (no GPU), `ok`, `cooling_down` (resting after a fault: answers come from
    stage 1), `probing` (the next request tries one pair first), `degraded` (less free memory
    than the minimum). Memory figures are None when not read (a snapshot taken without touching
    the device) or unreadable; `degraded` needs them."""

    state: str
    device: str | None = None
    name: str | None = None
    free_mb: float | None = None
    total_mb: float | None = None
    last_failure: str | None = None
    cooldown_remaining_s: float | None = None
    cooldown_until: float | None = None  # wall clock (time.time())
    failures: tuple[tuple[str, int], ...] = ()  # by failure kind
    probes: tuple[tuple[str, int], ...] = ()  # ("passed", n), ("failed", n)


@dataclass(frozen=True)
class EngineStatus:
    """What one engine (one cascade) serves and how busy its schedulers are."""

    stage1: RunnerStatus
    stage2_gpu: RunnerStatus | None
    stage2_cpu: RunnerStatus | None
    cache: CacheStatus | None
    candidates: int
    schedulers: tuple[SchedulerStatus, ...] = ()

    @property
    def stage2(self) -> RunnerStatus | None:
        return self.stage2_gpu or self.stage2_cpu

    def model_names(self) -> set[str]:
        runners = (self.stage1, self.stage2_gpu, self.stage2_cpu)
        return {runner.name for runner in runners if runner is not None}


@dataclass(frozen=True)
class CascadeStatus:
    """One cascade: the names that pick it and what its engine serves."""

    name: str
    aliases: tuple[str, ...]
    default: bool
    engine: EngineStatus


@dataclass(frozen=True)
class ServiceStatus:
    """A snapshot for /health and /metrics."""

    loaded: bool
    cuda_available: bool
    model_load_seconds: float | None
    in_flight: int  # requests admitted, running or queued
    running: int  # requests in a worker thread now
    queued: int  # requests admitted and waiting for a worker
    engine: EngineStatus | None  # the default cascade's; None until the models are loaded
    cascades: tuple[CascadeStatus, ...] = ()  # every cascade, the default first
    schedulers: tuple[SchedulerStatus, ...] = ()  # each once, all cascades
    gpu: GpuStatus | None = None  # the default cascade's GPU gate; None until loaded
