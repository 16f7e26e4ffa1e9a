"""Okapi BM25 in NumPy: candidate lists for a labelled set that brings no run file.

Lucene's formula (what Anserini/Pyserini, and so BEIR's BM25 baselines, use):
idf = ln(1 + (N - df + 0.5) / (df + 0.5)); a term's score in a document is
idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * length / average_length)).
Words are lowercased runs of letters and digits; each query word counts once. No stemming and no
stop words, so figures are close to, not equal to, a search engine's.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


class BM25:
    """An inverted index over `documents`; `top(query, n)` gives positions best first."""

    def __init__(self, documents: Sequence[str], k1: float = 0.9, b: float = 0.4) -> None:
        postings: dict[str, tuple[list[int], list[int]]] = {}
        lengths = np.zeros(len(documents), dtype=np.float64)
        for position, text in enumerate(documents):
            counts = Counter(words(text))
            lengths[position] = sum(counts.values())
            for word, tf in counts.items():
                ids, tfs = postings.setdefault(word, ([], []))
                ids.append(position)
                tfs.append(tf)
        self.size = len(documents)
        average = float(lengths.mean()) if self.size and lengths.any() else 1.0
        # the part of the denominator that depends only on the document
        self._norm = k1 * (1 - b + b * lengths / average)
        self._k1 = k1
        self._postings = {
            word: (np.array(ids, dtype=np.int64), np.array(tfs, dtype=np.float64))
            for word, (ids, tfs) in postings.items()
        }

    def idf(self, word: str) -> float:
        ids, _ = self._postings.get(word, (np.empty(0), None))
        df = len(ids)
        return math.log(1 + (self.size - df + 0.5) / (df + 0.5))

    def scores(self, query: str) -> np.ndarray:
        """Every document's score for `query`."""
        total = np.zeros(self.size, dtype=np.float64)
        for word in dict.fromkeys(words(query)):
            if word not in self._postings:
                continue
            ids, tfs = self._postings[word]
            total[ids] += self.idf(word) * tfs * (self._k1 + 1) / (tfs + self._norm[ids])
        return total

    def top(self, query: str, n: int) -> list[int]:
        """Positions of the best `n` documents that share a word with the query, best first;
        equal scores keep the corpus order."""
        scores = self.scores(query)
        matched = np.flatnonzero(scores > 0)
        order = matched[np.lexsort((matched, -scores[matched]))]
        return [int(i) for i in order[:n]]
