"""Ranking quality of one query: NDCG@k, MRR@k, Recall@k (as trec_eval / BEIR compute them).

`ranking`: document ids best first; `qrels`: judged document -> grade (> 0: relevant). Judged
documents that are missing from the ranking (stage 1 never saw them) still count in the ideal
ranking and in recall's denominator.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence


def dcg(gains: Sequence[float]) -> float:
    """Discounted cumulative gain with linear gains: sum of gain / log2(position + 1)."""
    return sum(gain / math.log2(position + 2) for position, gain in enumerate(gains))


def ndcg_at(ranking: Sequence[str], qrels: Mapping[str, int], k: int = 10) -> float:
    ideal = dcg(sorted((g for g in qrels.values() if g > 0), reverse=True)[:k])
    if ideal == 0:
        return 0.0
    return dcg([max(qrels.get(doc, 0), 0) for doc in ranking[:k]]) / ideal


def mrr_at(ranking: Sequence[str], qrels: Mapping[str, int], k: int = 10) -> float:
    """1 / position of the first relevant document in the top k; 0 when none is there."""
    for position, doc in enumerate(ranking[:k], start=1):
        if qrels.get(doc, 0) > 0:
            return 1.0 / position
    return 0.0


def recall_at(ranking: Sequence[str], qrels: Mapping[str, int], k: int) -> float:
    relevant = {doc for doc, grade in qrels.items() if grade > 0}
    if not relevant:
        return 0.0
    return len(relevant.intersection(ranking[:k])) / len(relevant)


def cascade_ranking(reranked: Sequence[int], stage1: Sequence[int], length: int) -> list[int]:
    """The first `length` positions of a cascade's ranking: stage 2's order of its candidates,
    then stage 1's order of the documents that were not candidates.

    This is how a depth under `length` is scored: with 5 candidates, NDCG@10 sees 5 documents
    that stage 2 ordered and 5 more in stage 1's order.
    """
    seen = set(reranked)
    return [*reranked, *(d for d in stage1 if d not in seen)][:length]
