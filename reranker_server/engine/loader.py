"""Build the engines: one per cascade (specs.py, cascade_file.py), all checked and placed first
(preflight.py), each stage's runner built from its StageSpec by its kind (runners/registry.py),
once per (spec, device) however many cascades use it; one CPU scheduler, one gate per GPU and one
score cache shared by all; warm up."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

from ..cascade_file import read_cascades
from ..devices import Accelerator, GpuGate, detect_accelerator
from ..errors import ModelLoadError
from ..model_store import ModelStore
from ..preflight import CascadePlan, describe, plan_cascades
from ..runners.base import Runner, TokenizingRunner, score
from ..runners.kind import LoadTarget
from ..runners.registry import load_runner
from ..settings import Settings
from ..specs import CascadeSpec, StageSpec, default_cascade
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
    the stage settings), each checked before any loads (preflight.py), each model loaded once.
    Raises ModelLoadError with a one-line message.

    `detect(device, memory_limit_mb)` picks the GPU (tests hand in a fake device here)."""
    started = time.perf_counter()
    cascades = read_cascades(settings)
    models = SharedModels(settings, detect)
    plans = models.plan(cascades)
    served = []
    try:
        for plan in plans:
            engine = models.engine(plan)
            cascade = plan.cascade
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
    models = SharedModels(settings, detect)
    (plan,) = models.plan([default_cascade(settings)])
    engine = models.engine(plan)
    logger.info("models ready in %.1f s", time.perf_counter() - started)
    return engine


class SharedModels:
    """What the cascades of one process share: the GPUs (each detected once; one gate each, one
    GPU scheduler), one CPU scheduler (its threads own the cores; each cascade's stages are lanes
    on it), the score cache, and the runners, each loaded once per (spec, device)."""

    def __init__(
        self, settings: Settings, detect: Callable[[str, float], Accelerator | None]
    ) -> None:
        self.settings = settings
        self.store = ModelStore.from_settings(settings)
        self._detect = detect
        self._accelerators: dict[str, Accelerator | None] = {}
        self._gates: dict[str, GpuGate] = {}
        self.cache = build_cache(settings)
        self._runners: dict[tuple[StageSpec, str], Runner] = {}
        self._warm: set[int] = set()  # ids of runners warmed up
        self._cpu: Scheduler | None = None
        self._gpu: Scheduler | None = None

    @property
    def loaded(self) -> int:
        """Runners loaded (a CPU stage 2's copies count once)."""
        return len(self._runners)

    def accelerator(self, policy: str) -> Accelerator | None:
        """The GPU a device policy gets here (auto: the one `RERANKER_DEVICE` picks), or None."""
        device = self.settings.device if policy in ("auto", "cpu") else policy
        if device not in self._accelerators:
            self._accelerators[device] = self._detect(device, self.settings.gpu_memory_limit_mb)
        return self._accelerators[device]

    def gate(self, policy: str | None) -> GpuGate:
        """The breaker of the GPU a policy gets (one per GPU; None: the no-GPU gate)."""
        accelerator = self.accelerator(policy) if policy is not None else None
        key = accelerator.torch_device if accelerator is not None else "none"
        if key not in self._gates:
            settings = self.settings
            self._gates[key] = GpuGate(
                accelerator, settings.min_free_vram_mb, settings.gpu_cooldown_s
            )
        return self._gates[key]

    def plan(self, cascades: list[CascadeSpec]) -> list[CascadePlan]:
        """Every cascade checked and placed before anything loads; the plan is logged, one line
        per cascade."""
        plans = plan_cascades(cascades, self.store, lambda p: self.accelerator(p) is not None)
        for line in describe(plans):
            logger.info("%s", line)
        return plans

    def runner(self, spec: StageSpec, where: str) -> Runner:
        """The runner of a stage on `where` ("cpu"; "gpu"; "cpu-copies": one copy per CPU run,
        as a tokenizer may not be thread-safe), loaded on first use. Specs that differ only in
        where they may run share it."""
        key = (spec.model_copy(update={"device": "auto", "cpu_fallback": False}), where)
        if key not in self._runners:
            threads = self.settings.threads_per_worker()
            if where == "gpu":
                target = LoadTarget(self.accelerator(spec.device), threads)
                self._runners[key] = load_runner(spec, self.store, target)
            elif where == "cpu-copies":
                target = LoadTarget(None, threads)
                copies = [
                    load_runner(spec, self.store, target) for _ in range(self.settings.runs())
                ]
                self._runners[key] = RunnerCopies(copies)
            else:
                self._runners[key] = load_runner(spec, self.store, LoadTarget(None, threads))
        return self._runners[key]

    def cpu_scheduler(self) -> Scheduler:
        if self._cpu is None:
            self._cpu = Scheduler(self.settings.runs(), name="cpu-run")
        return self._cpu

    def gpu_scheduler(self) -> Scheduler:
        if self._gpu is None:
            self._gpu = Scheduler(1, name="gpu-run")
        return self._gpu

    def engine(self, plan: CascadePlan) -> Engine:
        """The cascade's engine. A load error names the cascade when it comes from a file."""
        cascade = plan.cascade
        try:
            return self._engine(plan)
        except ModelLoadError as exc:
            if not cascade.origin:
                raise
            raise ModelLoadError(f"{cascade.origin}: [cascades.{cascade.name}] {exc}") from exc

    def _engine(self, plan: CascadePlan) -> Engine:
        started = time.perf_counter()
        settings, cascade = self.settings, plan.cascade
        stage1 = self.runner(plan.stage1.spec, "cpu")
        if not isinstance(stage1, TokenizingRunner):
            raise ModelLoadError(
                f"{cascade.where(1, 'kind')}: runner kind {plan.stage1.kind.name!r} can't be "
                "stage 1: it has no tokenizer for long documents (encode_texts); fix: a stage-1 "
                "kind such as flashrank"
            )
        stage2_gpu: Runner | None = None
        stage2_cpu: Runner | None = None
        specs: dict[str, StageSpec] = {"stage1": plan.stage1.spec}
        second = plan.stage2
        if second is not None:
            if second.placement == "gpu":
                stage2_gpu = self.runner(second.spec, "gpu")
                specs["stage2_gpu"] = second.spec
            if second.placement == "cpu" or second.cpu_copy:
                stage2_cpu = self.runner(second.spec, "cpu-copies")
                specs["stage2_cpu"] = second.spec
        roles = {"stage1": stage1, "stage2_gpu": stage2_gpu, "stage2_cpu": stage2_cpu}
        served = {role: runner for role, runner in roles.items() if runner is not None}
        engine = Engine(
            stage1,
            gate=self.gate(second.spec.device if second and second.placement == "gpu" else None),
            stage2_gpu=stage2_gpu,
            stage2_cpu=stage2_cpu,
            candidates=cascade.candidates,
            cache=self.cache,
            cache_namespaces=cache_namespaces(served, specs) if self.cache else None,
            windows=Windower(
                stage1,
                max_query_tokens=settings.max_query_tokens,
                overlap_tokens=settings.chunk_overlap_tokens,
            ),
            long_documents=LongDocPolicy(
                mode=cascade.long_documents,
                max_chunks=cascade.max_chunks_per_doc,
                max_windows=settings.max_windows_per_request,
            ),
            scheduler=self.cpu_scheduler(),
            gpu_scheduler=self.gpu_scheduler() if stage2_gpu is not None else None,
            lanes=lanes(served, settings, cascade.candidates, specs),
            stage1_mode=settings.stage1,
            costs=StageCosts(settings.stage1_auto_ewma_weight),
            stage2_home=second.home if second is not None else None,
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


def lanes(
    runners: dict[str, Runner],
    settings: Settings,
    candidates: int,
    specs: dict[str, StageSpec] | None = None,
) -> dict[str, Lane]:
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
            batch_tokens=(
                specs["stage2_cpu"].batch_tokens
                if specs and "stage2_cpu" in specs
                else settings.stage1_batch_tokens
            ),
        )
    return found


