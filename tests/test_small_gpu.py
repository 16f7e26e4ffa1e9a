"""Small-GPU behaviour with the real cross-encoder and a fake device at the seam:
the OOM ladder, VRAM-aware batches, the breaker's probe, precision, device choice."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import numpy as np
import pytest
import torch

from reranker_server import devices
from reranker_server.app import create_app
from reranker_server.devices import GpuGate
from reranker_server.engine.engine import Engine
from reranker_server.engine.loader import load_engine
from reranker_server.model_generator import TestModelPaths
from reranker_server.runners.cross_encoder import CrossEncoderRunner
from reranker_server.settings import Settings
from reranker_server.types import RerankJob

from .conftest import running
from .fakes import FakeAccelerator, FakeClock

QUERY = "what is the capital of france"
DOCS = [
    " ".join(["paris", "city", "river", "tower", "history", "music"][: 1 + i % 6] * (1 + i // 6))
    for i in range(12)
]


def cpu_scores(models: TestModelPaths, docs: list[str]) -> list[float]:
    return CrossEncoderRunner(str(models.stage2)).score(QUERY, docs)


def test_oom_ladder_halves_the_batch_and_keeps_the_answer(tiny_models: TestModelPaths) -> None:
    fake = FakeAccelerator()
    fake.oom_at_pairs = 5
    runner = CrossEncoderRunner(str(tiny_models.stage2), accelerator=fake, batch_size=16)
    scores = runner.score(QUERY, DOCS)
    assert fake.forwards == [12, 6, 3, 3, 3, 3]
    assert runner.oom_retries == 2 and fake.cache_emptied == 2
    assert scores == pytest.approx(cpu_scores(tiny_models, DOCS), abs=1e-5)


def test_oom_at_one_pair_reaches_the_engine(tiny_models: TestModelPaths) -> None:
    fake = FakeAccelerator()
    fake.oom_at_pairs = 1
    runner = CrossEncoderRunner(str(tiny_models.stage2), accelerator=fake, batch_size=4)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        runner.score(QUERY, DOCS[:4])
    assert fake.forwards == [4, 2, 1]


def test_batches_are_bounded_by_free_vram_and_sorted_by_length(
    tiny_models: TestModelPaths,
) -> None:
    fake = FakeAccelerator(free_mb=1.0)  # 0.5 MB for activations: a few pairs at a time
    runner = CrossEncoderRunner(
        str(tiny_models.stage2), accelerator=fake, batch_size=32, vram_fraction=0.5
    )
    scores = runner.score(QUERY, DOCS)
    assert 1 < max(fake.forwards) < len(DOCS) and sum(fake.forwards) == len(DOCS)
    assert scores == pytest.approx(cpu_scores(tiny_models, DOCS), abs=1e-5)
    fake.forwards.clear()
    fake.free_mb = 4096
    runner.score(QUERY, DOCS)
    assert fake.forwards == [12]  # plenty of room: one batch


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_reduced_precision_stays_close_to_fp32(tiny_models: TestModelPaths, precision: str) -> None:
    """On the CPU. The tiny models' wide random init (needed to spread their scores) magnifies
    rounding, so the bound here is loose; tests/test_gpu.py checks 1e-3 on CUDA with
    real-shaped models."""
    low = CrossEncoderRunner(str(tiny_models.stage2), precision=precision)
    assert low.precision == precision
    assert (
        next(low._model.model.parameters()).dtype
        == {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    )
    diff = np.abs(np.array(low.score(QUERY, DOCS)) - np.array(cpu_scores(tiny_models, DOCS)))
    assert diff.max() < 0.05 and diff.mean() < 0.015, diff


def test_precision_defaults_to_fp16_only_on_cuda(tiny_models: TestModelPaths) -> None:
    assert CrossEncoderRunner(str(tiny_models.stage2)).precision == "fp32"
    fake = FakeAccelerator()
    assert CrossEncoderRunner(str(tiny_models.stage2), accelerator=fake).precision == "fp32"


@pytest.fixture
def breaker_server(
    make_settings: Callable[..., Settings],
) -> Iterator[tuple[str, FakeAccelerator, FakeClock]]:
    """A server on a fake GPU whose breaker reads a fake clock (a busy machine can't make the
    cool-down run out early)."""
    fake, clock = FakeAccelerator(), FakeClock()
    settings = make_settings(candidates=4, gpu_cooldown_s=30)

    def build(s: Settings) -> Engine:
        engine = load_engine(s, detect=lambda *_: fake)
        engine.gate = GpuGate(fake, s.min_free_vram_mb, s.gpu_cooldown_s, clock=clock)
        return engine

    with running(create_app(settings, engine_factory=build)) as url:
        yield url, fake, clock


def test_breaker_probes_then_resumes(
    breaker_server: tuple[str, FakeAccelerator, FakeClock],
) -> None:
    url, fake, clock = breaker_server
    body = {"query": QUERY, "documents": DOCS, "top_k": 3}
    fake.cuda_error = True
    assert httpx.post(f"{url}/rerank", json=body).json()["fallback"] == "cuda_error"
    assert httpx.post(f"{url}/rerank", json=body).json()["fallback"] == "cooldown"
    assert httpx.get(f"{url}/health").json()["gpu_state"] == "cooling_down"
    clock.now += 31  # the cool-down is over
    assert httpx.get(f"{url}/health").json()["gpu_state"] == "probing"
    fake.forwards.clear()
    answer = httpx.post(f"{url}/rerank", json=body).json()
    assert (answer["backend"], answer["fallback"]) == ("gpu", None)
    assert fake.forwards == [1, 4]  # the one-pair probe, then the request's candidates
    health = httpx.get(f"{url}/health").json()
    assert health["gpu_state"] == "ok" and health["gpu_probes"] == {"passed": 1, "failed": 0}
    scrape = httpx.get(f"{url}/metrics").text
    assert 'reranker_gpu_probes_total{result="passed"} 1.0' in scrape
    assert 'reranker_gpu_fallbacks_total{reason="cuda_error"} 1.0' in scrape


def test_oom_rungs_are_counted_in_metrics(
    breaker_server: tuple[str, FakeAccelerator, FakeClock],
) -> None:
    url, fake, _ = breaker_server
    fake.oom_at_pairs = 3
    answer = httpx.post(f"{url}/rerank", json={"query": QUERY, "documents": DOCS, "top_k": 3})
    assert answer.json()["backend"] == "gpu"  # 4 pairs OOM, 2 + 2 fit
    assert fake.forwards[-3:] == [4, 2, 2]
    assert "reranker_gpu_oom_retries_total 1.0" in httpx.get(f"{url}/metrics").text


class FakeCuda:
    """torch.cuda's device queries for two cards (the seam `devices` reads)."""

    def __init__(self, free_mb: list[float], total_mb: float = 4096) -> None:
        self.free = [f * 2**20 for f in free_mb]
        self.total = total_mb * 2**20
        self.fraction: tuple[float, int] | None = None

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(devices, "cuda_runtime_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: len(self.free))
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (self.free[i], self.total))
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda i: 300 * 2**20)
        monkeypatch.setattr(
            torch.cuda,
            "set_per_process_memory_fraction",
            lambda f, i: setattr(self, "fraction", (f, i)),
        )


