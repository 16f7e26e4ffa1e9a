"""Health: `/health` (the spec's fields and more), `/health/live`, `/health/ready`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from .deps import ServiceDep
from .schemas import HealthResponse

router = APIRouter(tags=["health"])


@router.get("/health", response_model=HealthResponse)
async def health(service: ServiceDep) -> dict[str, Any]:
    """Cheap: reads state, runs no model. Answers while inference runs. The top-level models are
    the default cascade's; `cascades` has each cascade's."""
    status = service.status()
    engine = status.engine
    info: dict[str, Any] = {
        "status": "ok" if engine is not None else "loading",
        "cuda_available": status.cuda_available,
        "gpu_model_loaded": engine is not None and engine.stage2_gpu is not None,
    }
    if engine is not None:
        stage2 = engine.stage2
        info["stage1_model"] = engine.stage1.name
        info["stage2_model"] = stage2.name if stage2 else None
        info["stage2_device"] = stage2.device if stage2 else None
        info.update(await service.gpu_state())
        info["in_flight"] = status.in_flight
        info["cascades"] = {
            cascade.name: {
                "stage1_model": cascade.engine.stage1.name,
                "stage2_model": cascade.engine.stage2.name if cascade.engine.stage2 else None,
                "stage2_device": cascade.engine.stage2.device if cascade.engine.stage2 else None,
                "aliases": list(cascade.aliases),
                "default": cascade.default,
            }
            for cascade in status.cascades
        }
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