def cache_namespaces(runners: dict[str, Runner], specs: dict[str, StageSpec]) -> dict[str, str]:
    """Score-cache namespace per role: the model's identity (files fingerprinted), device and
    what changes its scores (its spec's length, instruction and ONNX graph, precision, one pair
    per call for stage 1)."""
    found = {}
    for role, runner in runners.items():
        spec = specs[role]
        if role == "stage1":  # batch-invariant: older batched scores never match
            extra = {"scoring": "one-pair-per-call"}
        else:  # fp16 scores differ a bit
            extra = {"precision": runner.precision}
        if spec.instruction:
            extra["instruction"] = spec.instruction
        if spec.onnx_graph != "exact":  # its scores drift (runners/onnx_graph.py)
            extra["graph"] = spec.onnx_graph
        found[role] = namespace(
            "stage1" if role == "stage1" else "stage2",
            identity(runner),
            runner.device,
            max_length=spec.max_length,
            **extra,
        )
    return found


def identity(runner: Runner) -> str:
    """The model's identity in score-cache keys: its name and a fingerprint of its files."""
    return f"{runner.name}@{fingerprint(runner.files)}" if runner.files else runner.name


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
        score(engine.stage1, WARMUP_QUERY, [WARMUP_DOCUMENT, long_document])
    for runner in (engine.stage2_gpu, engine.stage2_cpu):
        if runner is not None and id(runner) not in skip:
            score(runner, WARMUP_QUERY, [WARMUP_DOCUMENT])
