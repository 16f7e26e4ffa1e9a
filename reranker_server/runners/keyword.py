"""Kind `keyword`: a BM25-like scorer of each (query, document) pair alone. No model files, no
ONNX Runtime, no torch: a zero-model baseline, a stage 1 for tests, and the smallest example of a
runner kind (this module plus one line in registry.py).

    [cascades.baseline]
    stage1 = { model = "bm25", kind = "keyword" }

A pair's score is BM25's term-frequency part over the query's distinct words (k1 = 0.9,
b = 0.4, Lucene's defaults in evaluation/bm25.py) with every idf 1 and a fixed average length
(no corpus: a pair is scored alone, so its score never depends on its batch-mates), squashed into
[0, 1) as s / (1 + s). Words are lowercased runs of letters and digits; a pair reads at most
`max_length` words (query first).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from ..types import TextTokens
from .kind import LoadTarget, RunnerKind

WORD = re.compile(r"\w+")
K1, B, AVERAGE_WORDS = 0.9, 0.4, 100.0
NAMES = ("keyword", "bm25")  # model names that mean this kind when no kind is given

Item = tuple[tuple[str, ...], Counter[str], int]  # query words, document counts, pair words


class KeywordRunner:
    """The runner contract (runners/base.py) with a word "tokenizer" for long documents."""

    device = "cpu"
    precision = "fp32"
    files: Path | None = None
    pair_special_tokens = 0

    def __init__(self, name: str = "bm25", *, max_length: int = 512, batch_tokens: int = 8192):
        self.name = name
        self.max_length = max_length
        self.batch_tokens = batch_tokens
        self.max_pairs = max(1, batch_tokens // 16)

    def prepare(self, pairs: Sequence[tuple[str, str]]) -> list[Item]:
        items = []
        for query, document in pairs:
            query_words = WORD.findall(query.lower())[: self.max_length]
            room = max(0, self.max_length - len(query_words))
            document_words = WORD.findall(document.lower())[:room]
            items.append(
                (
                    tuple(dict.fromkeys(query_words)),
                    Counter(document_words),
                    len(query_words) + len(document_words),
                )
            )
        return items

    @staticmethod
    def length(item: Item) -> int:
        return max(1, item[2])

    def run(self, items: Sequence[Item]) -> list[float]:
        scores = []
        for query_words, counts, _ in items:
            norm = K1 * (1 - B + B * sum(counts.values()) / AVERAGE_WORDS)
            raw = sum(counts[w] * (K1 + 1) / (counts[w] + norm) for w in query_words if counts[w])
            scores.append(raw / (1 + raw))
        return scores

    def encode_texts(self, texts: Sequence[str]) -> list[TextTokens]:
        found = []
        for text in texts:
            spans = [m.span() for m in WORD.finditer(text)]
            found.append(TextTokens(spans, list(range(len(spans)))))
        return found


def _load(spec, store, target: LoadTarget) -> KeywordRunner:  # type: ignore[no-untyped-def]
    return KeywordRunner(spec.model, max_length=spec.max_length, batch_tokens=spec.batch_tokens)


KIND = RunnerKind(
    name="keyword",
    load=_load,
    fetch=lambda spec, store: None,
    check_directory=lambda directory, spec: None,
    claims=lambda names: False,
    known_name=lambda model: model in NAMES,
    needs_model=False,
)
