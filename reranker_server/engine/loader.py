"""Build the engines from Settings: one per cascade (cascade_file.py), each stage's runner loaded
by kind (runners/registry.py) once per (kind, model, device) however many cascades use it; one
CPU scheduler, GPU gate and score cache shared by all; warm up."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

from ..cascade_file import Cascade, from_settings, read_cascades
from ..devices import Accelerator, GpuGate, detect_accelerator
from ..errors import ModelLoadError
from ..runners.base import Runner, TokenizingRunner
from ..runners.registry import load_runner
from ..settings import Settings
from ..types import LongDocPolicy
from .cache import MemoryScoreCache, RedisScoreCache, ScoreCache, namespace
from .cascades import Cascades, ServedCascade
from .engine import Engine
from .plan import StageCosts
from .scheduler import Lane, RunnerCopies, Scheduler
from .windows import Windower

logger = logging.getLogger(__name__)

WARMUP_QUERY = "warm up"
WARMUP_DOCUMENT = "the first request should not pay for lazy initialisation"


def load_cascades(
    settings: Settings, detect: Callable[[str, float], Accelerator | None] = detect_accelerator
) -> Cascades:
    """Every cascade the settings name (the `RERANKER_CASCADES` file, else one `default` from
    the stage settings), each model loaded once. Raises ModelLoadError with a one-line message.

    `detect(device, memory_limit_mb)` picks the GPU (tests hand in a fake device here)."""
    started = time.perf_counter()
    cascades = read_cascades(settings)
    models = SharedModels(settings, detect)
    served = []
    try:
        for cascade in cascades:
            engine = models.engine(cascade)
            served.append(ServedCascade(cascade.name, engine, cascade.aliases, cascade.default))
    except BaseException:
        models.close()
        raise
    logger.info(
        "models ready in %.1f s (%d cascade(s), %d model(s) loaded)",
        time.perf_counter() - started,
        len(served),
        models.loaded,
    )
    return Cascades(served)


def load_engine(
    settings: Settings, detect: Callable[[str, float], Accelerator | None] = detect_accelerator
) -> Engine:
    """The engine of the stage settings (`RERANKER_STAGE1_MODEL` ...: the cascade `default` of
    a server without a cascades file). Raises ModelLoadError with a one-line message."""
    started = time.perf_counter()
    engine = SharedModels(settings, detect).engine(from_settings(settings))
    logger.info("models ready in %.1f s", time.perf_counter() - started)
    return engine


class SharedModels:
    """What the cascades of one process share: the GPU (detected once; one gate, one GPU
    scheduler), one CPU scheduler (its threads own the cores; each cascade's stages are lanes on
    it), the score cache, and the runners, each loaded once per (kind, model, device)."""

    def __init__(
        self, settings: Settings, detect: Callable[[str, float], Accelerator | None]
    ) -> None:
        self.settings = settings
        self.accelerator = detect(settings.device, settings.gpu_memory_limit_mb)
        self.gate = GpuGate(self.accelerator, settings.min_free_vram_mb, settings.gpu_cooldown_s)
        self.cache = build_cache(settings)
        self._runners: dict[tuple[str, str, str], Runner] = {}
        self._warm: set[int] = set()  # ids of runners warmed up
        self._cpu: Scheduler | None = None
        self._gpu: Scheduler | None = None

    @property
    def loaded(self) -> int:
        """Runners loaded (a CPU stage 2's copies count once)."""
        return len(self._runners)

    def runner(self, kind: str, model: str, where: str) -> Runner:
        """The runner of `kind` for `model` on `where` ("cpu"; "gpu"; "cpu-copies": one copy per
        CPU run, as a tokenizer may not be thread-safe), loaded on first use."""
        key = (kind, model, where)
        if key not in self._runners:
            settings = self.settings
            if where == "gpu":
                self._runners[key] = load_runner(kind, model, settings, self.accelerator)
            elif where == "cpu-copies":
                copies = [load_runner(kind, model, settings) for _ in range(settings.runs())]
                self._runners[key] = RunnerCopies(copies)
            else:
                self._runners[key] = load_runner(kind, model, settings)
        return self._runners[key]

    def cpu_scheduler(self) -> Scheduler:
        if self._cpu is None:
            self._cpu = Scheduler(self.settings.runs(), name="cpu-run")
        return self._cpu

    def gpu_scheduler(self) -> Scheduler:
        if self._gpu is None:
            self._gpu = Scheduler(1, name="gpu-run")
        return self._gpu

    def engine(self, cascade: Cascade) -> Engine:
        """The cascade's engine. A load error names the cascade when it comes from a file."""
        try:
            return self._engine(cascade)
        except ModelLoadError as exc:
            if not cascade.origin:
                raise
            raise ModelLoadError(f"{cascade.origin}: [cascades.{cascade.name}] {exc}") from exc

    def _engine(self, cascade: Cascade) -> Engine:
        started = time.perf_counter()
        settings = self.settings
        stage1 = self.runner(cascade.stage1_kind, cascade.stage1, "cpu")
        if not isinstance(stage1, TokenizingRunner):
            fix = (
                'stage1_kind = "flashrank"' if cascade.origin else "RERANKER_STAGE1_KIND=flashrank"
            )
            raise ModelLoadError(
                f"runner kind {cascade.stage1_kind!r} can't be stage 1: it has no tokenizer for "
                f"long documents (encode_texts); fix: set {fix}"
            )
        stage2_gpu: Runner | None = None
        stage2_cpu: Runner | None = None
        if cascade.stage2 is not None:
            if self.accelerator is not None:
                stage2_gpu = self.runner(cascade.stage2_kind, cascade.stage2, "gpu")
            if cascade.stage2_on_cpu:
                stage2_cpu = self.runner(cascade.stage2_kind, cascade.stage2, "cpu-copies")
            if stage2_gpu is None and stage2_cpu is None:
                logger.info(
                    "cascade %r: no usable GPU and stage2_on_cpu is off: answers come from stage 1",
                    cascade.name,
                )
        roles = {"stage1": stage1, "stage2_gpu": stage2_gpu, "stage2_cpu": stage2_cpu}
        served = {role: runner for role, runner in roles.items() if runner is not None}
        engine = Engine(
            stage1,
            gate=self.gate,
            stage2_gpu=stage2_gpu,
            stage2_cpu=stage2_cpu,
            candidates=cascade.candidates,
            cache=self.cache,
            cache_namespaces=cache_namespaces(served, settings) if self.cache else None,
            windows=Windower(
                stage1,
                max_query_tokens=settings.max_query_tokens,
                overlap_tokens=settings.chunk_overlap_tokens,
            ),
            long_documents=default_policy(settings),
            scheduler=self.cpu_scheduler(),
            gpu_scheduler=self.gpu_scheduler() if stage2_gpu is not None else None,
            lanes=lanes(served, settings, cascade.candidates),
            stage1_mode=settings.stage1,
            costs=StageCosts(settings.stage1_auto_ewma_weight),
        )
        if settings.warmup:
            warm_up(engine, skip=self._warm)
            self._warm.update(id(runner) for runner in served.values())
            if settings.stage1 == "auto" and stage2_gpu is not None:
                costs = engine.calibrate()
                logger.info(
                    "cascade %r plan costs measured: %s",
                    cascade.name,
                    ", ".join(f"{role} {rate * 1e6:.3g} us/token" for role, rate in costs.items()),
                )
        logger.info(
            "cascade %r ready in %.1f s (stage 1: %s; stage 2: %s)",
            cascade.name,
            time.perf_counter() - started,
            stage1.name,
            stage2_gpu.device if stage2_gpu else ("cpu" if stage2_cpu else "off"),
        )
        return engine

    def close(self) -> None:
        """Stop the scheduler threads (a load failed half-way)."""
        for scheduler in (self._cpu, self._gpu):
            if scheduler is not None:
                scheduler.close()


def lanes(runners: dict[str, Runner], settings: Settings, candidates: int) -> dict[str, Lane]:
    """Batch bounds per role: each runner's own, except stage 2 on the CPU, whose candidates
    spread over the CPU runs (a request's stage 2 uses every core). A lane is named by its
    runner: cascades sharing a model batch its pairs together, and no batch mixes two models."""
    found = {
        role: Lane(f"{role}:{id(runner):x}", runner, runner.max_pairs, runner.batch_tokens)
        for role, runner in runners.items()
    }
    if "stage2_cpu" in runners:
        found["stage2_cpu"] = Lane(
            found["stage2_cpu"].name,
            runners["stage2_cpu"],
            max_pairs=max(1, -(-candidates // settings.runs())),
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


def warm_up(engine: Engine, skip: set[int] | None = None) -> None:
    """Pairs through every loaded model, so the first request pays for no lazy initialisation:
    a short and a long one through stage 1 (its memory arena grows once, here), one pair
    through each stage 2. `skip`: ids of runners already warm (shared by another cascade)."""
    skip = skip or set()
    if id(engine.stage1) not in skip:
        long_document = " ".join([WARMUP_DOCUMENT] * 40)
        engine.stage1.score(WARMUP_QUERY, [WARMUP_DOCUMENT, long_document])
    for runner in (engine.stage2_gpu, engine.stage2_cpu):
        if runner is not None and id(runner) not in skip:
            runner.score(WARMUP_QUERY, [WARMUP_DOCUMENT])
