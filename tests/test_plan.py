"""RERANKER_STAGE1=auto: the per-request plan (engine/plan.py) with the fake device.

The per-token costs are seeded (`StageCosts`, weight 0: timings never move them), so "the GPU is
cheap" or "slow" is a given of the test, not a race against this busy machine's clock.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator

import httpx
import pytest
import torch

from reranker_server.app import create_app
from reranker_server.devices import GpuGate
from reranker_server.engine.engine import Engine
from reranker_server.engine.loader import load_engine
from reranker_server.engine.plan import StageCosts, choose
from reranker_server.engine.scheduler import Scheduler
from reranker_server.logs import JsonFormatter
from reranker_server.model_generator import TestModelPaths
from reranker_server.runners.cross_encoder import CrossEncoderRunner
from reranker_server.settings import Settings
from reranker_server.types import RerankJob

from .conftest import running
from .fakes import FakeAccelerator, FakeClock, KeywordRunner

QUERY = "capital of france"
DOCS = [
    "berlin is the capital of germany",  # 0: stage 1 third; longest (stage 2's best)
    "paris is the capital of france",  # 1: stage 1 second; stage 2 second
    "the eiffel tower",  # 2
    "france has wine",  # 3
    "capital of france: paris",  # 4: stage 1 best; stage 2 third
]
# With candidates=2 and top_k=2 the cascade answers [1, 4] (stage 2 reorders stage 1's best two),
# stage 2 over every document answers [0, 1].
CASCADE_ORDER, GPU_ORDER = [1, 4], [0, 1]

CHEAP_GPU = {"stage1": 1e-3, "stage2_gpu": 1e-5}
SLOW_GPU = {"stage1": 1e-5, "stage2_gpu": 1e-3}


def by_length(doc: str) -> float:
    """Stage 2 disagrees with stage 1: longer is better."""
    return len(doc) / 100


class BusyScheduler(Scheduler):
    """A real scheduler that reports `backlog` pairs queued (other requests' work)."""

    def __init__(self, backlog: int) -> None:
        super().__init__(1, name="busy-gpu")
        self.backlog = backlog

    @property
    def queued(self) -> int:
        return self.backlog


def engine(
    costs: dict[str, float],
    *,
    mode: str = "auto",
    accelerator: FakeAccelerator | None = None,
    gpu: bool = True,
    clock: FakeClock | None = None,
    cpu2: bool = False,
    gpu_scheduler: Scheduler | None = None,
    weight: float = 0.0,
) -> Engine:
    acc = accelerator or (FakeAccelerator() if gpu else None)
    return Engine(
        KeywordRunner("stage1"),
        gate=GpuGate(acc, min_free_vram_mb=512, cooldown_s=30, clock=clock or FakeClock()),
        stage2_gpu=KeywordRunner("stage2", device="cuda:0", weight=by_length) if acc else None,
        stage2_cpu=KeywordRunner("stage2-cpu", weight=by_length) if cpu2 else None,
        candidates=2,
        gpu_scheduler=gpu_scheduler,
        stage1_mode=mode,  # type: ignore[arg-type]
        costs=StageCosts(weight, costs),
    )


def job() -> RerankJob:
    return RerankJob(QUERY, DOCS, top_k=2)


# --- the choice


def test_cheap_gpu_skips_stage1_and_scores_every_document() -> None:
    e = engine(CHEAP_GPU)
    out = e.rerank(job())
    assert (out.plan, out.backend, out.fallback) == ("gpu_only", "gpu", None)
    assert out.plan_reason.startswith("gpu est ") and " < cpu est " in out.plan_reason
    assert e.stage1.calls == []  # type: ignore[attr-defined]
    assert e.stage2_gpu.calls == [DOCS]  # type: ignore[union-attr]
    assert [s.stage for s in out.stages] == ["stage2"]
    assert [r.index for r in out.results] == GPU_ORDER
    # the skip plan's scores are stage 2's own scores of those documents
    assert [r.score for r in out.results] == [by_length(DOCS[i]) for i in GPU_ORDER]
    assert all(r.stage1_score is None and r.stage1_rank is None for r in out.results)
    assert out.tokens == 0 and out.documents == len(DOCS)


def test_slow_gpu_runs_the_cascade() -> None:
    e = engine(SLOW_GPU)
    out = e.rerank(job())
    assert (out.plan, out.backend, out.fallback) == ("cascade", "gpu", None)
    assert " >= cpu est " in out.plan_reason
    assert [s.stage for s in out.stages] == ["stage1", "stage2"]
    assert [r.index for r in out.results] == CASCADE_ORDER
    assert len(e.stage2_gpu.calls[0]) == 2  # type: ignore[union-attr]  # the candidates only


@pytest.mark.parametrize(("backlog", "plan"), [(0, "gpu_only"), (1000, "cascade")])
def test_a_long_gpu_queue_runs_the_cascade(backlog: int, plan: str) -> None:
    scheduler = BusyScheduler(backlog)
    try:
        out = engine(CHEAP_GPU, gpu_scheduler=scheduler).rerank(job())
    finally:
        scheduler.close()
    assert out.plan == plan and out.fallback is None
    if backlog:
        assert f"with {backlog} pairs queued" in out.plan_reason
        assert [r.index for r in out.results] == CASCADE_ORDER


def test_low_vram_runs_the_cascade_from_stage1() -> None:
    out = engine(CHEAP_GPU, accelerator=FakeAccelerator(free_mb=100)).rerank(job())
    assert (out.plan, out.plan_reason) == ("cascade", "GPU not usable (low_vram)")
    assert (out.backend, out.fallback) == ("cpu", "low_vram")
    assert [r.index for r in out.results] == [4, 1]  # stage 1's order


def test_cooling_gate_runs_the_cascade_then_the_probe_reopens_the_gpu_plan() -> None:
    clock = FakeClock()
    e = engine(CHEAP_GPU, clock=clock)
    e.gate.record_failure("cuda_error")
    out = e.rerank(job())
    assert (out.plan, out.plan_reason, out.fallback) == (
        "cascade",
        "GPU not usable (cooldown)",
        "cooldown",
    )
    clock.now += 31  # cool-down over: the plan's gate check probes the GPU with one pair
    out = e.rerank(job())
    assert out.plan == "gpu_only" and e.gate.probes["passed"] == 1


def test_without_a_gpu_auto_is_always() -> None:
    auto = engine(CHEAP_GPU, gpu=False, cpu2=True).rerank(job())
    always = engine(CHEAP_GPU, mode="always", gpu=False, cpu2=True).rerank(job())
    assert auto.plan == always.plan == "cascade"
    assert auto.results == always.results
    assert (auto.backend, auto.fallback) == (always.backend, always.fallback)
    assert [(s.name, s.documents) for s in auto.stages] == [
        (s.name, s.documents) for s in always.stages
    ]


def test_always_runs_the_cascade_however_cheap_the_gpu() -> None:
    out = engine(CHEAP_GPU, mode="always").rerank(job())
    assert (out.plan, out.plan_reason) == ("cascade", "RERANKER_STAGE1=always")
    assert [r.index for r in out.results] == CASCADE_ORDER


# --- fallbacks: the GPU fails a gpu_only request, stage 1 answers it


def _cuda_error() -> Exception:
    return RuntimeError("CUDA error: an illegal memory access was encountered")


def _oom() -> Exception:
    return torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")


@pytest.mark.parametrize(("fault", "reason"), [(_cuda_error, "cuda_error"), (_oom, "oom")])
def test_a_gpu_fault_falls_back_to_stage1(fault: Callable[[], Exception], reason: str) -> None:
    acc = FakeAccelerator()
    e = engine(CHEAP_GPU, accelerator=acc)

    def failing(query: str, documents: object) -> list[float]:
        raise fault()

    e.stage2_gpu.score = failing  # type: ignore[method-assign,union-attr]
    out = e.rerank(job())
    assert (out.plan, out.backend, out.fallback) == ("cascade", "cpu", reason)
    assert f"the GPU failed ({reason})" in out.plan_reason
    assert [s.stage for s in out.stages] == ["stage1"]
    assert [r.index for r in out.results] == [4, 1]  # stage 1's order
    assert e.gate.snapshot().state == "cooling_down" and acc.cache_emptied == 1
    assert e.rerank(job()).plan_reason == "GPU not usable (cooldown)"


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_invalid_gpu_scores_fall_back_to_stage1(bad: float) -> None:
    e = engine(CHEAP_GPU)
    e.stage2_gpu.score = lambda q, d: [bad] * len(d)  # type: ignore[method-assign,union-attr]
    out = e.rerank(job())
    assert (out.plan, out.fallback) == ("cascade", "invalid_scores")
    assert [r.index for r in out.results] == [4, 1]
    assert all(math.isfinite(r.score) for r in out.results)


def test_a_gpu_fault_with_stage2_on_cpu_reorders_the_candidates_there() -> None:
    e = engine(CHEAP_GPU, cpu2=True)
    e.stage2_gpu.score = lambda q, d: [math.nan] * len(d)  # type: ignore[method-assign,union-attr]
    out = e.rerank(job())
    assert [s.name for s in out.stages] == ["stage1", "stage2-cpu"]
    assert [r.index for r in out.results] == CASCADE_ORDER and out.fallback == "invalid_scores"


# --- the cost model


def test_costs_are_an_ewma_of_timings() -> None:
    costs = StageCosts(weight=0.5)
    assert costs.estimate("stage1", 100) is None
    costs.observe("stage1", tokens=100, seconds=1.0)  # the first timing sets it: 0.01 s/token
    costs.observe("stage1", tokens=100, seconds=3.0)  # 0.03: halfway there
    assert costs.rate("stage1") == pytest.approx(0.02)
    assert costs.estimate("stage1", 50) == pytest.approx(1.0)
    costs.observe("stage1", tokens=0, seconds=1.0)  # all cached: no timing
    assert costs.observations["stage1"] == 2
    frozen = StageCosts(weight=0.0, seconds_per_token={"stage1": 0.5})
    frozen.observe("stage1", tokens=10, seconds=100.0)
    assert frozen.rate("stage1") == 0.5


def test_choose_compares_the_gpu_over_every_pair_with_stage1() -> None:
    costs = StageCosts(0.0, {"stage1": 2e-3, "stage2_gpu": 1e-3})
    plan = choose(gate=None, costs=costs, tokens=1000, pairs=10)
    assert (plan.name, plan.gpu_estimate_s, plan.cpu_estimate_s) == ("gpu_only", 1.0, 2.0)
    assert plan.reason == "gpu est 1000 ms < cpu est 2000 ms"
    # 10 pairs queued on the GPU, as long as these: twice the work, no longer sooner
    assert choose(gate=None, costs=costs, tokens=1000, pairs=10, gpu_queued=10).name == "cascade"
    # ... unless stage 1's queue is as long
    plan = choose(gate=None, costs=costs, tokens=1000, pairs=10, gpu_queued=10, cpu_queued=10)
    assert plan.name == "gpu_only"
    assert choose(gate="cooldown", costs=costs, tokens=1000, pairs=10).name == "cascade"


def test_live_timings_teach_the_plan() -> None:
    e = engine({}, weight=1.0)
    out = e.rerank(job())
    assert (out.plan, out.plan_reason) == ("cascade", "no timing of stage 2 on the GPU yet")
    assert e.costs.observations == {"stage1": 1, "stage2_gpu": 1}
    assert (e.costs.rate("stage1") or 0) > 0 and (e.costs.rate("stage2_gpu") or 0) > 0
    assert e.rerank(job()).plan_reason.startswith("gpu est ")  # decided on the timings now


# --- the real cross-encoder behind the fake device


@pytest.fixture
def auto_engine(make_settings: Callable[..., Settings]) -> Iterator[Engine]:
    settings = make_settings(stage1="auto", stage1_auto_ewma_weight=0, candidates=2)
    e = load_engine(settings, detect=lambda *_: FakeAccelerator())
    yield e
    e.close()


def test_warm_up_measures_both_stages(auto_engine: Engine) -> None:
    assert (auto_engine.costs.rate("stage1") or 0) > 0
    assert (auto_engine.costs.rate("stage2_gpu") or 0) > 0


def test_skip_plan_scores_equal_stage2_scores(
    auto_engine: Engine, tiny_models: TestModelPaths
) -> None:
    docs = [f"{w} is a city on a river in europe" for w in ("paris", "berlin", "rome", "oslo")]
    docs += ["capital of france", "the eiffel tower is in paris france"]
    auto_engine.costs.set("stage1", 1.0)
    auto_engine.costs.set("stage2_gpu", 1e-9)
    out = auto_engine.rerank(RerankJob("capital of france", docs, top_k=len(docs)))
    assert (out.plan, out.backend) == ("gpu_only", "gpu")
    expected = CrossEncoderRunner(str(tiny_models.stage2)).score("capital of france", docs)
    assert {r.index: r.score for r in out.results} == pytest.approx(
        dict(enumerate(expected)), abs=1e-5
    )
    assert [r.score for r in out.results] == sorted(expected, reverse=True)

    auto_engine.costs.set("stage2_gpu", 10.0)  # a slow device: the cascade
    out = auto_engine.rerank(RerankJob("capital of france", docs, top_k=2))
    assert out.plan == "cascade" and [s.stage for s in out.stages] == ["stage1", "stage2"]


# --- what clients and operators see


def test_response_log_and_metrics_name_the_plan(
    make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(make_settings(stage1="auto"), lambda _s: engine(CHEAP_GPU))
    body = {"query": QUERY, "documents": DOCS, "top_k": 2}
    with (
        running(app) as url,
        caplog.at_level(logging.INFO, logger="reranker_server.access"),
    ):
        answer = httpx.post(f"{url}/rerank", json=body, timeout=30).json()
        scrape = httpx.get(f"{url}/metrics", timeout=30).text
    assert answer["plan"] == "gpu_only" and answer["plan_reason"].startswith("gpu est ")
    assert [r["index"] for r in answer["results"]] == GPU_ORDER
    assert 'reranker_plans_total{plan="gpu_only"} 1.0' in scrape
    [line] = [
        json.loads(JsonFormatter().format(r))
        for r in caplog.records
        if r.name == "reranker_server.access" and "/rerank" in r.getMessage()
    ]
    assert line["plan"] == "gpu_only" and line["plan_reason"] == answer["plan_reason"]


def test_the_answer_names_a_plan_only_when_one_was_chosen(
    make_settings: Callable[..., Settings],
) -> None:
    """Under RERANKER_STAGE1=always no plan is chosen per request: the answer leaves `plan` and
    `plan_reason` out, the outcome says so (`plan_chosen`), the log line still names it."""
    always = engine(CHEAP_GPU, mode="always")
    assert not always.rerank(job()).plan_chosen and engine(CHEAP_GPU).rerank(job()).plan_chosen
    app = create_app(make_settings(), lambda _s: engine(CHEAP_GPU, mode="always"))
    with running(app) as url:
        answer = httpx.post(f"{url}/rerank", json={"query": QUERY, "documents": DOCS}).json()
    assert "plan" not in answer and "plan_reason" not in answer
    assert [s["name"] for s in answer["stages"]] == ["stage1", "stage2"]


def test_stage1_setting_values() -> None:
    assert Settings().stage1 == "always"
    assert Settings(stage1="auto").stage1 == "auto"
    with pytest.raises(ValueError, match="stage1"):
        Settings(stage1="sometimes")
