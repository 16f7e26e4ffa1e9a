"""Build an Engine from Settings: resolve model files, load runners, build the cache, warm up."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

from ..devices import Accelerator, GpuGate, detect_accelerator
from ..errors import ModelLoadError
from ..model_store import stage1_files, stage2_path
from ..runners.base import Runner
from ..settings import Settings
from ..types import LongDocPolicy
from .cache import MemoryScoreCache, RedisScoreCache, ScoreCache, namespace
from .cascade import Engine
from .scheduler import Lane, PairRunner, RunnerCopies, Scheduler
from .windows import Windower

logger = logging.getLogger(__name__)

WARMUP_QUERY = "warm up"
WARMUP_DOCUMENT = "the first request should not pay for lazy initialisation"


def load_engine(
    settings: Settings, detect: Callable[[str, float], Accelerator | None] = detect_accelerator
) -> Engine:
    """Load both stages as the settings say. Raises ModelLoadError with a one-line message.

    `detect(device, memory_limit_mb)` picks the GPU (tests hand in a fake device here).
    """
    from ..runners.flashrank import FlashRankRunner

    started = time.perf_counter()
    threads = settings.threads_per_worker()
    files = stage1_files(settings)
    try:
        stage1 = FlashRankRunner(
            files.directory,
            files.onnx_file,
            max_length=settings.max_length,
            batch_tokens=settings.stage1_batch_tokens,
            threads=threads,
        )
    except Exception as exc:
        raise ModelLoadError(
            f"stage-1 model {files.onnx_file} could not be loaded ({type(exc).__name__}: {exc}); "
            "fix: delete the directory to download it again, or point RERANKER_STAGE1_MODEL at "
            "a valid FlashRank model"
        ) from exc

    accelerator = detect(settings.device, settings.gpu_memory_limit_mb)
    gate = GpuGate(accelerator, settings.min_free_vram_mb, settings.gpu_cooldown_s)
    stage2_gpu: Runner | None = None
    stage2_cpu: Runner | None = None
    path = ""
    if accelerator is not None or settings.stage2_on_cpu:
        path = stage2_path(settings)
        if accelerator is not None:
            stage2_gpu = _load_cross_encoder(path, settings, accelerator=accelerator)
        if settings.stage2_on_cpu:  # a copy per CPU run: its tokenizer is not thread-safe
            stage2_cpu = RunnerCopies(
                [
                    _load_cross_encoder(path, settings, accelerator=None)
                    for _ in range(settings.runs())
                ]
            )
    lanes = {"stage1": Lane("stage1", stage1, stage1.max_pairs, stage1.batch_tokens)}
    if stage2_gpu is not None:  # pairs of concurrent requests share GPU batches
        lanes["stage2_gpu"] = Lane(
            "stage2_gpu",
            PairRunner(stage2_gpu),
            max_pairs=settings.stage2_batch_size,
            batch_tokens=settings.stage2_batch_size * settings.max_length,
        )
    if stage2_cpu is not None:  # a request's candidates spread over the CPU runs
        lanes["stage2_cpu"] = Lane(
            "stage2_cpu",
            PairRunner(stage2_cpu),
            max_pairs=max(1, -(-settings.candidates // settings.runs())),
            batch_tokens=settings.stage1_batch_tokens,
        )
    else:
        logger.info("no usable GPU and stage2_on_cpu is off: answers come from stage 1")

    cache = build_cache(settings)
    namespaces: dict[str, str] = {}
    if cache is not None:
        stage1_id = f"{stage1.name}@{fingerprint(files.directory)}"
        namespaces["stage1"] = namespace(
            "stage1",
            stage1_id,
            stage1.device,
            max_length=settings.max_length,
            scoring="one-pair-per-call",  # batch-invariant: older batched scores never match
        )
        for role, runner in (("stage2_gpu", stage2_gpu), ("stage2_cpu", stage2_cpu)):
            if runner is not None:
                namespaces[role] = namespace(
                    "stage2",
                    f"{runner.name}@{fingerprint(Path(path))}",
                    runner.device,
                    max_length=settings.max_length,
                    precision=getattr(runner, "precision", "fp32"),  # fp16 scores differ a bit
                )

    engine = Engine(
        stage1,
        gate=gate,
        stage2_gpu=stage2_gpu,
        stage2_cpu=stage2_cpu,
        candidates=settings.candidates,
        cache=cache,
        cache_namespaces=namespaces,
        windows=Windower(
            stage1,
            max_query_tokens=settings.max_query_tokens,
            overlap_tokens=settings.chunk_overlap_tokens,
        ),
        long_documents=default_policy(settings),
        scheduler=Scheduler(settings.runs(), name="cpu-run"),
        gpu_scheduler=Scheduler(1, name="gpu-run") if stage2_gpu is not None else None,
        lanes=lanes,
    )
    if settings.warmup:
        warm_up(engine)
    logger.info(
        "models ready in %.1f s (stage 1: %s; stage 2: %s)",
        time.perf_counter() - started,
        files.directory,
        stage2_gpu.device if stage2_gpu else ("cpu" if stage2_cpu else "off"),
    )
    return engine


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


def _load_cross_encoder(path: str, settings: Settings, accelerator: Accelerator | None) -> Runner:
    """The GPU one in `stage2_precision`, the CPU one in `stage2_cpu_precision`."""
    from ..runners.cross_encoder import CrossEncoderRunner

    try:
        return CrossEncoderRunner(
            path,
            accelerator=accelerator,
            batch_size=settings.stage2_batch_size,
            max_length=settings.max_length,
            threads=settings.threads_per_worker(),
            precision=(
                settings.stage2_precision
                if accelerator is not None
                else settings.stage2_cpu_precision
            ),
            vram_fraction=settings.stage2_vram_fraction,
            trust_remote_code=settings.trust_remote_code,
            name=_display_name(settings.stage2_model),
        )
    except Exception as exc:
        raise ModelLoadError(
            f"stage-2 model {path} could not be loaded ({type(exc).__name__}: {exc}); fix: point "
            "RERANKER_STAGE2_MODEL at a sentence-transformers cross-encoder"
        ) from exc


def _display_name(model: str) -> str:
    """What clients see: a hub id as it is, a local directory by its last part (no paths)."""
    return Path(model).name if Path(model).expanduser().is_dir() else model


def warm_up(engine: Engine) -> None:
    """Pairs through every loaded model, so the first request pays for no lazy initialisation:
    a short and a long one through stage 1 (its memory arena grows once, here), one pair
    through each stage 2."""
    long_document = " ".join([WARMUP_DOCUMENT] * 40)
    engine.stage1.score(WARMUP_QUERY, [WARMUP_DOCUMENT, long_document])
    for runner in (engine.stage2_gpu, engine.stage2_cpu):
        if runner is not None:
            runner.score(WARMUP_QUERY, [WARMUP_DOCUMENT])
