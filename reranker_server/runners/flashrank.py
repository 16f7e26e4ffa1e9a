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

Pre / core / post: `prepare` tokenizes (in the request's thread), `run` pads and runs one batch.
"""

from __future__ import annotations

import json
import mmap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort
from tokenizers import AddedToken, Encoding, Tokenizer

from ..errors import ModelLoadError
from ..types import TextTokens
from .onnx_inputs import padded_inputs
from .pair_template import PairIds, PairTemplate

if TYPE_CHECKING:
    from ..devices import Accelerator
    from ..settings import Settings


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


def _pre_tokenizer(tokenizer: Tokenizer) -> str | None:
    """The type of the tokenizer's pre-tokenizer (None: none)."""
    found = json.loads(tokenizer.to_str()).get("pre_tokenizer")
    return found.get("type") if isinstance(found, dict) else None


def _json_or_empty(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def quantizes_per_batch(onnx_file: Path) -> bool:
    """Whether the model quantizes activations with one scale per batch (DynamicQuantizeLinear).

    The op type is stored as plain bytes in the ONNX protobuf, so a byte search finds it without
    the `onnx` package; a false positive would only make batches smaller.
    """
    with (
        onnx_file.open("rb") as handle,
        mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data,
    ):
        return data.find(b"DynamicQuantizeLinear") >= 0


def plan_batches(
    lengths: Sequence[int], batch_tokens: int, max_pairs: int | None = None
) -> list[list[int]]:
    """Group positions into batches, longest first, each at most `batch_tokens` padded tokens
    and `max_pairs` items.

    Sorting by length keeps padding small; every batch holds at least one item.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for position in order:
        length = lengths[position]
        width = max(longest, length)
        full = max_pairs is not None and len(current) >= max_pairs
        if current and (full or width * (len(current) + 1) > batch_tokens):
            batches.append(current)
            current, width = [], length
        current.append(position)
        longest = width
    if current:
        batches.append(current)
    return batches


class FlashRankRunner:
    """Scores pairs with a FlashRank ONNX cross-encoder on the CPU (the runner contract,
    runners/base.py, with a tokenizer for long documents)."""

    device = "cpu"

    def __init__(
        self,
        directory: Path,
        onnx_file: Path,
        *,
        max_length: int = 512,
        batch_tokens: int = 8192,
        threads: int = 1,
    ) -> None:
        self.name = directory.name
        self.files: Path | None = directory
        self._batch_tokens = batch_tokens
        self._tokenizer, self._pad_id = load_flashrank_tokenizer(directory, max_length)
        truncation = self._tokenizer.truncation or {}
        self.max_length: int = int(truncation.get("max_length", max_length))  # query + document
        self.pair_special_tokens: int = self._tokenizer.num_special_tokens_to_add(True)
        self._untruncated = Tokenizer.from_str(self._tokenizer.to_str())
        self._untruncated.no_truncation()
        self._template = PairTemplate.learn(self._tokenizer)
        # BERT's pre-tokenizer splits words on whitespace and punctuation alone, so a text cut
        # at word boundaries tokenizes as that slice of its tokens: windows reuse their ids.
        # (A sentencepiece tokenizer marks a text's first word: its windows are tokenized.)
        self.word_local_tokens: bool = _pre_tokenizer(self._tokenizer) == "BertPreTokenizer"
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # No arena: ONNX Runtime's would keep the largest batch's activations for good; freed
        # to malloc they go back to the system with the rest (memory.py). Measured: no slower
        # (one 512-token pair: 470 vs 506 ms, 30 words: 23.5 vs 23.2 ms, full-size int8 model).
        options.enable_cpu_mem_arena = False
        self._session = ort.InferenceSession(
            str(onnx_file), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._input_names = {i.name for i in self._session.get_inputs()}
        self.batch_tokens = batch_tokens
        per_batch = quantizes_per_batch(onnx_file)
        self.precision = "int8" if per_batch else "fp32"
        self.max_pairs = 1 if per_batch else max(1, batch_tokens // 16)

    def tokenize(self, query: str, documents: Sequence[str]) -> list[Encoding]:
        """Encode (query, document) pairs, truncated, unpadded."""
        return self.prepare([(query, doc) for doc in documents])

    def prepare(self, pairs: Sequence[tuple[str, str]]) -> list[Encoding]:
        """Encode pairs, truncated, unpadded (the scheduler's pre step)."""
        return list(self._tokenizer.encode_batch(list(pairs)))

    def prepare_tokens(
        self,
        query: str,
        query_ids: list[int] | None,
        texts: Sequence[str],
        ids: Sequence[list[int] | None],
    ) -> list[Encoding | PairIds] | None:
        """The items `prepare` makes of (query, text) pairs, from the ids `encode_texts` gave
        (tokenize once: engine/windows.py); a text (or the query) without ids is tokenized
        alone here. None when the tokenizer's pair layout is unknown. A pair longer than
        `max_length` (the window plan makes none) is tokenized as a pair, to truncate it as
        FlashRank does."""
        template = self._template
        if template is None:
            return None
        if query_ids is None:
            query_ids = self._alone([query])[0]
        todo = [i for i, known in enumerate(ids) if known is None]
        alone = dict(zip(todo, self._alone([texts[i] for i in todo]), strict=True))
        room = self.max_length - template.special_tokens - len(query_ids)
        items: list[Encoding | PairIds] = []
        for i, text in enumerate(texts):
            text_ids = ids[i]
            if text_ids is None:
                text_ids = alone[i]
            if len(text_ids) <= room:
                items.append(template.build(query_ids, text_ids))
            else:
                items += self.prepare([(query, text)])
        return items

    def _alone(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        return [
            e.ids for e in self._untruncated.encode_batch(list(texts), add_special_tokens=False)
        ]

    @staticmethod
    def length(encoding: Encoding | PairIds) -> int:
        return len(encoding.ids)

    def run(self, encodings: Sequence[Encoding | PairIds]) -> list[float]:
        """Scores of encodings the caller grouped into one allowed batch."""
        return [float(s) for s in self._forward(encodings)]

    def encode_texts(self, texts: Sequence[str]) -> list[TextTokens]:
        """Each text alone, untruncated, without special tokens: token spans and words (the
        engine cuts long documents into windows with these, see engine/windows.py)."""
        encodings = self._untruncated.encode_batch(list(texts), add_special_tokens=False)
        return [TextTokens(e.offsets, e.word_ids, e.ids) for e in encodings]

    def score(self, query: str, documents: Sequence[str]) -> list[float]:
        return self.score_pairs([(query, doc) for doc in documents])

    def stats(self) -> dict[str, float]:
        return {}

    def score_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        if not pairs:
            return []
        encodings = self.prepare(pairs)
        scores = np.empty(len(encodings), dtype=np.float32)
        lengths = [len(e.ids) for e in encodings]
        for batch in plan_batches(lengths, self._batch_tokens, self.max_pairs):
            scores[batch] = self._forward([encodings[i] for i in batch])
        return [float(s) for s in scores]

    def _forward(self, encodings: Sequence[Encoding | PairIds]) -> np.ndarray:
        feed = padded_inputs(encodings, self._pad_id, self._input_names)
        logits = self._session.run(None, feed)[0]
        # The same arithmetic as flashrank.Ranker.rerank, in float32.
        if logits.shape[1] == 1:
            return np.asarray(1 / (1 + np.exp(-logits.flatten())), dtype=np.float32)
        exp_logits = np.exp(logits)
        return np.asarray(exp_logits[:, 1] / np.sum(exp_logits, axis=1), dtype=np.float32)


def load(model: str, settings: Settings, accelerator: Accelerator | None) -> FlashRankRunner:
    """The `flashrank` runner kind: a FlashRank model name (downloaded into the cache) or
    directory, on the CPU whatever the accelerator."""
    from ..model_store import stage1_files

    files = stage1_files(settings, model)
    try:
        return FlashRankRunner(
            files.directory,
            files.onnx_file,
            max_length=settings.max_length,
            batch_tokens=settings.stage1_batch_tokens,
            threads=settings.threads_per_worker(),
        )
    except Exception as exc:
        raise ModelLoadError(
            f"FlashRank model {files.onnx_file} could not be loaded ({type(exc).__name__}: "
            f"{exc}); fix: delete the directory to download it again, or point "
            "RERANKER_STAGE1_MODEL at a valid FlashRank model"
        ) from exc
