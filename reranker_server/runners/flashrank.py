"""Stage 1: a FlashRank model (ONNX, CPU), scored so that no score depends on its batch-mates.

The model files are FlashRank's own (`flashrank.Ranker` loads the same directory); tokenization
follows `flashrank.Ranker._get_tokenizer` exactly.

FlashRank's int8 models quantize activations dynamically, one scale per tensor for the whole batch
(`DynamicQuantizeLinear`), so in a batch a passage's score moves with the other passages and the
padding (measured up to 1.3e-3 on a full-size model, 0.7 on the tiny test models). For such a model
every pair runs alone (`max_pairs == 1`): its score is exactly FlashRank's score of that passage
alone, whatever else is being scored, and there is no padding at all. On this 2-core CPU that is
also no slower than padded batches (bench/RESULTS.md): throughput comes from running pairs on
several cores at once (engine/scheduler.py), not from batching. A model without dynamic
quantization (fp32) runs in length-sorted batches of at most `batch_tokens` padded tokens.

Pre / core / post: `prepare` tokenizes (in the request's thread), `run` pads and runs one batch
(onnx_base.py, shared with the ONNX cross-encoder).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tokenizers import AddedToken, Tokenizer

from ..errors import ModelLoadError
from ..model_store import (
    FLASHRANK_REQUIRED,
    FlashRankFiles,
    ModelStore,
    flashrank_files,
    flashrank_model_files,
    listwise_flashrank_models,
    weight_files,
)
from .base import plan_batches
from .kind import LoadTarget, RunnerKind
from .onnx_base import OnnxPairRunner, cpu_session, quantizes_per_batch

if TYPE_CHECKING:
    from ..specs import StageSpec


def load_flashrank_tokenizer(directory: Path, max_length: int) -> tuple[Tokenizer, int]:
    """The tokenizer as FlashRank configures it (truncation, special tokens); returns pad id too.

    A hub export (onnx/model.onnx) may lack tokenizer_config.json and special_tokens_map.json:
    its tokenizer.json carries the special tokens, and `max_length` bounds the pair.
    """
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    tokenizer_config = _json_or_empty(directory / "tokenizer_config.json")
    tokens_map = _json_or_empty(directory / "special_tokens_map.json")
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tokenizer.enable_truncation(
        max_length=min(int(tokenizer_config.get("model_max_length", max_length)), max_length)
    )
    tokenizer.no_padding()  # padding is done per batch, below
    for token in tokens_map.values():
        if isinstance(token, str):
            tokenizer.add_special_tokens([token])
        elif isinstance(token, dict):
            tokenizer.add_special_tokens([AddedToken(**token)])
    return tokenizer, int(config.get("pad_token_id") or 0)


def _json_or_empty(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


class FlashRankRunner(OnnxPairRunner):
    """Scores pairs with a FlashRank ONNX cross-encoder on the CPU (the runner contract,
    runners/base.py, with a tokenizer for long documents; the ONNX steps: onnx_base.py)."""

    def __init__(
        self,
        directory: Path,
        onnx_file: Path,
        *,
        max_length: int = 512,
        batch_tokens: int = 8192,
        threads: int = 1,
        graph: str = "exact",
    ) -> None:
        self.name = directory.name
        self.files = directory
        tokenizer, pad_id = load_flashrank_tokenizer(directory, max_length)
        session = cpu_session(onnx_file, threads, graph)
        self._start(tokenizer, pad_id, session, onnx_file, batch_tokens)
        self.precision = "int8" if self.max_pairs == 1 else "fp32"

    def head(self, logits: np.ndarray) -> np.ndarray:
        """The same arithmetic as flashrank.Ranker.rerank, in float32."""
        if logits.shape[1] == 1:
            return np.asarray(1 / (1 + np.exp(-logits.flatten())), dtype=np.float32)
        exp_logits = np.exp(logits)
        return np.asarray(exp_logits[:, 1] / np.sum(exp_logits, axis=1), dtype=np.float32)


def _load(spec: StageSpec, store: ModelStore, target: LoadTarget) -> FlashRankRunner:
    """A FlashRank model name (downloaded into the cache) or directory, on the CPU."""
    files = _fetch_files(spec, store)
    try:
        return FlashRankRunner(
            files.directory,
            files.onnx_file,
            max_length=spec.max_length,
            batch_tokens=spec.batch_tokens,
            threads=target.threads,
            graph=spec.onnx_graph,
        )
    except Exception as exc:
        raise ModelLoadError(
            f"FlashRank model {files.onnx_file} could not be loaded ({type(exc).__name__}: "
            f"{exc}); fix: delete the directory to download it again, or point the stage's "
            "model at a valid FlashRank model"
        ) from exc


def _fetch_files(spec: StageSpec, store: ModelStore) -> FlashRankFiles:
    return flashrank_files(spec.model, store)


def _check_directory(directory: Path, spec: StageSpec) -> None:
    flashrank_files(str(directory), ModelStore(offline=True))


def _claims(names: Sequence[str]) -> bool:
    """FlashRank's layout: an ONNX file at the top beside FlashRank's tokenizer files."""
    top_onnx = any(n.endswith(".onnx") and "/" not in n for n in names)
    return top_onnx and all(n in names for n in FLASHRANK_REQUIRED) and not weight_files(names)


def _known_name(model: str) -> bool:
    return model in flashrank_model_files() or model in listwise_flashrank_models()


KIND = RunnerKind(
    name="flashrank",
    load=_load,
    fetch=lambda spec, store: _fetch_files(spec, store).directory,
    check_directory=_check_directory,
    claims=_claims,
    known_name=_known_name,
    devices=("cpu",),
)


__all__ = ["KIND", "FlashRankRunner", "plan_batches", "quantizes_per_batch"]
