"""Stage 2 on the CPU without torch: a cross-encoder exported to ONNX, run by ONNX Runtime.

Kind `onnx-cross-encoder`. The model is a directory (or a hub repository, fetched by
model_store.py) with `onnx/*.onnx` (or `model.onnx` at the top) and the repository's
`tokenizer.json`; the ONNX file is the int8 one quantized for this CPU (`onnx_file="auto"`,
model_store.choose_onnx_file), `model.onnx` (`"fp32"`) or the one named.

Tokenization is the `tokenizers` library reading the repository's tokenizer.json, truncated the
way transformers truncates a pair (longest first) to the shortest of `max_length`, the tokenizer's
`model_max_length` and the model's position table. Scores are computed as by the torch runner
(runners/cross_encoder.py): sigmoid of a single logit, else softmax and the second label.

Batch invariance: an int8 file that quantizes activations per batch (`DynamicQuantizeLinear`: one
scale for the whole padded batch) runs every pair alone (`max_pairs == 1`), as stage 1 does
(runners/flashrank.py), so a pair's score never depends on what else is scored with it. An fp32
file runs length-sorted batches of at most `batch_tokens` padded tokens.

Nothing here imports torch or transformers.
"""

from __future__ import annotations

import json
import mmap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort
from tokenizers import Encoding, Tokenizer

from ..errors import ModelLoadError
from ..model_store import CpuFeatures, check_stage2_dir, choose_onnx_file
from ..types import TextTokens
from .flashrank import plan_batches, quantizes_per_batch
from .onnx_inputs import padded_inputs

if TYPE_CHECKING:
    from ..devices import Accelerator
    from ..settings import Settings

SUPPORTED_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# transformers' "no limit" sentinel for model_max_length is 1e30; anything this big means none
NO_LIMIT = 1_000_000


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def onnx_precision(onnx_file: Path) -> str:
    """ "int8" for a quantized file, "fp16" for a half-precision one, else "fp32"."""
    with (
        onnx_file.open("rb") as handle,
        mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data,
    ):
        if data.find(b"QuantizeLinear") >= 0 or data.find(b"MatMulInteger") >= 0:
            return "int8"
    stem = onnx_file.stem.lower()
    return "fp16" if "fp16" in stem or stem.endswith("_o4") else "fp32"


