"""`reranker-server eval`: how good and how costly the cascade is on the user's own labelled data.

- data.py: a labelled set (BEIR folder or simple JSONL) and each query's candidate list
- bm25.py: a small BM25 for candidate lists when the set brings no run file
- metrics.py: NDCG@10, MRR@10, Recall@k of one ranking
- runner.py: sends every query at every depth to a server (remote or in-process) and measures
- report.py: the table, the JSON and the SVG chart
- command.py: the command line
"""

from __future__ import annotations

from ..errors import RerankerError


class EvalError(RerankerError):
    """Bad input or an unusable server: one line that names the fix; the command exits 1."""

    error_type = "eval_error"
