"""Real CUDA (marked `gpu`; skipped where torch sees no GPU). Run with `make test-all`."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from reranker_server.devices import CudaAccelerator, detect_accelerator
from reranker_server.engine.loader import load_engine
from reranker_server.model_generator import TestModelPaths
from reranker_server.runners.cross_encoder import CrossEncoderRunner
from reranker_server.settings import Settings
from reranker_server.types import RerankJob

pytestmark = pytest.mark.gpu

QUERY = "what is the capital of france"
DOCS = [f"{w} is a city near the river" for w in ("paris", "berlin", "music", "data", "king")]


def test_detects_the_gpu_and_reports_memory() -> None:
    acc = detect_accelerator("auto")
    assert isinstance(acc, CudaAccelerator) and acc.torch_device == "cuda:0"
    assert 0 < acc.free_memory_mb() <= acc.total_memory_mb()
    assert acc.name()


def test_engine_uses_the_gpu(
    make_settings: Callable[..., Settings], tiny_models: TestModelPaths
) -> None:
    engine = load_engine(make_settings(device="auto", min_free_vram_mb=1))
    out = engine.rerank(RerankJob(QUERY, DOCS, top_k=3))
    assert (out.backend, out.fallback) == ("gpu", None)
    assert out.stages[-1].device == "cuda:0"
    cpu = CrossEncoderRunner(str(tiny_models.stage2)).score(QUERY, DOCS)
    gpu = {r.index: r.score for r in out.results}
    for index, score in gpu.items():
        assert score == pytest.approx(cpu[index], abs=1e-4)


def test_real_oom_falls_back_to_stage1(make_settings: Callable[..., Settings]) -> None:
    engine = load_engine(make_settings(device="cuda:0", min_free_vram_mb=1, stage2_batch_size=64))
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(1e-6, 0)
    try:
        docs = [" ".join(["paris"] * 400)] * 64
        out = engine.rerank(RerankJob(QUERY, docs, top_k=3))
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
    assert (out.backend, out.fallback) == ("cpu", "oom")
    assert engine.gate.state()["gpu_state"] == "cooling_down"
    assert np.isfinite([r.score for r in out.results]).all()


def test_fp16_by_default_and_close_to_fp32(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Real-shaped model (MiniLM-L6-H384, BERT's init) on CUDA: fp16 within 1e-3 of fp32."""
    from reranker_server.model_generator import write_test_models

    models = write_test_models(tmp_path_factory.mktemp("full"), full_size=True)
    acc = detect_accelerator("auto")
    assert acc is not None
    fp16 = CrossEncoderRunner(str(models.stage2), accelerator=acc)
    fp32 = CrossEncoderRunner(str(models.stage2), accelerator=acc, precision="fp32")
    assert fp16.precision == "fp16"
    docs = [" ".join(DOCS[: 1 + i % 5]) * (1 + i) for i in range(40)]
    assert fp16.score(QUERY, docs) == pytest.approx(fp32.score(QUERY, docs), abs=1e-3)


def test_memory_cap_is_applied(tiny_models: TestModelPaths) -> None:
    acc = CudaAccelerator(0, memory_limit_mb=256)
    runner = CrossEncoderRunner(str(tiny_models.stage2), accelerator=acc)
    assert acc.free_memory_mb() <= 256
    assert len(runner.score(QUERY, DOCS)) == len(DOCS)
    torch.cuda.set_per_process_memory_fraction(1.0, 0)