class OnnxCrossEncoderRunner:
    """Scores pairs with an ONNX cross-encoder on the CPU (ONNX Runtime, no torch)."""

    device = "cpu"

    def __init__(
        self,
        model_dir: str | Path,
        *,
        onnx_file: str = "auto",
        max_length: int = 512,
        batch_tokens: int = 8192,
        threads: int = 1,
        name: str | None = None,
        cpu: CpuFeatures | None = None,
    ) -> None:
        directory = Path(model_dir)
        check_stage2_dir(directory, "onnx-cross-encoder", onnx_file=onnx_file, cpu=cpu)
        names = [str(p.relative_to(directory)) for p in directory.glob("**/*.onnx")]
        self.onnx_file = directory / str(choose_onnx_file(names, onnx_file, cpu))
        self.name = name or directory.name
        self.files: Path | None = directory
        config = _read_json(directory / "config.json")
        tokenizer_config = _read_json(directory / "tokenizer_config.json")
        if "chat_template" in tokenizer_config or (directory / "chat_template.jinja").is_file():
            raise ModelLoadError(
                f"stage-2 model {self.name} has a chat template (an LLM-based reranker); "
                "onnx-cross-encoder scores plain (query, document) pairs; fix: use "
                "kind = \"cross-encoder\" (pip install 'reranker-server[torch]')"
            )
        limits = [max_length]
        model_max = tokenizer_config.get("model_max_length")
        if isinstance(model_max, (int, float)) and 0 < model_max < NO_LIMIT:
            limits.append(int(model_max))
        if isinstance(config.get("max_position_embeddings"), int):
            limits.append(int(config["max_position_embeddings"]))
        self.max_length: int = min(limits)  # query + document, special tokens included

        self._tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        self._tokenizer.no_padding()  # padding is per batch, below
        self._tokenizer.enable_truncation(max_length=self.max_length, strategy="longest_first")
        self._untruncated = Tokenizer.from_str(self._tokenizer.to_str())
        self._untruncated.no_truncation()
        self.pair_special_tokens: int = self._tokenizer.num_special_tokens_to_add(True)
        self._pad_id = self._pad_token_id(config, tokenizer_config)

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        try:
            self._session = ort.InferenceSession(
                str(self.onnx_file), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise ModelLoadError(
                f"stage-2 ONNX file {self.onnx_file} could not be loaded ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); fix: download it again or "
                "set onnx_file to another file of the model"
            ) from exc
        self._input_names = [i.name for i in self._session.get_inputs()]
        unknown = [n for n in self._input_names if n not in SUPPORTED_INPUTS]
        if unknown or "input_ids" not in self._input_names:
            raise ModelLoadError(
                f"stage-2 ONNX file {self.onnx_file} takes inputs {', '.join(self._input_names)}; "
                f"onnx-cross-encoder feeds {', '.join(SUPPORTED_INPUTS)}; fix: export the model as "
                "a sequence classifier (optimum-cli export onnx --task text-classification)"
            )
        self.precision = onnx_precision(self.onnx_file)
        self.batch_tokens = batch_tokens
        self.max_pairs = 1 if quantizes_per_batch(self.onnx_file) else max(1, batch_tokens // 16)
        self._pairs_scored = 0
        self._calls = 0

    def _pad_token_id(self, config: dict[str, Any], tokenizer_config: dict[str, Any]) -> int:
        if isinstance(config.get("pad_token_id"), int):
            return int(config["pad_token_id"])
        token = tokenizer_config.get("pad_token")
        if isinstance(token, dict):
            token = token.get("content")
        found = self._tokenizer.token_to_id(token) if isinstance(token, str) else None
        return int(found) if found is not None else 0

    # --- the scheduler's steps: prepare (caller's thread), then run (one batch, a worker)

    def prepare(self, pairs: Sequence[tuple[str, str]]) -> list[Encoding]:
        """Encode pairs, truncated (longest first), unpadded."""
        return list(self._tokenizer.encode_batch(list(pairs)))

    @staticmethod
    def length(encoding: Encoding) -> int:
        return len(encoding.ids)

    def run(self, encodings: Sequence[Encoding]) -> list[float]:
        """Scores of encodings the caller grouped into one allowed batch."""
        return [float(s) for s in self._forward(encodings)]

    # --- whole requests

    def score(self, query: str, documents: Sequence[str]) -> list[float]:
        return self.score_pairs([(query, doc) for doc in documents])

    def score_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        if not pairs:
            return []
        encodings = self.prepare(pairs)
        scores = np.empty(len(encodings), dtype=np.float64)
        lengths = [len(e.ids) for e in encodings]
        for batch in plan_batches(lengths, self.batch_tokens, self.max_pairs):
            scores[batch] = self._forward([encodings[i] for i in batch])
        return [float(s) for s in scores]

    def encode_texts(self, texts: Sequence[str]) -> list[TextTokens]:
        """Each text alone, untruncated, without special tokens (for long-document windows,
        engine/windows.py, when this runner serves as stage 1)."""
        encodings = self._untruncated.encode_batch(list(texts), add_special_tokens=False)
        return [TextTokens(e.offsets, e.word_ids) for e in encodings]

    def stats(self) -> dict[str, float]:
        """Counters for metrics: model calls and pairs scored since start."""
        return {"calls": float(self._calls), "pairs": float(self._pairs_scored)}

    def _forward(self, encodings: Sequence[Encoding]) -> np.ndarray:
        feed = padded_inputs(encodings, self._pad_id, self._input_names)
        logits = self._session.run(None, feed)[0]
        self._calls += 1
        self._pairs_scored += len(encodings)
        logits = np.asarray(logits, dtype=np.float64).reshape(len(encodings), -1)
        if logits.shape[1] == 1:  # one relevance logit: sigmoid
            return np.asarray(1.0 / (1.0 + np.exp(-logits[:, 0])))
        # (not relevant, relevant) logits: softmax, the second label (as the torch runner)
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        return np.asarray(shifted[:, 1] / shifted.sum(axis=1))


def load(model: str, settings: Settings, accelerator: Accelerator | None) -> OnnxCrossEncoderRunner:
    """The `onnx-cross-encoder` kind: a hub repository or directory with `onnx/*.onnx`, on the
    CPU (ONNX Runtime, no torch) whatever the accelerator; the ONNX file that fits this CPU."""
    from ..model_store import stage2_path

    path = stage2_path(settings, model=model, kind="onnx-cross-encoder")
    try:
        return OnnxCrossEncoderRunner(
            path,
            max_length=settings.max_length,
            batch_tokens=settings.stage1_batch_tokens,
            threads=settings.threads_per_worker(),
            name=Path(model).name if Path(model).expanduser().is_dir() else model,
        )
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(
            f"ONNX cross-encoder {path} could not be loaded ({type(exc).__name__}: {exc}); fix: "
            "point the model at a directory or hub repository with onnx/*.onnx and tokenizer.json"
        ) from exc
