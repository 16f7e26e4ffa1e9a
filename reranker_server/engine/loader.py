"""Build an Engine from Settings: load each stage's runner by kind (runners/registry.py), build
the lanes, schedulers and score cache, warm up."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

from ..devices import Accelerator, GpuGate, detect_accelerator
from ..errors import ModelLoadError
from ..runners.base import Runner, TokenizingRunner
from ..runners.registry import load_runner
from ..settings import Settings
from ..types import LongDocPolicy
from .cache import MemoryScoreCache, RedisScoreCache, ScoreCache, namespace
from .engine import Engine
from .plan import StageCosts
from .scheduler import Lane, RunnerCopies, Scheduler
from .windows import Windower

logger = logging.getLogger(__name__)

WARMUP_QUERY = "warm up"
WARMUP_DOCUMENT = "the first request should not pay for lazy initialisation"


def load_engine(
    settings: Settings, detect: Callable[[str, float], Accelerator | None] = detect_accelerator
) -> Engine:
    """Load both stages as the settings say. Raises ModelLoadError with a one-line message.

    `detect(device, memory_limit_mb)` picks the GPU (tests hand in a fake device here). Each
    stage's runner comes from the runner registry by kind (`stage1_kind`, `stage2_kind`).
    """
    started = time.perf_counter()
    stage1 = load_runner(settings.stage1_kind, settings.stage1_model, settings)
    if not isinstance(stage1, TokenizingRunner):
        raise ModelLoadError(
            f"runner kind {settings.stage1_kind!r} can't be stage 1: it has no tokenizer for "
            "long documents (encode_texts); fix: set RERANKER_STAGE1_KIND=flashrank"
        )

    accelerator = detect(settings.device, settings.gpu_memory_limit_mb)
    gate = GpuGate(accelerator, settings.min_free_vram_mb, settings.gpu_cooldown_s)
    stage2_gpu: Runner | None = None
    stage2_cpu: Runner | None = None
    kind, model = settings.stage2_kind, settings.stage2_model
    if accelerator is not None:
        stage2_gpu = load_runner(kind, model, settings, accelerator)
    if settings.stage2_on_cpu:  # a copy per CPU run: a tokenizer may not be thread-safe
        stage2_cpu = RunnerCopies(
            [load_runner(kind, model, settings) for _ in range(settings.runs())]
        )
    if stage2_gpu is None and stage2_cpu is None:
        logger.info("no usable GPU and stage2_on_cpu is off: answers come from stage 1")
    cache = build_cache(settings)
    roles = {"stage1": stage1, "stage2_gpu": stage2_gpu, "stage2_cpu": stage2_cpu}
    served = {role: runner for role, runner in roles.items() if runner is not None}
    engine = Engine(
        stage1,
        gate=gate,
        stage2_gpu=stage2_gpu,
        stage2_cpu=stage2_cpu,
        candidates=settings.candidates,
        cache=cache,
        cache_namespaces=cache_namespaces(served, settings) if cache is not None else None,
        windows=Windower(
            stage1,
            max_query_tokens=settings.max_query_tokens,
            overlap_tokens=settings.chunk_overlap_tokens,
        ),
        long_documents=default_policy(settings),
        scheduler=Scheduler(settings.runs(), name="cpu-run"),
        gpu_scheduler=Scheduler(1, name="gpu-run") if stage2_gpu is not None else None,
        lanes=lanes(served, settings),
        stage1_mode=settings.stage1,
        costs=StageCosts(settings.stage1_auto_ewma_weight),
    )
    if settings.warmup:
        warm_up(engine)
        if settings.stage1 == "auto" and stage2_gpu is not None:
            costs = engine.calibrate()
            logger.info(
                "plan costs measured: %s",
                ", ".join(f"{role} {rate * 1e6:.3g} us/token" for role, rate in costs.items()),
            )
    logger.info(
        "models ready in %.1f s (stage 1: %s; stage 2: %s)",
        time.perf_counter() - started,
        stage1.name,
        stage2_gpu.device if stage2_gpu else ("cpu" if stage2_cpu else "off"),
    )
    return engine


def lanes(runners: dict[str, Runner], settings: Settings) -> dict[str, Lane]:
    """Batch bounds per role: each runner's own, except stage 2 on the CPU, whose candidates
    spread over the CPU runs (a request's stage 2 uses every core)."""
    found = {role: Lane.of(role, runner) for role, runner in runners.items()}
    if "stage2_cpu" in runners:
        found["stage2_cpu"] = Lane(
            "stage2_cpu",
            runners["stage2_cpu"],
            max_pairs=max(1, -(-settings.candidates // settings.runs())),
            batch_tokens=settings.stage1_batch_tokens,
        )
    return found


def cache_namespaces(runners: dict[str, Runner], settings: Settings) -> dict[str, str]:
    """Score-cache namespace per role: the model's identity (files fingerprinted), device and
    what changes its scores (length, precision, one pair per call for stage 1)."""
    found = {}
    for role, runner in runners.items():
        if role == "stage1":  # batch-invariant: older batched scores never match
            extra = {"scoring": "one-pair-per-call"}
        else:  # fp16 scores differ a bit
            extra = {"precision": runner.precision}
        found[role] = namespace(
            "stage1" if role == "stage1" else "stage2",
            identity(runner),
            runner.device,
            max_length=settings.max_length,
            **extra,
        )
    return found


def identity(runner: Runner) -> str:
    """The model's identity in score-cache keys: its name and a fingerprint of its files."""
    return f"{runner.name}@{fingerprint(runner.files)}" if runner.files else runner.name


def default_policy(settings: Settings) -> LongDocPolicy:
    """What requests that say nothing about long documents get."""
    return LongDocPolicy(
        mode=settings.long_documents,
        max_chunks=settings.max_chunks_per_doc,
        max_windows=settings.max_windows_per_request,
    )


def build_cache(settings: Settings) -> ScoreCache | None:
    """The score cache the settings ask for: None, Redis (cache_url) or in-process memory."""
    if not settings.cache_enabled:
        logger.info("score cache: off")
        return None
    if settings.cache_url:
        redis_cache = RedisScoreCache(
            settings.cache_url, ttl_s=settings.cache_ttl_s, timeout_s=settings.cache_timeout_s
        )
        redis_cache.get_many(["ping"])  # logs a warning now if Redis is unreachable
        logger.info("score cache: Redis at %s", redis_cache.url)
        return redis_cache
    logger.info("score cache: in-process, %g MiB", settings.cache_size_mb)
    return MemoryScoreCache(int(settings.cache_size_mb * 2**20), ttl_s=settings.cache_ttl_s)


def fingerprint(path: Path) -> str:
    """SHA-256 (16 hex digits) of the model files under `path`: names and contents, so replicas
    with the same model share cache entries and a changed model never reads old ones."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if any(part.startswith(".") for part in file.relative_to(path).parts):
            continue  # .complete markers, .cache folders
        digest.update(str(file.relative_to(path)).encode("utf-8") + b"\0")
        with file.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def warm_up(engine: Engine) -> None:
    """Pairs through every loaded model, so the first request pays for no lazy initialisation:
    a short and a long one through stage 1 (its memory arena grows once, here), one pair
    through each stage 2."""
    long_document = " ".join([WARMUP_DOCUMENT] * 40)
    engine.stage1.score(WARMUP_QUERY, [WARMUP_DOCUMENT, long_document])
    for runner in (engine.stage2_gpu, engine.stage2_cpu):
        if runner is not None:
            runner.score(WARMUP_QUERY, [WARMUP_DOCUMENT])
