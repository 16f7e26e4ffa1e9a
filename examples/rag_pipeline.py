"""A RAG pipeline with reranker-server: vector search (top 20) -> rerank -> top 5 -> LLM context.

It runs offline against a running server and needs nothing beyond reranker-server itself:

    reranker-server serve                      # or: docker compose up
    python examples/rag_pipeline.py "How do plants turn sunlight into energy?"
    python examples/rag_pipeline.py --base-url http://gpu-box:5200 --api-key "$KEY" "..."

The vector search is a small bag-of-words embedding in numpy, so that the example needs no
embedding model; put your embedder and vector store there. The LLM call is replaced by printing the
prompt the LLM would get: the question and the five passages the server ranked best, best first.
Why rerank: vector search is cheap and recalls broadly (20 candidates); the cross-encoder reads the
query and each passage together and puts the few that answer it on top of the prompt.
"""

from __future__ import annotations

import argparse
import re
import zlib

import numpy as np

from reranker_server.client import RerankerClient

CANDIDATES = 20  # what vector search hands to the reranker
CONTEXT = 5  # what the LLM gets

CORPUS = [
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Chlorophyll in the chloroplasts absorbs mostly red and blue light.",
    "Plants take in carbon dioxide through small pores in their leaves called stomata.",
    "The light reactions of photosynthesis split water and release oxygen.",
    "The Calvin cycle uses ATP and NADPH to fix carbon dioxide into sugar.",
    "Plants store surplus energy as starch in roots, seeds and tubers.",
    "Cellular respiration in plant cells releases the energy stored in sugar.",
    "Solar panels turn sunlight into electricity using photovoltaic cells.",
    "Sunlight reaches the Earth about eight minutes after leaving the Sun.",
    "Some plants, like cacti, open their stomata at night to save water.",
    "Leaves are thin and wide so that they catch as much light as possible.",
    "Energy drinks contain caffeine and large amounts of sugar.",
    "Wind turbines convert the kinetic energy of moving air into electricity.",
    "Algae and cyanobacteria also perform photosynthesis in water.",
    "Autumn leaves turn yellow when chlorophyll breaks down and other pigments show.",
    "Animals get their energy by eating plants or other animals.",
    "A greenhouse traps heat so that plants can grow in cold climates.",
    "Plants need nitrogen, phosphorus and potassium from the soil to grow.",
    "The Sun is a star powered by the nuclear fusion of hydrogen into helium.",
    "Roots absorb water, which travels up the stem to the leaves through the xylem.",
    "Sunflowers turn their heads to follow the Sun across the sky.",
    "Coal and oil are fossil fuels formed from plants and animals that died long ago.",
    "Houseplants grow toward a window because of a response called phototropism.",
    "The energy in food is measured in calories or joules.",
    "Photosynthesis happens mainly in the leaves, inside cells of the mesophyll.",
    "Plants in the shade grow larger leaves to catch more of the available light.",
    "Bananas are rich in potassium and a quick source of energy for athletes.",
    "Oxygen in the air we breathe was mostly produced by photosynthesis.",
    "A battery stores chemical energy and releases it as electrical energy.",
    "Plants turn sunlight, water and carbon dioxide into sugar and oxygen.",
]


# --- stage 1: vector search (stand-in for your embedder and vector store)


def embed(texts: list[str], dims: int = 1024) -> np.ndarray:
    """Hashed bag-of-words vectors, L2-normalised: enough to recall candidates for a demo."""
    vectors = np.zeros((len(texts), dims), dtype=np.float32)
    for row, text in enumerate(texts):
        for word in re.findall(r"[a-z]+", text.lower()):
            vectors[row, zlib.crc32(word.encode()) % dims] += 1.0
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-9)


def vector_search(query: str, corpus: list[str], k: int = CANDIDATES) -> list[str]:
    """The `k` passages most similar to the query (cosine), most similar first."""
    similarity = embed(corpus) @ embed([query])[0]
    best = np.argsort(-similarity, kind="stable")[:k]
    return [corpus[i] for i in best]


# --- stage 3: the LLM's context


def build_prompt(query: str, passages: list[str]) -> str:
    """What you would send to the LLM."""
    context = "\n".join(f"[{n}] {text}" for n, text in enumerate(passages, start=1))
    return (
        "Answer the question from the context below; cite passages as [n].\n\n"
        f"Context:\n{context}\n\nQuestion: {query}\nAnswer:"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("query", nargs="?", default="How do plants turn sunlight into energy?")
    parser.add_argument("--base-url", default="http://localhost:5200")
    parser.add_argument("--api-key", default=None)
    args = parser.parse_args(argv)

    candidates = vector_search(args.query, CORPUS)
    print(f"vector search: {len(candidates)} candidates; its top {CONTEXT}:")
    for text in candidates[:CONTEXT]:
        print(f"  - {text}")

    # --- stage 2: rerank through the server; keep the best CONTEXT
    with RerankerClient(args.base_url, api_key=args.api_key) as client:
        ranking = client.rerank(args.query, candidates, top_k=CONTEXT)
    print(f"reranked by {ranking.model} ({ranking.backend}); top {CONTEXT}:")
    for result in ranking.results:
        print(f"  {result.score:.3f}  {result.text}")

    print("\n--- LLM prompt (the LLM call is left out) ---")
    print(build_prompt(args.query, [r.text for r in ranking.results]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
