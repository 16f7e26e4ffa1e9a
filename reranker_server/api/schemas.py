"""Request and response models of the native dialect (what /docs shows)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

SPEC_EXAMPLE: dict[str, Any] = {
    "query": "What is the capital of France?",
    "documents": [
        "Paris is the capital and most populous city of France.",
        "Berlin is the capital of Germany.",
        "The Eiffel Tower is located in Paris.",
    ],
    "top_k": 2,
}


class RerankRequest(BaseModel):
    """`POST /rerank`: a query and the passages to order."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [SPEC_EXAMPLE]})

    query: StrictStr = Field(..., min_length=1, description="The search query (not empty).")
    documents: list[StrictStr] = Field(
        ..., description="Passages to rerank. An empty list returns no results."
    )
    top_k: StrictInt = Field(..., ge=1, description="How many results to return (>= 1).")


class RerankResult(BaseModel):
    index: int = Field(..., description="The document's position in the request.")
    text: str
    score: float = Field(..., ge=0.0, le=1.0)


class StageInfo(BaseModel):
    name: str = Field(..., description="Model that ran this stage.")
    device: str = Field(..., description="cpu, cuda:0, ...")
    documents: int
    seconds: float
    cached: int | None = Field(
        None, description="Documents whose score came from the cache (null: cache not used)."
    )


class RerankResponse(BaseModel):
    """Results best first. `backend` says what produced the final order: "gpu" when the
    cross-encoder ran on the GPU, else "cpu"."""

    results: list[RerankResult]
    backend: Literal["gpu", "cpu"]
    fallback: str | None = Field(
        None, description="Why the GPU was not used: no_gpu, low_vram, cooldown, oom, cuda_error."
    )
    stages: list[StageInfo] = Field(default_factory=list, description="Stages that ran, in order.")


class HealthResponse(BaseModel):
    model_config = ConfigDict(extra="allow")

    status: Literal["ok", "loading", "error"]
    cuda_available: bool
    gpu_model_loaded: bool


class ErrorResponse(BaseModel):
    error: str = Field(..., description="What went wrong, naming the field and the limit.")
    error_type: str = Field(..., description="Stable machine-readable kind.")
    field: str | None = None
    detail: str = Field(..., description="The same message (Jina-style clients read `detail`).")
