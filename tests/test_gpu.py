"""Real CUDA (marked `gpu`; skipped where torch sees no GPU). Run with `make test-all`, or
bench/gpu_check.sh on a GPU host (it sets RERANKER_TEST_FULL_MODELS to models it built once)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from reranker_server.devices import CudaAccelerator, detect_accelerator
from reranker_server.engine.loader import load_engine
from reranker_server.model_generator import STAGE1_NAME, TestModelPaths, write_test_models
from reranker_server.runners.cross_encoder import CrossEncoderRunner
from reranker_server.settings import Settings
from reranker_server.types import RerankJob

pytestmark = pytest.mark.gpu

QUERY = "what is the capital of france"
DOCS = [f"{w} is a city near the river" for w in ("paris", "berlin", "music", "data", "king")]


@pytest.fixture(scope="module")
def full_models(tmp_path_factory: pytest.TempPathFactory) -> TestModelPaths:
    """Real-shaped models (MiniLM-L12 / L6-H384, BERT's init): RERANKER_TEST_FULL_MODELS if it
    points at `make-test-models --full-size` output, else built here."""
    given = os.environ.get("RERANKER_TEST_FULL_MODELS")
    if given and (Path(given) / "cross-encoder").is_dir():
        root = Path(given)
        return TestModelPaths(root / "flashrank" / STAGE1_NAME, root / "cross-encoder")
    return write_test_models(tmp_path_factory.mktemp("full"), full_size=True)


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
    assert engine.gate.snapshot().state == "cooling_down"
    assert np.isfinite([r.score for r in out.results]).all()


def test_fp16_by_default_and_close_to_fp32(full_models: TestModelPaths) -> None:
    """Real-shaped model (MiniLM-L6-H384, BERT's init) on CUDA: fp16 within 1e-3 of fp32."""
    models = full_models
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


def test_auto_plan_skip_scores_equal_gpu_stage2_and_oom_falls_back(
    make_settings: Callable[..., Settings], tiny_models: TestModelPaths
) -> None:
    """RERANKER_STAGE1=auto on real CUDA: warm-up measures both stages; with the GPU made cheap
    the skip plan's scores are stage 2's on the GPU; a real OOM answers from stage 1."""
    settings = make_settings(
        device="cuda:0", min_free_vram_mb=1, stage1="auto", stage1_auto_ewma_weight=0
    )
    engine = load_engine(settings)
    assert (engine.costs.rate("stage1") or 0) > 0 and (engine.costs.rate("stage2_gpu") or 0) > 0
    engine.costs.set("stage1", 1.0)
    engine.costs.set("stage2_gpu", 1e-9)
    out = engine.rerank(RerankJob(QUERY, DOCS, top_k=len(DOCS)))
    assert (out.plan, out.backend) == ("gpu_only", "gpu")
    assert engine.stage2_gpu is not None
    gpu = engine.stage2_gpu.score(QUERY, DOCS)
    assert {r.index: r.score for r in out.results} == pytest.approx(dict(enumerate(gpu)), abs=1e-3)

    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(1e-6, 0)
    try:
        docs = [" ".join(["paris"] * 400)] * 64
        out = engine.rerank(RerankJob(QUERY, docs, top_k=3))
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
    assert (out.plan, out.backend, out.fallback) == ("cascade", "cpu", "oom")
    assert [s.stage for s in out.stages] == ["stage1"]
    engine.close()
