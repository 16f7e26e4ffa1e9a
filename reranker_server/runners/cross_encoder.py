"""Stage 2: a sentence-transformers `CrossEncoder`, on the GPU (or the CPU by setting).

Scores are sigmoid(logit), computed from `CrossEncoder.predict`'s raw logits (softmax and the
second label for 2-label heads).

LLM-based rerankers (Qwen3-Reranker seq-cls conversions) bring a chat template
(chat_template.jinja) that puts the pair into their prompt; sentence-transformers renders it with
the pair as `query` and `document` messages and `instruction` as the system message (Qwen3's
`<Instruct>:` line). A model without a template gets `instruction` prepended to the query. A
template that can't carry a pair is refused at load, in one line.

Needs the `[torch]` extra: torch and sentence-transformers are imported when a runner is built, so
that without them the error is one line naming the extra (extras.py).

On a GPU (an `Accelerator` is given):
- weights in fp16 by default (`precision`), logits read back as float32;
- batches are length-sorted and bounded by a token budget derived from free VRAM and the model's
  width (`vram_fraction` of free memory for activations), never more than `batch_size` pairs;
- on CUDA out-of-memory the runner frees the cache and retries the same pairs with half the batch,
  down to one pair (the "OOM ladder"); only an OOM at one pair, or any other device fault,
  propagates to the engine, which answers from stage 1.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ModelLoadError
from ..extras import TORCH_EXTRA, missing_torch_modules, require_torch
from ..model_store import (
    ModelStore,
    check_torch_dir,
    resolve_hub_model,
    torch_weight_patterns,
    weight_files,
)
from .base import Pair, PairwiseRunner
from .kind import LoadTarget, RunnerKind

if TYPE_CHECKING:
    from ..devices import Accelerator
    from ..specs import StageSpec

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "bf16")


def _dtype(precision: str):  # type: ignore[no-untyped-def]
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


class CrossEncoderRunner(PairwiseRunner):
    """Scores pairs with a cross-encoder on one torch device; it batches (and retries on OOM)
    itself, so the scheduler hands it up to `batch_size` pairs per call."""

    def __init__(
        self,
        model_path: str,
        *,
        accelerator: Accelerator | None = None,
        batch_size: int = 32,
        max_length: int = 512,
        threads: int = 1,
        precision: str = "auto",
        vram_fraction: float = 0.5,
        trust_remote_code: bool = False,
        name: str | None = None,
        instruction: str | None = None,
    ) -> None:
        require_torch('kind "cross-encoder" (sentence-transformers)')
        import torch
        from sentence_transformers import CrossEncoder

        self._accelerator = accelerator
        self.device = accelerator.torch_device if accelerator is not None else "cpu"
        self._batch_size = batch_size
        self.max_pairs = batch_size
        self._vram_fraction = vram_fraction
        torch.set_num_threads(threads)
        self._model = CrossEncoder(
            model_path,
            device=self.device,
            trust_remote_code=trust_remote_code,
            local_files_only=True,
        )
        if precision == "auto":
            precision = "fp16" if self.device.startswith("cuda") else "fp32"
        self.precision = precision
        self._model.model.to(_dtype(precision)).eval()
        config = self._model.model.config
        # never longer than the model's position table (a longer pair would be a 500)
        self._max_length = min(max_length, int(config.max_position_embeddings))
        self._model.max_length = self._max_length
        self.batch_tokens = batch_size * self._max_length
        # activation bytes one token costs in a forward pass (hidden states, FFN, attention row)
        width = 8 * config.hidden_size + 2 * config.intermediate_size
        self._bytes_per_token = _dtype(precision).itemsize * (
            width + config.num_attention_heads * self._max_length
        )
        self.name = name or model_path  # shown to clients: a hub id, never a local path
        self.files: Path | None = Path(model_path)
        self.oom_retries = 0  # rungs taken down the OOM ladder, for metrics
        self.instruction = instruction or None
        self._check_template()

    def _check_template(self) -> None:
        """A chat template that can't carry a (query, document) pair is refused now, in one line
        (sentence-transformers would raise a multi-line error on every request)."""
        tokenizer = self._model.tokenizer
        if getattr(tokenizer, "chat_template", None) is None:
            return
        try:
            self._model.preprocess([("query", "document")], prompt=self.instruction)
        except ValueError as exc:
            reason = str(exc).split(" Pair inputs")[0].splitlines()[0].rstrip(".")
            raise ModelLoadError(
                f"stage-2 model {self.name}: {reason}; fix: give the model a chat_template.jinja "
                "that renders the 'query' and 'document' roles (Qwen3-Reranker's format, "
                "docs/models.md), or remove its chat template"
            ) from exc

    def stats(self) -> dict[str, float]:
        """Counters for metrics."""
        return {"oom_retries": float(self.oom_retries)}

    def score_pairs(self, pairs: Sequence[Pair]) -> list[float]:
        """Scores of (query, document) pairs, queries may differ (the scheduler merges requests)."""
        if not pairs:
            return []
        lengths = self._lengths(pairs)
        order = sorted(range(len(pairs)), key=lambda i: -lengths[i])
        scores = np.empty(len(pairs), dtype=np.float64)
        start = 0
        size = self._batch_size
        while start < len(order):
            size = min(size, self._pairs_that_fit(lengths[order[start]]))
            batch = order[start : start + size]
            try:
                scores[batch] = self._forward([pairs[i] for i in batch])
            except Exception as exc:
                if len(batch) == 1 or not self._is_oom(exc):
                    raise
                self._accelerator.empty_cache()  # type: ignore[union-attr]
                size = max(1, len(batch) // 2)
                self.oom_retries += 1
                logger.warning("CUDA out of memory at %d pairs; retrying with %d", len(batch), size)
                continue
            start += len(batch)
        return [float(s) for s in scores]

    def _lengths(self, pairs: Sequence[tuple[str, str]]) -> list[int]:
        encoded = self._model.tokenizer(
            [query for query, _ in pairs],
            [doc for _, doc in pairs],
            truncation=True,
            max_length=self._max_length,
        )
        return [len(ids) for ids in encoded["input_ids"]]

    def _pairs_that_fit(self, longest: int) -> int:
        """Pairs of `longest` tokens whose activations fit in the VRAM share (CPU: no bound)."""
        if self._accelerator is None:
            return self._batch_size
        budget = self._accelerator.free_memory_mb() * 2**20 * self._vram_fraction
        return max(1, min(self._batch_size, int(budget // (longest * self._bytes_per_token))))

    def _is_oom(self, exc: Exception) -> bool:
        return self._accelerator is not None and self._accelerator.classify_failure(exc) == "oom"

    def _forward(self, pairs: list[tuple[str, str]]) -> np.ndarray:
        if self._accelerator is not None:
            self._accelerator.before_forward(len(pairs))
        extra = {"prompt": self.instruction} if self.instruction else {}
        out = self._model.predict(
            pairs,
            **extra,
            batch_size=len(pairs),
            activation_fn=_identity,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        logits = np.asarray(out, dtype=np.float64).reshape(len(pairs), -1)
        if logits.shape[1] == 1:  # one relevance logit: sigmoid
            return np.asarray(1.0 / (1.0 + np.exp(-logits[:, 0])))
        # (not relevant, relevant) logits: softmax, as FlashRank does for such models
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        return np.asarray(shifted[:, 1] / shifted.sum(axis=1))


def _identity(scores):  # type: ignore[no-untyped-def]
    """Raw logits out of `CrossEncoder.predict` (no activation)."""
    return scores


WHAT = "kind cross-encoder"


def _fetch(spec: StageSpec, store: ModelStore) -> Path:
    return resolve_hub_model(
        spec.model,
        store,
        what=f"model ({WHAT})",
        patterns=lambda names: _patterns(names, spec),
        check=lambda directory: check_torch_dir(directory, WHAT),
    )


def _patterns(names: Sequence[str], spec: StageSpec) -> tuple[list[str], list[str]]:
    return torch_weight_patterns(names, trust_remote_code=spec.trust_remote_code)


def _load(spec: StageSpec, store: ModelStore, target: LoadTarget) -> CrossEncoderRunner:
    """A sentence-transformers cross-encoder (hub id, fetched into the cache, or directory); on
    the GPU in `precision` when the target has an accelerator, else on the CPU in
    `cpu_precision`."""
    require_torch('kind "cross-encoder" (sentence-transformers)')
    path = _fetch(spec, store)
    accelerator = target.accelerator
    try:
        return CrossEncoderRunner(
            str(path),
            accelerator=accelerator,
            batch_size=spec.batch_size,
            max_length=spec.max_length,
            threads=target.threads,
            precision=spec.precision if accelerator is not None else spec.cpu_precision,
            vram_fraction=spec.vram_fraction,
            trust_remote_code=spec.trust_remote_code,
            name=Path(spec.model).name if Path(spec.model).expanduser().is_dir() else spec.model,
            instruction=spec.instruction or None,
        )
    except ModelLoadError:  # one line already (a template that can't carry a pair)
        raise
    except Exception as exc:
        raise ModelLoadError(
            f"model {path} ({WHAT}) could not be loaded ({type(exc).__name__}: {exc}); fix: "
            "point the stage's model at a sentence-transformers cross-encoder"
        ) from exc


def _claims(names: Sequence[str]) -> bool:
    """Torch weights (safetensors or pytorch_model.bin) beside a config."""
    return bool(weight_files(names)) and "config.json" in names


KIND = RunnerKind(
    name="cross-encoder",
    load=_load,
    fetch=_fetch,
    check_directory=lambda directory, spec: check_torch_dir(directory, WHAT),
    claims=_claims,
    devices=("cpu", "cuda"),
    stage1=False,
    hub_patterns=_patterns,
    missing_extras=missing_torch_modules,
    extra_fix=f"{TORCH_EXTRA} (on a CPU-only host `pip install torch==2.13.0` first), or run "
    "stage 2 on the CPU without torch: kind onnx-cross-encoder (RERANKER_STAGE2_KIND; a cascades "
    "file: stage2.kind; docs/models.md)",
)
