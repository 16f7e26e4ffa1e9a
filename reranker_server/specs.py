"""The configuration model of what is served: a `CascadeSpec` per cascade, a `StageSpec` per stage.

Validated once, here (pydantic), from either source:

- the environment (`RERANKER_STAGE1_MODEL`, `RERANKER_STAGE2_MODEL`, ... : `default_cascade`)
  builds the cascade `default`;
- the cascades file (`RERANKER_CASCADES`, cascade_file.py) builds named ones; each stage is a
  model name or a table with any StageSpec field, the settings filling what it leaves out:

      [cascades.cpu-fast]
      stage1 = "ms-marco-TinyBERT-L-2-v2"
      stage2 = { model = "cross-encoder/ms-marco-MiniLM-L-6-v2", kind = "onnx-cross-encoder" }

Runners are built from their StageSpec alone (runners/registry.py), never from Settings: two
cascades may differ in any field, and two stages with equal specs share one loaded model.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .settings import Settings

DEFAULT_NAME = "default"
DEVICE_POLICIES = "auto, cpu, cuda or cuda:N"


def check_device_policy(value: str) -> str:
    """`auto`, `cpu`, `cuda` or `cuda:N`, lower-cased; else ValueError."""
    value = value.strip().lower()
    if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
        return value
    raise ValueError(f"must be {DEVICE_POLICIES}")


class StageSpec(BaseModel):
    """One stage: a model, the runner kind that runs it, and everything per-model."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    model: str = Field(
        ..., min_length=1, description="Model: a FlashRank name, a hub id or a local directory."
    )
    kind: str | None = Field(
        None,
        min_length=1,
        description="Runner kind (docs/models.md); unset: inferred from the model's files.",
    )
    device: str = Field(
        "auto",
        description="auto (a GPU when usable, else as the kind defaults: a GPU kind's stage 2 is "
        "skipped), cpu, cuda or cuda:N.",
    )
    cpu_fallback: bool = Field(
        False,
        description="With device auto or cuda: a CPU copy answers when no GPU is usable "
        "(`stage2_on_cpu`).",
    )
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="Weights on a GPU (auto = fp16)."
    )
    cpu_precision: Literal["fp32", "bf16"] = Field("fp32", description="Weights on the CPU.")
    max_length: int = Field(512, ge=16, le=8192, description="Max tokens of query + document.")
    batch_tokens: int = Field(8192, ge=512, description="Padded tokens in one ONNX batch.")
    batch_size: int = Field(32, ge=1, description="Most pairs in one torch forward pass.")
    vram_fraction: float = Field(
        0.5, gt=0, le=1, description="Share of free VRAM one batch may use for activations."
    )
    onnx_file: str = Field(
        "auto", min_length=1, description="ONNX kinds: auto (int8 for this CPU), fp32, or a file."
    )
    onnx_graph: Literal["exact", "fast"] = Field(
        "exact",
        description="ONNX kinds: exact (ONNX Runtime's default graph: FlashRank's scores) or fast "
        "(runners/onnx_graph.py: fewer operations, scores drift; docs/models.md).",
    )
    instruction: str = Field("", description="Instruction for LLM rerankers (empty: default).")
    trust_remote_code: bool = Field(
        False, description="Let the model repository run its own Python code."
    )

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        return check_device_policy(value)


STAGE_FIELDS = tuple(StageSpec.model_fields)


class CascadeSpec(BaseModel):
    """One cascade: stage 1, an optional stage 2, and how stage 1 feeds it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(..., min_length=1)
    stage1: StageSpec
    stage2: StageSpec | None = None
    candidates: int = Field(10, ge=1)
    aliases: tuple[str, ...] = ()
    default: bool = False
    long_documents: Literal["truncate", "chunk"] = "truncate"
    max_chunks_per_doc: int = Field(10, ge=1)
    origin: str = ""  # where it was defined, for messages ("": the environment)

    def names(self) -> tuple[str, ...]:
        """What a request's `model` may say to pick this cascade."""
        return (self.name, *self.aliases)

    def stages(self) -> list[tuple[int, StageSpec]]:
        """(1, stage 1) and, when there is one, (2, stage 2)."""
        return [(1, self.stage1)] + ([(2, self.stage2)] if self.stage2 is not None else [])

    def where(self, stage: int, field: str) -> str:
        """How a user names a stage field here: `[cascades.X] stage2.kind` or
        `RERANKER_STAGE2_KIND`."""
        if self.origin:
            return f"[cascades.{self.name}] stage{stage}.{field}"
        return ENV_NAMES.get((stage, field), f"stage{stage}.{field}")


