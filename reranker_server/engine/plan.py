"""The per-request plan (`RERANKER_STAGE1`): run the cascade, or skip stage 1 on a GPU host.

`always` (the default) runs the cascade for every request: stage 1 on the CPU scores every
document, stage 2 reorders the best candidates. `auto` asks, per request, whether stage 2 on the
GPU would score *every* document sooner than stage 1 would on the CPU; if so stage 1 is skipped
(plan `gpu_only`), else the cascade runs (plan `cascade`). With no GPU, `auto` is `always`.

The estimate is `seconds per token x tokens`, per stage, where:

- seconds per token (`StageCosts`) is measured on this host: seeded at warm-up by one synthetic
  request through each stage (engine `calibrate`), then refreshed from every request's live
  timings as an exponentially weighted moving average (`weight` per new timing). A timing covers
  the stage's model calls through the scheduler, queue wait included, so a loaded stage looks
  slower;
- tokens are the request's (query, window) pair tokens as the stage-1 tokenizer counts them (the
  windower counts them anyway), plus the pairs already queued on that stage's scheduler (each
  taken as long as the request's average pair): a long GPU queue makes the GPU estimate grow.

The GPU plan is chosen only when the GPU is usable now (the `GpuGate`: present, not cooling down,
enough free VRAM) and its estimate is below stage 1's alone, which the cascade always pays: so a
request is not planned to wait longer than the cascade would. If the GPU then fails (OOM, CUDA
error, NaN scores), that request falls back to the cascade without the GPU, as today's fallbacks.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from ..types import FallbackReason, PlanName

Stage1Mode = Literal["always", "auto"]

# The roles whose costs the plan compares (engine roles, as the score cache names them).
CPU_ROLE = "stage1"
GPU_ROLE = "stage2_gpu"

CALIBRATION_QUERY = "how long does one token take on this host"
CALIBRATION_WORDS = (
    "the city river tower history population capital europe famous built century government "
    "language people world water food health research science music art market school"
).split()


def calibration_texts(count: int) -> list[str]:
    """Passages of mixed lengths (40 to 200 words, ~120 on average), as retrieval returns them."""
    words = CALIBRATION_WORDS
    return [
        " ".join(words[(i + j) % len(words)] for j in range(40 + (i * 37) % 161))
        for i in range(count)
    ]


def word_tokens(query: str, texts: Sequence[str]) -> list[int]:
    """Each pair's tokens estimated from words (as `PairwiseRunner.length`), where no tokenizer
    counted them (an engine without a windower)."""
    words = len(query.split())
    return [2 + words + len(text.split()) for text in texts]


class StageCosts:
    """Seconds per token of each stage role on this host: an EWMA of measured timings.

    `weight`: how much each new timing moves the estimate (0: estimates stay as seeded, for tests
    and for operators who want them fixed; 1: the last timing alone). `seconds_per_token`: seed
    values (tests make the GPU cheap or slow with them). Thread-safe: request threads feed it.
    """

    def __init__(
        self, weight: float = 0.1, seconds_per_token: Mapping[str, float] | None = None
    ) -> None:
        if not 0.0 <= weight <= 1.0:
            raise ValueError("weight must be within [0, 1]")
        self.weight = weight
        self._rates: dict[str, float] = dict(seconds_per_token or {})
        self._lock = threading.Lock()
        self.observations: dict[str, int] = {}  # live timings seen per role

    def rate(self, role: str) -> float | None:
        """Seconds per token of `role`; None while it was never measured."""
        with self._lock:
            return self._rates.get(role)

    def set(self, role: str, seconds_per_token: float) -> None:
        """Seed (or reset) a role's cost: at warm-up, or from a test."""
        with self._lock:
            self._rates[role] = seconds_per_token

    def observe(self, role: str, tokens: int, seconds: float) -> None:
        """One live timing: `seconds` for `tokens` tokens. The first timing of a role sets it."""
        if tokens <= 0 or seconds <= 0:
            return
        sample = seconds / tokens
        with self._lock:
            self.observations[role] = self.observations.get(role, 0) + 1
            old = self._rates.get(role)
            self._rates[role] = sample if old is None else old + self.weight * (sample - old)

    def estimate(self, role: str, tokens: float) -> float | None:
        """Seconds `role` would take for `tokens` tokens; None while never measured."""
        rate = self.rate(role)
        return None if rate is None else rate * tokens

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self._rates)


@dataclass(frozen=True)
class Plan:
    """Which plan runs a request and why (shown in the response, the access log, metrics)."""

    name: PlanName
    reason: str
    gpu_estimate_s: float | None = None
    cpu_estimate_s: float | None = None


ALWAYS = Plan("cascade", "RERANKER_STAGE1=always")
NO_GPU = Plan("cascade", "no GPU stage")


def _ms(seconds: float) -> str:
    """12 ms, 2500 ms, 0.35 ms."""
    ms = seconds * 1000
    return f"{ms:.0f} ms" if ms >= 10 else f"{ms:.2g} ms"


def choose(
    *,
    gate: FallbackReason | None,
    costs: StageCosts,
    tokens: int,
    pairs: int,
    gpu_queued: int = 0,
    cpu_queued: int = 0,
) -> Plan:
    """The plan for one request under `auto`, given the GPU gate's answer (None: usable),
    the request's `tokens` over `pairs` pairs, and the pairs queued on each scheduler."""
    if gate is not None:
        return Plan("cascade", f"GPU not usable ({gate})")
    per_pair = tokens / max(1, pairs)
    gpu = costs.estimate(GPU_ROLE, tokens + gpu_queued * per_pair)
    cpu = costs.estimate(CPU_ROLE, tokens + cpu_queued * per_pair)
    if gpu is None or cpu is None:
        missing = "stage 2 on the GPU" if gpu is None else "stage 1"
        return Plan("cascade", f"no timing of {missing} yet", gpu, cpu)
    queued = f" with {gpu_queued} pairs queued" if gpu_queued else ""
    if gpu < cpu:
        return Plan("gpu_only", f"gpu est {_ms(gpu)}{queued} < cpu est {_ms(cpu)}", gpu, cpu)
    return Plan("cascade", f"gpu est {_ms(gpu)}{queued} >= cpu est {_ms(cpu)}", gpu, cpu)


def failed(plan: Plan, fault: FallbackReason) -> Plan:
    """The plan that answers after the GPU failed a `gpu_only` request: the cascade."""
    return Plan(
        "cascade",
        f"{plan.reason}, but the GPU failed ({fault}): cascade without it",
        plan.gpu_estimate_s,
        plan.cpu_estimate_s,
    )
