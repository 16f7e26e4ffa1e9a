"""A labelled set and each query's candidate list: what stage 1 will be given.

Two layouts:
- a BEIR folder: `corpus.jsonl` ({_id, title, text}), `queries.jsonl` ({_id, text}) and
  `qrels/<split>.tsv` (query-id, corpus-id, score; a header line is optional). The candidate list
  of a query is its top `top_n` in a TREC run file (`qid Q0 docid rank score tag`) when one is
  given, else its top `top_n` by BM25 over the corpus (bm25.py).
- a JSONL file, one query a line: `{"query": "...", "documents": ["...", ...], "relevant": [0, 3]}`
  (`relevant`: positions in `documents`, or `{"0": 2, "3": 1}` for graded relevance). The
  documents are the candidate list, in the order the user's first stage returned them.

Queries without a relevant document in the judgements are not evaluated (as in BEIR).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import EvalError
from .bm25 import BM25

LAYOUT_HINT = (
    "give a BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv) or a .jsonl file of "
    '{"query", "documents", "relevant"} lines'
)


@dataclass(frozen=True)
class EvalQuery:
    """One query: the candidates sent to the server (first-stage order) and its judgements."""

    qid: str
    text: str
    doc_ids: list[str]
    texts: list[str]
    qrels: dict[str, int]  # judged document -> grade (> 0: relevant), among the candidates or not

    @property
    def relevant(self) -> set[str]:
        return {doc for doc, grade in self.qrels.items() if grade > 0}


@dataclass(frozen=True)
class Dataset:
    path: Path
    layout: str  # "beir" | "jsonl"
    source: str  # where the candidate lists came from, in words
    queries: list[EvalQuery]
    skipped: int = 0  # queries whose judgements name no relevant document

    def candidate_recall(self) -> float:
        """Share of the relevant documents that are in the candidate lists: the ceiling of every
        recall the cascade can reach."""
        relevant = sum(len(q.relevant) for q in self.queries)
        found = sum(len(q.relevant & set(q.doc_ids)) for q in self.queries)
        return found / relevant if relevant else 0.0


def load_dataset(
    path: Path,
    *,
    split: str = "test",
    run_file: Path | None = None,
    top_n: int = 100,
    max_queries: int | None = None,
) -> Dataset:
    """Read the set at `path`. Raises EvalError (one line naming the file and the fix)."""
    if not path.exists():
        raise EvalError(f"{path} does not exist: {LAYOUT_HINT}")
    if path.is_file():
        if run_file is not None:
            raise EvalError("--run needs a BEIR folder: a .jsonl file brings its own candidates")
        return _load_jsonl(path, top_n, max_queries)
    if not (path / "corpus.jsonl").is_file():
        raise EvalError(f"{path / 'corpus.jsonl'} not found: {LAYOUT_HINT}")
    return _load_beir(path, split, run_file, top_n, max_queries)


# --- JSONL


def _load_jsonl(path: Path, top_n: int, max_queries: int | None) -> Dataset:
    queries: list[EvalQuery] = []
    skipped = 0
    for line, item in _json_lines(path):
        query, documents, relevant = item.get("query"), item.get("documents"), item.get("relevant")
        if (
            not isinstance(query, str)
            or not isinstance(documents, list)
            or relevant is None
            or not all(isinstance(d, str | dict) for d in documents)
        ):
            raise EvalError(
                f"{path}:{line}: each line needs query (a string), documents (a list of strings) "
                "and relevant (positions in documents)"
            )
        texts = [d if isinstance(d, str) else str(d.get("text", "")) for d in documents]
        qrels = _positions(relevant, len(texts), f"{path}:{line}")
        ids = [str(i) for i in range(len(texts))]
        evaluated = EvalQuery(str(item.get("id", line)), query, ids[:top_n], texts[:top_n], qrels)
        if evaluated.relevant:
            queries.append(evaluated)
        else:
            skipped += 1
        if max_queries is not None and len(queries) >= max_queries:
            break
    if not queries:
        raise EvalError(f"{path}: no query with a relevant document to evaluate")
    source = f"the lists in the file (first {top_n} of each)"
    return Dataset(path, "jsonl", source, queries, skipped)


def _positions(relevant: Any, documents: int, where: str) -> dict[str, int]:
    """`[0, 3]` or `{"0": 2, "3": 1}` -> {"0": grade, "3": grade}, each a position in documents."""
    pairs: list[tuple[Any, Any]]
    if isinstance(relevant, list):
        pairs = [(position, 1) for position in relevant]
    elif isinstance(relevant, dict):
        pairs = list(relevant.items())
    else:
        raise EvalError(f"{where}: relevant must be a list of positions or a {{position: grade}}")
    qrels: dict[str, int] = {}
    for position, grade in pairs:
        try:
            index, level = int(position), int(grade)
        except (TypeError, ValueError):
            raise EvalError(f"{where}: relevant {position!r}: {grade!r} is not a number") from None
        if not 0 <= index < documents:
            raise EvalError(
                f"{where}: relevant position {index} is not in documents (0..{documents - 1})"
            )
        qrels[str(index)] = level
    return qrels


# --- BEIR


def _load_beir(
    folder: Path, split: str, run_file: Path | None, top_n: int, max_queries: int | None
) -> Dataset:
    corpus = _read_corpus(folder / "corpus.jsonl")
    texts = _read_queries(folder / "queries.jsonl")
    qrels_path = folder / "qrels" / f"{split}.tsv"
    judged = _read_qrels(qrels_path, texts, corpus)
    kept = {qid: grades for qid, grades in judged.items() if any(g > 0 for g in grades.values())}
    skipped = len(judged) - len(kept)
    qids = list(kept)[:max_queries] if max_queries is not None else list(kept)
    if not qids:
        raise EvalError(f"{qrels_path}: no query with a relevant document to evaluate")
    if run_file is not None:
        lists = _read_run(run_file, corpus, top_n)
        source = f"run file {run_file} (top {top_n})"
    else:
        doc_ids = list(corpus)
        index = BM25([corpus[d] for d in doc_ids])
        lists = {qid: [doc_ids[i] for i in index.top(texts[qid], top_n)] for qid in qids}
        source = f"BM25 top {top_n} over {len(corpus)} documents"
    queries = [
        EvalQuery(
            qid,
            texts[qid],
            lists.get(qid, []),
            [corpus[d] for d in lists.get(qid, [])],
            kept[qid],
        )
        for qid in qids
    ]
    return Dataset(folder, "beir", source, queries, skipped)


def _read_corpus(path: Path) -> dict[str, str]:
    corpus: dict[str, str] = {}
    for line, item in _json_lines(path):
        doc_id, text = item.get("_id"), item.get("text")
        if doc_id is None or not isinstance(text, str):
            raise EvalError(f"{path}:{line}: a corpus line needs _id and text")
        title = item.get("title")
        corpus[str(doc_id)] = f"{title} {text}".strip() if isinstance(title, str) else text
    if not corpus:
        raise EvalError(f"{path} holds no document")
    return corpus


def _read_queries(path: Path) -> dict[str, str]:
    queries: dict[str, str] = {}
    for line, item in _json_lines(path):
        qid, text = item.get("_id"), item.get("text")
        if qid is None or not isinstance(text, str):
            raise EvalError(f"{path}:{line}: a query line needs _id and text")
        queries[str(qid)] = text
    return queries


def _read_qrels(
    path: Path, queries: Mapping[str, str], corpus: Mapping[str, str]
) -> dict[str, dict[str, int]]:
    if not path.is_file():
        found = sorted(p.stem for p in path.parent.glob("*.tsv"))
        hint = f"found: {', '.join(found)}; pick one with --split" if found else LAYOUT_HINT
        raise EvalError(f"{path} not found ({hint})")
    judged: dict[str, dict[str, int]] = {}
    for row, (line, fields) in enumerate(_tsv_lines(path)):
        if len(fields) < 3:
            raise EvalError(
                f"{path}:{line}: expected query-id, corpus-id and score (tab-separated)"
            )
        qid, doc_id, grade = fields[0], fields[1], fields[2]
        try:
            level = int(float(grade))
        except ValueError:
            if row == 0:
                continue  # the header
            raise EvalError(f"{path}:{line}: score {grade!r} is not a number") from None
        if qid not in queries:
            raise EvalError(f"{path}:{line}: query {qid!r} is not in queries.jsonl")
        if doc_id not in corpus:
            raise EvalError(f"{path}:{line}: document {doc_id!r} is not in corpus.jsonl")
        judged.setdefault(qid, {})[doc_id] = level
    return judged


def _read_run(path: Path, corpus: Mapping[str, str], top_n: int) -> dict[str, list[str]]:
    """A TREC run: per query, its documents best first (by score, then rank), the first top_n."""
    if not path.is_file():
        raise EvalError(f"run file {path} not found (TREC format: qid Q0 docid rank score tag)")
    ranked: dict[str, list[tuple[float, int, str]]] = {}
    for line, fields in _tsv_lines(path, split_on=None):
        try:
            qid, doc_id, rank, score = fields[0], fields[2], int(fields[3]), float(fields[4])
        except (IndexError, ValueError):
            raise EvalError(
                f"{path}:{line}: expected 'qid Q0 docid rank score tag' (TREC run format)"
            ) from None
        if doc_id not in corpus:
            raise EvalError(f"{path}:{line}: document {doc_id!r} is not in corpus.jsonl")
        ranked.setdefault(qid, []).append((-score, rank, doc_id))
    return {qid: [d for *_, d in sorted(rows)][:top_n] for qid, rows in ranked.items()}


# --- files


def _json_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    for number, text in _lines(path):
        try:
            item = json.loads(text)
        except json.JSONDecodeError as exc:
            raise EvalError(f"{path}:{number}: not JSON ({exc.msg})") from None
        if not isinstance(item, dict):
            raise EvalError(f"{path}:{number}: expected a JSON object")
        yield number, item


def _tsv_lines(path: Path, split_on: str | None = "\t") -> Iterator[tuple[int, list[str]]]:
    for number, text in _lines(path):
        yield number, [f.strip() for f in text.split(split_on)]


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """Non-blank lines with their 1-based numbers."""
    if not path.is_file():
        raise EvalError(f"{path} not found: {LAYOUT_HINT}")
    try:
        with path.open(encoding="utf-8") as handle:
            for number, text in enumerate(handle, start=1):
                if text.strip():
                    yield number, text.rstrip("\n")
    except UnicodeDecodeError:
        raise EvalError(f"{path} is not UTF-8 text") from None