# The environment variable of each stage field (the cascade `default`).
ENV_NAMES: dict[tuple[int, str], str] = {
    (1, "model"): "RERANKER_STAGE1_MODEL",
    (1, "kind"): "RERANKER_STAGE1_KIND",
    (1, "max_length"): "RERANKER_MAX_LENGTH",
    (1, "batch_tokens"): "RERANKER_STAGE1_BATCH_TOKENS",
    (1, "onnx_graph"): "RERANKER_STAGE1_ONNX_GRAPH",
    (1, "trust_remote_code"): "RERANKER_TRUST_REMOTE_CODE",
    (2, "model"): "RERANKER_STAGE2_MODEL",
    (2, "kind"): "RERANKER_STAGE2_KIND",
    (2, "device"): "RERANKER_STAGE2_DEVICE",
    (2, "cpu_fallback"): "RERANKER_STAGE2_ON_CPU",
    (2, "precision"): "RERANKER_STAGE2_PRECISION",
    (2, "cpu_precision"): "RERANKER_STAGE2_CPU_PRECISION",
    (2, "max_length"): "RERANKER_MAX_LENGTH",
    (2, "batch_tokens"): "RERANKER_STAGE1_BATCH_TOKENS",
    (2, "batch_size"): "RERANKER_STAGE2_BATCH_SIZE",
    (2, "vram_fraction"): "RERANKER_STAGE2_VRAM_FRACTION",
    (2, "onnx_file"): "RERANKER_STAGE2_ONNX_FILE",
    (2, "onnx_graph"): "RERANKER_STAGE2_ONNX_GRAPH",
    (2, "instruction"): "RERANKER_STAGE2_INSTRUCTION",
    (2, "trust_remote_code"): "RERANKER_TRUST_REMOTE_CODE",
}


def stage_defaults(settings: Settings, stage: int) -> dict[str, object]:
    """The StageSpec fields the settings give a stage (a cascades file's table overrides them;
    model and kind are never inherited by a file's stage)."""
    common: dict[str, object] = {
        "max_length": settings.max_length,
        "batch_tokens": settings.stage1_batch_tokens,
        "trust_remote_code": settings.trust_remote_code,
    }
    if stage == 1:
        return common
    return {
        **common,
        "device": settings.stage2_device,
        "cpu_fallback": settings.stage2_on_cpu,
        "precision": settings.stage2_precision,
        "cpu_precision": settings.stage2_cpu_precision,
        "batch_size": settings.stage2_batch_size,
        "vram_fraction": settings.stage2_vram_fraction,
    }


def cascade_defaults(settings: Settings) -> dict[str, object]:
    """The CascadeSpec fields the settings give every cascade."""
    return {
        "candidates": settings.candidates,
        "long_documents": settings.long_documents,
        "max_chunks_per_doc": settings.max_chunks_per_doc,
    }


def default_cascade(settings: Settings) -> CascadeSpec:
    """The cascade `default` of a server without a cascades file: from the environment
    (`RERANKER_STAGE2_MODEL` empty: stage 1 alone)."""
    stage1 = {
        "model": settings.stage1_model,
        "kind": settings.stage1_kind or None,
        "onnx_graph": settings.stage1_onnx_graph,
        **stage_defaults(settings, 1),
    }
    stage2 = None
    if settings.stage2_model:
        stage2 = {
            "model": settings.stage2_model,
            "kind": settings.stage2_kind or None,
            "onnx_file": settings.stage2_onnx_file,
            "onnx_graph": settings.stage2_onnx_graph,
            "instruction": settings.stage2_instruction,
            **stage_defaults(settings, 2),
        }
    return CascadeSpec.model_validate(
        {
            "name": DEFAULT_NAME,
            "stage1": stage1,
            "stage2": stage2,
            "default": True,
            **cascade_defaults(settings),
        }
    )
