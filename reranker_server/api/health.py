"""Health: `/health` (the spec's fields and more), `/health/live`, `/health/ready`."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request

from ..errors import NotReadyError
from .schemas import HealthResponse

router = APIRouter(tags=["health"])

READY_TIMEOUT_S = 10.0


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
        # GPU queries off the event loop: a wedged CUDA context must not freeze the server
        info.update(await asyncio.to_thread(engine.gate.state))
        info["in_flight"] = request.app.state.pool.pending
    return info


@router.get("/health/live")
async def live() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/health/ready")
async def ready(request: Request) -> dict[str, str]:
    """Readiness: one pair through stage 1. Not through the request queue: a busy server is
    still ready (else an orchestrator would pull every replica out at peak load)."""
    engine = getattr(request.app.state, "engine", None)
    if engine is None:
        raise NotReadyError("models are not loaded yet")
    try:
        await asyncio.wait_for(
            asyncio.to_thread(engine.stage1.score, "ready", ["ready"]), READY_TIMEOUT_S
        )
    except TimeoutError as exc:
        raise NotReadyError(f"stage 1 did not answer within {READY_TIMEOUT_S:g} s") from exc
    return {"status": "ready"}
