"""Build an Engine from Settings: resolve model files, load runners, warm up."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from ..devices import Accelerator, GpuGate, detect_accelerator
from ..errors import ModelLoadError
from ..model_store import stage1_files, stage2_path
from ..runners.base import Runner
from ..settings import Settings
from .cascade import Engine

logger = logging.getLogger(__name__)

WARMUP_QUERY = "warm up"
WARMUP_DOCUMENT = "the first request should not pay for lazy initialisation"


def load_engine(
    settings: Settings, detect: Callable[[str], Accelerator | None] = detect_accelerator
) -> Engine:
    """Load both stages as the settings say. Raises ModelLoadError with a one-line message.

    `detect` picks the GPU from the `device` setting (tests hand in a fake device here).
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

    accelerator = detect(settings.device)
    gate = GpuGate(accelerator, settings.min_free_vram_mb, settings.gpu_cooldown_s)
    stage2_gpu: Runner | None = None
    stage2_cpu: Runner | None = None
    if accelerator is not None or settings.stage2_on_cpu:
        path = stage2_path(settings)
        if accelerator is not None:
            stage2_gpu = _load_cross_encoder(path, settings, accelerator=accelerator)
        if settings.stage2_on_cpu:
            stage2_cpu = _load_cross_encoder(path, settings, accelerator=None)
    else:
        logger.info("no usable GPU and stage2_on_cpu is off: answers come from stage 1")

    engine = Engine(
        stage1,
        gate=gate,
        stage2_gpu=stage2_gpu,
        stage2_cpu=stage2_cpu,
        candidates=settings.candidates,
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


def _load_cross_encoder(path: str, settings: Settings, accelerator: Accelerator | None) -> Runner:
    from ..runners.cross_encoder import CrossEncoderRunner

    try:
        return CrossEncoderRunner(
            path,
            accelerator=accelerator,
            batch_size=settings.stage2_batch_size,
            max_length=settings.max_length,
            threads=settings.threads_per_worker(),
            trust_remote_code=settings.trust_remote_code,
        )
    except Exception as exc:
        raise ModelLoadError(
            f"stage-2 model {path} could not be loaded ({type(exc).__name__}: {exc}); fix: point "
            "RERANKER_STAGE2_MODEL at a sentence-transformers cross-encoder"
        ) from exc


def warm_up(engine: Engine) -> None:
    """One pair through every loaded model, so the first request is not slow."""
    engine.stage1.score(WARMUP_QUERY, [WARMUP_DOCUMENT])
    for runner in (engine.stage2_gpu, engine.stage2_cpu):
        if runner is not None:
            runner.score(WARMUP_QUERY, [WARMUP_DOCUMENT])
