"""The one settings object. Built at the edge (environment `RERANKER_*`, CLI flags), passed down."""

from __future__ import annotations

import difflib
import os
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_STAGE1_MODEL = "ms-marco-MiniLM-L-12-v2"
DEFAULT_STAGE2_MODEL = "cross-encoder/ms-marco-MiniLM-L-6-v2"


class Settings(BaseSettings):
    """Every knob of the server. Environment variables are `RERANKER_<NAME>`."""

    # hide_input_in_errors: a rejected value (a Redis URL with a password, a key) is never echoed
    model_config = SettingsConfigDict(
        env_prefix="RERANKER_", extra="ignore", hide_input_in_errors=True
    )

    # --- network
    host: str = Field("0.0.0.0", description="Interface to listen on.")
    port: int = Field(5200, ge=1, le=65535, description="TCP port.")

    # --- models
    stage1_model: str = Field(
        DEFAULT_STAGE1_MODEL,
        description="FlashRank model name (downloaded into the cache) or a local directory in "
        "FlashRank's layout.",
    )
    stage2_model: str = Field(
        DEFAULT_STAGE2_MODEL,
        description="sentence-transformers cross-encoder: hub id or local directory.",
    )
    stage1_kind: str = Field(
        "",
        description="Runner kind of stage 1 (docs/models.md); empty: inferred from the model's "
        "files (a FlashRank name or layout: flashrank).",
    )
    stage2_kind: str = Field(
        "",
        description="Runner kind of stage 2 (docs/models.md); empty: inferred from the model's "
        "files (torch weights: cross-encoder; ONNX files only: onnx-cross-encoder).",
    )
    stage2_device: str = Field(
        "auto",
        description="Where stage 2 runs: auto (the GPU RERANKER_DEVICE picks when usable; else a "
        "GPU kind is skipped and a CPU-only kind runs on the CPU), cpu, cuda or cuda:N.",
    )
    stage2_onnx_file: str = Field(
        "auto",
        min_length=1,
        description="ONNX kinds: the file to run: auto (the int8 file for this CPU), fp32 "
        "(model.onnx), or a file name.",
    )
    stage1_onnx_graph: Literal["exact", "fast"] = Field(
        "exact",
        description="Stage 1's ONNX graph: exact (FlashRank's scores) or fast (fewer operations; "
        "scores drift, docs/models.md).",
    )
    stage2_onnx_graph: Literal["exact", "fast"] = Field(
        "exact",
        description="Stage 2's ONNX graph (ONNX kinds): exact or fast (fewer operations; scores "
        "drift, docs/models.md).",
    )
    stage2_instruction: str = Field(
        "",
        description="Instruction for LLM-based rerankers whose chat template takes one "
        "(Qwen3-Reranker: the <Instruct> line; empty: the model's default); a model without a "
        "chat template gets it prepended to the query. Empty: none.",
    )
    cascades: Path | None = Field(
        None,
        description="TOML file of named cascades ([cascades.NAME] tables, docs/cascades.md); a "
        "request's `model` picks one. Unset: one cascade, `default`, from the stage settings.",
    )
    model_cache_dir: Path = Field(
        Path("./hf_cache"), description="Where downloaded models are kept (Docker: /app/hf_cache)."
    )
    offline: bool = Field(False, description="Never download; use the cache or local dirs only.")
    trust_remote_code: bool = Field(
        False, description="Allow model repositories to run their own Python code (off: safer)."
    )
    flashrank_base_url: str = Field(
        "https://huggingface.co/prithivida/flashrank/resolve/main",
        description="Where FlashRank model archives (<name>.zip) are downloaded from (a mirror).",
    )
    hub_endpoint: str | None = Field(
        None,
        description="Hugging Face hub endpoint for stage-2 downloads (a mirror).",
    )
    download_timeout_s: float = Field(60.0, gt=0, description="Per-request download timeout.")

    # --- cascade
    candidates: int = Field(
        10, ge=1, description="Documents kept after stage 1 for stage 2 (at least top_k)."
    )
    max_candidates: int = Field(
        100,
        ge=1,
        description="Most documents a request may send to stage 2 with its own `candidates`.",
    )
    device: str = Field(
        "auto",
        description="The GPU a stage with device auto uses: auto (the one with most free memory, "
        "if any), cpu (none), cuda or cuda:N.",
    )
    stage1: Literal["always", "auto"] = Field(
        "always",
        description="always: every request runs the cascade (stage 1 on the CPU, then stage 2). "
        "auto: a request skips stage 1 and stage 2 on the GPU scores every document when the GPU "
        "is usable and estimated sooner than stage 1 (docs/gpu.md); no GPU: as always.",
    )
    stage1_auto_ewma_weight: float = Field(
        0.1,
        ge=0,
        le=1,
        description="With stage1=auto: weight of each request's timing in the per-token cost "
        "estimates (0: keep the warm-up measurement).",
    )
    stage2_on_cpu: bool = Field(
        False,
        description="A CPU copy of stage 2 answers when no GPU is usable (off: answer from stage "
        "1, fallback no_gpu); RERANKER_STAGE2_DEVICE=cpu runs it on the CPU always.",
    )
    min_free_vram_mb: int = Field(
        512, ge=0, description="Free VRAM needed at request time to use the GPU."
    )
    gpu_cooldown_s: float = Field(
        30.0, ge=0, description="After a CUDA error, how long to answer from stage 1 only."
    )
    stage1_batch_tokens: int = Field(
        8192, ge=512, description="Token budget of one stage-1 ONNX batch (bounds memory)."
    )
    stage2_batch_size: int = Field(
        32,
        ge=1,
        description="Most pairs in one cross-encoder forward pass (on a GPU, free VRAM "
        "may allow fewer; see stage2_vram_fraction).",
    )
    stage2_precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="Cross-encoder weights on the GPU: auto = fp16."
    )
    stage2_cpu_precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="Cross-encoder weights on the CPU (stage2_on_cpu): bf16 is ~1.5x faster where "
        "the CPU has bf16 instructions (AVX512-BF16, AMX), scores within 1e-3.",
    )
    stage2_vram_fraction: float = Field(
        0.5, gt=0, le=1, description="Share of free VRAM one stage-2 batch may use for activations."
    )
    gpu_memory_limit_mb: int = Field(
        0,
        ge=0,
        description="Cap on this process's GPU memory, so a local LLM on the same card "
        "keeps its room (0 = no cap).",
    )
    max_length: int = Field(512, ge=16, le=8192, description="Max tokens of query + document.")

    # --- long documents (engine/windows.py)
    long_documents: Literal["truncate", "chunk"] = Field(
        "truncate",
        description="Documents longer than fit beside the query: truncate (score the first "
        "tokens) or chunk (score overlapping windows, keep the best); requests may choose.",
    )
    max_chunks_per_doc: int = Field(
        10, ge=1, description="Most windows per document with chunk (requests may set fewer/more)."
    )
    max_windows_per_request: int = Field(
        10_000, ge=1, description="Most windows (documents x chunks) in one request; past it: 422."
    )
    max_query_tokens: int = Field(
        256, ge=1, description="Query tokens kept whole; a longer query is cut to this many."
    )
    chunk_overlap_tokens: int = Field(
        64, ge=0, description="Tokens consecutive chunks share (at most half a window)."
    )

    # --- limits
    max_documents: int = Field(1000, ge=1, description="Documents accepted per request.")
    max_document_chars: int = Field(20_000, ge=1, description="Characters per document.")
    max_query_chars: int = Field(2_000, ge=1, description="Characters of the query.")
    max_body_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, description="Largest request body accepted, in bytes."
    )
    max_answer_bytes: int = Field(
        16 * 1024 * 1024,
        ge=1024,
        description="Largest answer a request may ask for, in bytes, estimated before any work "
        "runs from the texts it echoes (return_documents, return_text, native results' text); "
        "past it: 422 answer_too_large.",
    )

    # --- connections (server.py: `reranker-server serve`, or uvicorn's --http option)
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="A request's headers must arrive within this many seconds of the connection "
        "opening (or of its first byte); else the connection is closed.",
    )
    body_timeout_s: float = Field(
        60.0,
        gt=0,
        description="A request's body must arrive within this many seconds after its headers; "
        "else the connection is closed.",
    )
    keep_alive_timeout_s: float = Field(
        5.0, gt=0, description="An idle kept-alive connection is closed after this many seconds."
    )
    write_timeout_s: float = Field(
        60.0,
        gt=0,
        description="A client whose answer fills the send buffer must take some of it every this "
        "many seconds; else the connection is cut and the answer's memory freed.",
    )
    max_connections: int = Field(
        512,
        ge=0,
        description="Open connections beyond which rerank requests get a JSON 503 (0 = no cap).",
    )

    max_batch_requests: int = Field(
        32, ge=1, description="Queries accepted in one POST /rerank/batch call."
    )

    # --- clients
    cors_origins: str = Field(
        "",
        description="Comma-separated origins browsers may call from (* for any); empty: CORS off.",
    )
    api_key: SecretStr | None = Field(
        None,
        description="When set, rerank routes require `Authorization: Bearer <key>` (health stays "
        "open). Empty: no key.",
    )
    api_key_file: Path | None = Field(
        None, description="Read the API key from this file (Docker secrets); not with api_key."
    )
    accepted_models: str = Field(
        "",
        description="Comma-separated model names requests may ask for (besides the configured "
        "ones); empty: any name is served by the configured cascade.",
    )

    # --- execution
    workers: int = Field(
        0,
        ge=0,
        description="Model runs at a time on the CPU (each gets cpu_threads / workers threads); "
        "0 = one single-threaded run per thread (fastest measured, bench/RESULTS.md).",
    )
    cpu_threads: int = Field(
        0, ge=0, description="Threads for ONNX Runtime and torch in total (0 = all cores)."
    )
    max_queue: int = Field(
        64, ge=0, description="Requests waiting for a worker before new ones get 429."
    )
    request_timeout_s: float = Field(
        120.0, gt=0, description="Longest a request may wait plus run before a 503."
    )
    drain_timeout_s: float = Field(
        120.0,
        ge=0,
        description="On SIGTERM, how long requests in progress get to finish (readiness and new "
        "requests answer 503 at once); the rest then get 503 + Retry-After. The default equals "
        "request_timeout_s, so a full queue finishes.",
    )
    warmup: bool = Field(True, description="Run one pair through each model at startup.")

    # --- score cache
    cache_enabled: bool = Field(
        True, description="Cache scores per (model, query, document) pair (off: no cache)."
    )
    cache_size_mb: float = Field(
        64.0, gt=0, description="Memory bound of the in-process score cache, in MiB."
    )
    cache_ttl_s: float = Field(
        3600.0, ge=0, description="Seconds a cached score lives (0 = until evicted)."
    )
    cache_url: str | None = Field(
        None,
        repr=False,  # may carry a password
        description="redis://host:port/db to share the cache between replicas (unset: in-process "
        "cache). Redis being down means no cache, never a failed request.",
    )
    cache_timeout_s: float = Field(
        0.5, gt=0, description="Redis connect/read timeout; after a failure Redis rests 5 s."
    )

    # --- logging
    log_level: Literal["debug", "info", "warning", "error", "critical"] = Field(
        "info", description="debug, info, warning, error or critical."
    )
    log_format: Literal["json", "text"] = Field(
        "json", description="json: one JSON object per line; text: plain lines for a terminal."
    )
    log_payloads: bool = Field(
        False, description="Debug: put query and document text in request logs (off: never)."
    )

    @field_validator("device", "stage2_device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        value = value.strip().lower()
        if value in ("auto", "cpu", "cuda"):
            return value
        if value.startswith("cuda:") and value[5:].isdigit():
            return value
        raise ValueError("must be auto, cpu, cuda or cuda:N")

    @field_validator("cascades", mode="before")
    @classmethod
    def _empty_cascades_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("cache_url")
    @classmethod
    def _check_cache_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value.strip()

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lower_log_level(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _read_api_key_file(self) -> Settings:
        if self.api_key is not None and not self.api_key.get_secret_value().strip():
            self.api_key = None
        if self.api_key_file is None:
            return self
        if self.api_key is not None:
            raise ValueError("set RERANKER_API_KEY or RERANKER_API_KEY_FILE, not both")
        try:
            key = self.api_key_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ValueError(
                f"RERANKER_API_KEY_FILE {self.api_key_file} can't be read ({type(exc).__name__})"
            ) from exc
        if not key:
            raise ValueError(f"RERANKER_API_KEY_FILE {self.api_key_file} is empty")
        self.api_key = SecretStr(key)
        return self

    def required_api_key(self) -> str | None:
        """The key rerank routes require, or None when they are open."""
        return self.api_key.get_secret_value() if self.api_key is not None else None

    def accepted_model_names(self) -> set[str]:
        """Extra model names requests may name; empty means any name is accepted."""
        return {name.strip() for name in self.accepted_models.split(",") if name.strip()}

    def cors_origin_list(self) -> list[str]:
        """The allowed browser origins (empty: no CORS headers at all)."""
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]

    def total_threads(self) -> int:
        """Threads all inference may use together: the setting, or every core."""
        return self.cpu_threads or (os.cpu_count() or 1)

    def runs(self) -> int:
        """Model runs at a time on the CPU: the setting, or one per thread."""
        return self.workers or self.total_threads()

    def threads_per_worker(self) -> int:
        """Threads one inference run may use, so that runs x threads <= total."""
        return max(1, self.total_threads() // self.runs())


# Never echoed in an error: they may carry a password or a key.
SECRET_SETTINGS = frozenset({"api_key", "cache_url"})


class SettingsError(ValueError):
    """Invalid settings; `lines` has one line per problem, each naming the variable and value."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


def load_settings(
    flags: Mapping[str, Any] | None = None, *, unused: Collection[str] = ()
) -> tuple[Settings, list[str]]:
    """Settings from the environment and `flags` (which win), plus notes on ignored values.

    An invalid value raises SettingsError, one line per setting: `RERANKER_PORT='abc': Input
    should be a valid integer` (`--port` when it came from a flag). A setting named in `unused`
    (the caller does not use it) never stops anything: an invalid value there falls back to the
    default, and a note says so.
    """
    flags = dict(flags or {})
    unknown = unknown_variables(os.environ)
    try:
        return Settings(**flags), unknown
    except ValidationError as exc:
        errors = exc.errors()
    ignorable = {str(e["loc"][0]) for e in errors if e["loc"] and e["loc"][0] in unused}
    fatal = [e for e in errors if not (e["loc"] and e["loc"][0] in ignorable)]
    if fatal:
        raise SettingsError([_describe(e, flags) for e in fatal]) from None
    notes = unknown + [f"{_describe(e, flags)}; ignored (not used here)" for e in errors]
    defaults = {name: Settings.model_fields[name].default for name in ignorable}
    return Settings(**{**flags, **defaults}), notes


# RERANKER_* variables that are not settings but are read elsewhere (tests, benchmarks)
FOREIGN_PREFIXES = ("RERANKER_TEST_", "RERANKER_BENCH_")


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """One note per `RERANKER_*` variable that names no setting, with the closest real one:
    `RERANKER_CANDIATES is not a setting (ignored); did you mean RERANKER_CANDIDATES?`."""
    known = [f"RERANKER_{name.upper()}" for name in Settings.model_fields]
    notes = []
    for key in sorted(environ):
        variable = key.upper()
        if not variable.startswith("RERANKER_") or variable in known:
            continue
        if variable.startswith(FOREIGN_PREFIXES):
            continue
        close = difflib.get_close_matches(variable, known, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else "; see docs/settings.md"
        notes.append(f"{key} is not a setting (ignored){hint}")
    return notes


def _describe(error: Any, flags: Mapping[str, Any]) -> str:
    message = str(error["msg"]).removeprefix("Value error, ")
    if not error["loc"]:
        return message  # a rule between settings; its message names them
    name = str(error["loc"][0])
    where, value = setting_source(name, flags)
    shown = "<hidden>" if name in SECRET_SETTINGS else repr(value)
    return f"{where}={shown}: {message}"


def setting_source(name: str, flags: Mapping[str, Any] | None = None) -> tuple[str, object]:
    """Where a setting's value comes from: (`--flag` or `RERANKER_NAME`, the raw value)."""
    if flags and name in flags:
        return "--" + name.replace("_", "-"), flags[name]
    variable = f"RERANKER_{name.upper()}"
    for key, value in os.environ.items():  # pydantic-settings matches names case-insensitively
        if key.upper() == variable:
            return variable, value
    return variable, None
