"""The baseline: the spec implemented the obvious way, in one file.

    RERANKER_BENCH_MODELS=DIR uvicorn bench.naive_server:app --host 127.0.0.1 --port 5300

A synchronous FastAPI handler (FastAPI runs it in its thread pool, so concurrent requests run at
once) calls `flashrank.Ranker.rerank` on every document (one ONNX batch, padded to the longest
pair), keeps the best `candidates`, then reorders them with the sentence-transformers
cross-encoder (`predict`, on the CPU here: no GPU on the benchmark machine) and returns the top_k.
No queue, no batching across requests, library defaults for threads.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from fastapi import FastAPI
from flashrank import Ranker, RerankRequest
from pydantic import BaseModel
from sentence_transformers import CrossEncoder

MODELS = Path(os.environ.get("RERANKER_BENCH_MODELS", "/tmp/bench-models"))
CANDIDATES = 10

ranker = Ranker(model_name="ms-marco-MiniLM-L-12-v2", cache_dir=str(MODELS / "flashrank"))
cross_encoder = CrossEncoder(str(MODELS / "cross-encoder"), device="cpu")
app = FastAPI()


class Body(BaseModel):
    query: str
    documents: list[str]
    top_k: int


@app.post("/rerank")
def rerank(body: Body) -> dict[str, object]:
    passages = [{"id": i, "text": d} for i, d in enumerate(body.documents)]
    first = ranker.rerank(RerankRequest(query=body.query, passages=passages))
    best = first[: max(CANDIDATES, body.top_k)]
    logits = cross_encoder.predict([(body.query, p["text"]) for p in best], show_progress_bar=False)
    scores = 1 / (1 + np.exp(-np.asarray(logits, dtype=np.float64)))
    order = np.argsort(-scores)[: body.top_k]
    return {
        "results": [
            {"index": best[i]["id"], "text": best[i]["text"], "score": float(scores[i])}
            for i in order
        ]
    }


@app.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok"}
