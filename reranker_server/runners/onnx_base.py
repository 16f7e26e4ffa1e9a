"""What the two ONNX runners share (flashrank.py, onnx_cross_encoder.py): the session options
(and the fast graph, onnx_graph.py), tokenize / pad / run, pairs built from the window plan's
token ids (tokenize once, pair_template.py), batch bounds and the score head.

A subclass builds its truncating tokenizer and picks the ONNX file, then calls `_start`.

Batch invariance: an int8 file that quantizes activations per batch (`DynamicQuantizeLinear`: one
scale for the whole padded batch) runs every pair alone (`max_pairs == 1`), so a pair's score never
depends on what else is scored with it; any other file runs length-sorted batches of at most
`batch_tokens` padded tokens.
"""

from __future__ import annotations

import json
import mmap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Encoding, Tokenizer

from ..types import TextTokens
from .onnx_graph import FAST_DISABLED_OPTIMIZERS, fast_options, unmasked
from .onnx_inputs import padded_inputs
from .pair_template import PairIds, PairTemplate


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


def cpu_session(onnx_file: Path, threads: int, graph: str = "exact") -> ort.InferenceSession:
    """An ONNX Runtime CPU session: `threads` threads inside an operator, one call at a time;
    `graph` "fast": the fast graph (onnx_graph.py; without the attention mask when every pair
    runs alone, so never padded).

    No arena: ONNX Runtime's would keep the largest batch's activations for good; freed to
    malloc they go back to the system with the rest (memory.py). Measured: no slower (one
    512-token pair: 470 vs 506 ms, 30 words: 23.5 vs 23.2 ms, full-size int8 model)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.enable_cpu_mem_arena = False
    if graph == "exact":
        return ort.InferenceSession(
            str(onnx_file), sess_options=options, providers=["CPUExecutionProvider"]
        )
    fast_options(options)
    model = (unmasked(onnx_file) if quantizes_per_batch(onnx_file) else None) or str(onnx_file)
    return ort.InferenceSession(
        model,
        sess_options=options,
        providers=["CPUExecutionProvider"],
        disabled_optimizers=list(FAST_DISABLED_OPTIMIZERS),
    )


def _pre_tokenizer(tokenizer: Tokenizer) -> str | None:
    """The type of the tokenizer's pre-tokenizer (None: none)."""
    found = json.loads(tokenizer.to_str()).get("pre_tokenizer")
    return found.get("type") if isinstance(found, dict) else None


class OnnxPairRunner:
    """An ONNX cross-encoder on the CPU behind the runner contract (runners/base.py), with a
    tokenizer for long documents (engine/windows.py)."""

    device = "cpu"
    name: str
    files: Path | None
    precision: str
    max_pairs: int
    batch_tokens: int
    max_length: int  # tokens of query + document, special tokens included
    pair_special_tokens: int

    def _start(
        self,
        tokenizer: Tokenizer,
        pad_id: int,
        session: ort.InferenceSession,
        onnx_file: Path,
        batch_tokens: int,
    ) -> None:
        """Take the truncating `tokenizer` and the session; set the batch bounds."""
        self._tokenizer = tokenizer
        self._pad_id = pad_id
        truncation = tokenizer.truncation or {}
        self.max_length = int(truncation.get("max_length", 512))
        self.pair_special_tokens = tokenizer.num_special_tokens_to_add(True)
        self._untruncated = Tokenizer.from_str(tokenizer.to_str())
        self._untruncated.no_truncation()
        self._session = session
        self._input_names = [i.name for i in session.get_inputs()]
        self.batch_tokens = batch_tokens
        self.max_pairs = 1 if quantizes_per_batch(onnx_file) else max(1, batch_tokens // 16)
        self._template = PairTemplate.learn(tokenizer)
        # BERT's pre-tokenizer splits words on whitespace and punctuation alone, so a text cut
        # at word boundaries tokenizes as that slice of its tokens: windows reuse their ids.
        # (A sentencepiece tokenizer marks a text's first word: its windows are tokenized.)
        self.word_local_tokens: bool = _pre_tokenizer(tokenizer) == "BertPreTokenizer"
        self._calls = 0
        self._pairs_scored = 0

    # --- the scheduler's steps: prepare (caller's thread), then run (one batch, a worker)

    def prepare(self, pairs: Sequence[tuple[str, str]]) -> list[Encoding]:
        """Encode pairs, truncated, unpadded."""
        return list(self._tokenizer.encode_batch(list(pairs)))

    def tokenize(self, query: str, documents: Sequence[str]) -> list[Encoding]:
        """Encode one query's (query, document) pairs, truncated, unpadded."""
        return self.prepare([(query, doc) for doc in documents])

    @staticmethod
    def length(encoding: Encoding | PairIds) -> int:
        return len(encoding.ids)

    def run(self, encodings: Sequence[Encoding | PairIds]) -> list[float]:
        """Scores of encodings the caller grouped into one allowed batch."""
        feed = padded_inputs(encodings, self._pad_id, self._input_names)
        logits = self._session.run(None, feed)[0]
        self._calls += 1
        self._pairs_scored += len(encodings)
        return [float(s) for s in self.head(np.asarray(logits).reshape(len(encodings), -1))]

    def head(self, logits: np.ndarray) -> np.ndarray:
        """Scores from logits (one row per pair): sigmoid of a single logit, else softmax and
        the second label (not relevant, relevant), in float64."""
        logits = np.asarray(logits, dtype=np.float64)
        if logits.shape[1] == 1:
            return np.asarray(1.0 / (1.0 + np.exp(-logits[:, 0])))
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        return np.asarray(shifted[:, 1] / shifted.sum(axis=1))

    def encode_texts(self, texts: Sequence[str]) -> list[TextTokens]:
        """Each text alone, untruncated, without special tokens: token spans, words and ids (the
        engine cuts long documents into windows with these, engine/windows.py)."""
        encodings = self._untruncated.encode_batch(list(texts), add_special_tokens=False)
        return [TextTokens(e.offsets, e.word_ids, e.ids) for e in encodings]

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
        the tokenizer does."""
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

    def score(self, query: str, documents: Sequence[str]) -> list[float]:
        """Scores of one query's documents (base.score, for convenience)."""
        from .base import score

        return score(self, query, documents)

    def score_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        """Scores of any number of pairs (base.score_pairs, for convenience)."""
        from .base import score_pairs

        return score_pairs(self, pairs)

    def stats(self) -> dict[str, float]:
        """Counters for metrics: model calls and pairs scored since start."""
        return {"calls": float(self._calls), "pairs": float(self._pairs_scored)}
