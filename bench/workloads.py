"""The benchmark's request bodies: 20 short, 100 mixed and 1,000 long passages."""

from __future__ import annotations

import random
from typing import Any

QUERY = "what is the capital of france"
WORDS = (
    "paris capital france river city history population europe tower famous built century "
    "government language people world water food health research science music art"
).split()


def _passage(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def short_documents(seed: int) -> list[str]:
    """20 passages of ~130 tokens with the query."""
    rng = random.Random(seed)
    return [_passage(rng, rng.randint(110, 130)) for _ in range(20)]


def mixed_documents(seed: int) -> list[str]:
    """100 passages from 10 to 450 words (a few truncated at 512 tokens)."""
    rng = random.Random(seed)
    return [
        _passage(rng, int(rng.choice([10, 30, 60, 120, 250, 450]) * rng.uniform(0.7, 1.0)))
        for _ in range(100)
    ]


def long_documents(seed: int, count: int = 1000) -> list[str]:
    """`count` passages of 600 words: every pair is truncated to 512 tokens."""
    rng = random.Random(seed)
    return [_passage(rng, 600) for _ in range(count)]


WORKLOADS = {
    "20 short": short_documents,
    "100 mixed": mixed_documents,
    "250 long": lambda seed: long_documents(seed, 250),
    "1000 long": long_documents,
}


def body(workload: str, n: int, top_k: int = 10) -> dict[str, Any]:
    """Request `n` of a workload: its own documents and query, so no cache could answer it."""
    return {"query": f"{QUERY} {n}", "documents": WORKLOADS[workload](n % 4), "top_k": top_k}