def test_auto_picks_the_gpu_with_most_free_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeCuda([1000, 3000]).install(monkeypatch)
    chosen = devices.detect_accelerator("auto")
    assert chosen is not None and chosen.torch_device == "cuda:1"
    pinned = devices.detect_accelerator("cuda:0")
    assert pinned is not None and pinned.torch_device == "cuda:0"
    assert devices.detect_accelerator("cuda:2") is None


def test_memory_cap_leaves_room_for_a_neighbour(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = FakeCuda([3500])
    cuda.install(monkeypatch)
    accelerator = devices.detect_accelerator("cuda", memory_limit_mb=1536)
    assert cuda.fraction == (1536 / 4096, 0)
    assert accelerator is not None
    # 3.5 GB free on the card, but this process may use 1.5 GB and holds 300 MB already
    assert accelerator.free_memory_mb() == pytest.approx(1536 - 300)
    cuda.free = [800 * 2**20]  # a local LLM took most of the card
    assert accelerator.free_memory_mb() == pytest.approx(800)


def test_gpu_nan_scores_fall_back_instead_of_failing(tiny_models: TestModelPaths) -> None:

    from .fakes import KeywordRunner

    class NanRunner(KeywordRunner):
        def score(self, query: str, documents: object) -> list[float]:  # type: ignore[override]
            return [float("nan")] * len(documents)  # type: ignore[arg-type]

    engine = Engine(
        KeywordRunner("stage1"),
        gate=GpuGate(FakeAccelerator(), 0, 30),
        stage2_gpu=NanRunner("gpu", device="cuda:0"),
    )
    out = engine.rerank(RerankJob(QUERY, DOCS, top_k=3))
    assert (out.backend, out.fallback) == ("cpu", "invalid_scores")
    assert all(np.isfinite(r.score) for r in out.results)
    assert engine.gate.snapshot().state == "cooling_down"


def test_max_length_is_clamped_to_the_model(tiny_models: TestModelPaths) -> None:
    runner = CrossEncoderRunner(str(tiny_models.stage2), max_length=4096)
    assert len(runner.score(QUERY, ["paris " * 3000, "berlin"])) == 2


def test_two_label_cross_encoders_use_softmax(tiny_models: TestModelPaths, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from sentence_transformers import CrossEncoder
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(
        str(tiny_models.stage2), num_labels=2, ignore_mismatched_sizes=True
    )
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(str(tiny_models.stage2)).save_pretrained(tmp_path)
    logits = CrossEncoder(str(tmp_path), device="cpu").predict(
        [(QUERY, d) for d in DOCS], activation_fn=lambda x: x, show_progress_bar=False
    )
    exp = np.exp(np.asarray(logits, dtype=np.float64))
    expected = exp[:, 1] / exp.sum(axis=1)
    assert CrossEncoderRunner(str(tmp_path)).score(QUERY, DOCS) == pytest.approx(expected, abs=1e-6)
