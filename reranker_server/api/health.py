"""Health: `/health` (the spec's fields and more), `/health/live`, `/health/ready`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from ..types import EngineStatus, GpuStatus
from .deps import ServiceDep
from .schemas import HealthResponse

router = APIRouter(tags=["health"])


@router.get("/health", response_model=HealthResponse)
async def health(service: ServiceDep) -> dict[str, Any]:
    """Cheap: reads the service's status snapshot, runs no model. Answers while inference runs.
    The top-level models are the default cascade's; `cascades` has each cascade's."""
    status = await service.snapshot()
    engine = status.engine
    info: dict[str, Any] = {
        "status": "ok" if engine is not None else "loading",
        "cuda_available": status.cuda_available,
        "gpu_model_loaded": engine is not None and engine.stage2_gpu is not None,
    }
    if engine is not None:
        info.update(_models(engine))
        if status.gpu is not None:
            info.update(gpu_fields(status.gpu))
        info["in_flight"] = status.in_flight
        info["cascades"] = {
            cascade.name: {
                **_models(cascade.engine),
                "aliases": list(cascade.aliases),
                "default": cascade.default,
            }
            for cascade in status.cascades
        }
    return info


def _models(engine: EngineStatus) -> dict[str, Any]:
    stage2 = engine.stage2
    return {
        "stage1_model": engine.stage1.name,
        "stage2_model": stage2.name if stage2 else None,
        "stage2_device": stage2.device if stage2 else None,
    }


def gpu_fields(gpu: GpuStatus) -> dict[str, Any]:
    """The GPU gate as /health shows it (`gpu_state`, memory in MB, failures, probes)."""
    if gpu.state == "absent":
        return {"gpu_state": "absent"}
    info: dict[str, Any] = {"gpu_device": gpu.device}
    if gpu.free_mb is not None and gpu.total_mb is not None:
        info.update(
            gpu_name=gpu.name,
            gpu_free_mb=round(gpu.free_mb, 1),
            gpu_total_mb=round(gpu.total_mb, 1),
        )
    info["gpu_last_failure"] = gpu.last_failure
    if gpu.cooldown_remaining_s is not None:
        info["gpu_cooldown_remaining_s"] = gpu.cooldown_remaining_s
        info["gpu_cooldown_until"] = gpu.cooldown_until
    info.update(gpu_state=gpu.state, gpu_failures=dict(gpu.failures), gpu_probes=dict(gpu.probes))
    return info


@router.get("/health/live")
async def live() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/health/ready")
async def ready(service: ServiceDep) -> dict[str, str]:
    """Readiness: one pair through stage 1. Not through the request queue: a busy server is
    still ready (else an orchestrator would pull every replica out at peak load)."""
    await service.check_ready()
    return {"status": "ready"}
