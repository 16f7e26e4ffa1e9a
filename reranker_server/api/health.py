"""Health: `/health` (the spec's fields and more), `/health/live`, `/health/ready`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from ..errors import NotReadyError
from .deps import PoolDep
from .schemas import HealthResponse

router = APIRouter(tags=["health"])


@router.get("/health", response_model=HealthResponse)
async def health(request: Request) -> dict[str, Any]:
    """Cheap: reads state, runs no model. Answers while inference runs."""
    state = request.app.state
    engine = getattr(state, "engine", None)
    info: dict[str, Any] = {
        "status": "ok" if engine is not None else "loading",
        "cuda_available": bool(getattr(state, "cuda_available", False)),
        "gpu_model_loaded": engine is not None and engine.stage2_gpu is not None,
    }
    if engine is not None:
        info["stage1_model"] = engine.stage1.name
        stage2 = engine.stage2_gpu or engine.stage2_cpu
        info["stage2_model"] = stage2.name if stage2 else None
        info["stage2_device"] = stage2.device if stage2 else None
        info.update(engine.gate.state())
        info["in_flight"] = request.app.state.pool.pending
    return info


@router.get("/health/live")
async def live() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/health/ready")
async def ready(request: Request, pool: PoolDep) -> dict[str, str]:
    """Readiness: one pair through stage 1, through the same queue as real requests."""
    engine = getattr(request.app.state, "engine", None)
    if engine is None:
        raise NotReadyError("models are not loaded yet")
    await pool.run(lambda: engine.stage1.score("ready", ["ready"]))
    return {"status": "ready"}
