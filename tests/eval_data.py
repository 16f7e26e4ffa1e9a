"""Labelled sets on disk for `reranker-server eval`: BEIR folders and JSONL files, written by tests
(and by docs/tuning.md's example run, with more topics)."""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

TOPICS = [
    "volcano lava eruption magma crater ash",
    "violin orchestra concert symphony melody bow",
    "glacier ice arctic snow polar melt",
    "bitcoin ledger wallet mining blockchain token",
    "tomato garden soil seed harvest compost",
    "satellite orbit rocket launch payload booster",
    "protein enzyme cell membrane molecule gene",
    "chess opening gambit rook bishop endgame",
    "bridge steel cable span engineer concrete",
    "coffee bean roast espresso brew aroma",
    "whale ocean dolphin reef coral plankton",
    "tax income deduction refund audit payroll",
]
FILLER = "the a of and to in is was for on with as by at from this that it are be".split()


def write_beir(
    folder: Path,
    corpus: Mapping[str, str | dict[str, str]],
    queries: Mapping[str, str],
    qrels: Iterable[tuple[str, str, int]],
    split: str = "test",
) -> Path:
    """A BEIR folder: corpus.jsonl, queries.jsonl, qrels/<split>.tsv (with its header)."""
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    docs = [
        {"_id": i, **(d if isinstance(d, dict) else {"title": "", "text": d})}
        for i, d in corpus.items()
    ]
    _jsonl(folder / "corpus.jsonl", docs)
    _jsonl(folder / "queries.jsonl", [{"_id": q, "text": t} for q, t in queries.items()])
    rows = ["query-id\tcorpus-id\tscore", *(f"{q}\t{d}\t{g}" for q, d, g in qrels)]
    (folder / "qrels" / f"{split}.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder


def write_jsonl(path: Path, lines: Iterable[Mapping[str, Any]]) -> Path:
    _jsonl(path, list(lines))
    return path


def synthetic_beir(
    folder: Path,
    topics: int = 6,
    docs_per_topic: int = 5,
    seed: int = 0,
    queries_per_topic: int = 1,
    question: str = "",
) -> Path:
    """Documents about `topics` subjects; each query asks about one subject (three of its words,
    after `question`), whose documents are relevant: grade 2 for those that use at least two of
    the query's subject words, else 1. A `question` of filler words ("what is the") makes BM25
    return most of the corpus, as a vague user question does."""
    rng = random.Random(seed)
    corpus: dict[str, str] = {}
    queries: dict[str, str] = {}
    qrels: list[tuple[str, str, int]] = []
    for t, topic in enumerate(TOPICS[:topics]):
        words = topic.split()
        docs: dict[str, list[str]] = {}
        for d in range(docs_per_topic):
            shared = rng.randint(1, len(words))
            body = rng.sample(words, shared) + rng.sample(FILLER, 6)
            if rng.random() < 0.5:  # a stray word of another topic
                body.append(rng.choice(TOPICS[(t + 1) % len(TOPICS)].split()))
            rng.shuffle(body)
            docs[f"d{t}-{d}"] = body
            corpus[f"d{t}-{d}"] = " ".join(body)
        for n in range(queries_per_topic):
            query_words = words[:3] if n == 0 else rng.sample(words, 3)
            qid = f"q{t}" if n == 0 else f"q{t}-{n}"
            queries[qid] = f"{question} {' '.join(query_words)}".strip()
            for doc_id, body in docs.items():
                grade = 2 if len(set(query_words) & set(body)) >= 2 else 1
                qrels.append((qid, doc_id, grade))
    return write_beir(folder, corpus, queries, qrels)


def _jsonl(path: Path, items: list[Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(item) + "\n" for item in items)
    path.write_text(text, encoding="utf-8")
