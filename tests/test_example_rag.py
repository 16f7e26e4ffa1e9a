"""examples/rag_pipeline.py, run as a user runs it, against uvicorn on 127.0.0.1: the LLM prompt it
prints must hold the server's top 5 of the vector search's top 20, in the server's order."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from reranker_server.client import RerankerClient

from .conftest import running
from .keyword_server import keyword_app

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "rag_pipeline.py"
QUERY = "How do plants turn sunlight into energy?"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("rag_pipeline", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_prompt_holds_the_servers_top_5_of_the_vector_top_20() -> None:
    example = load_example()
    candidates = example.vector_search(QUERY, example.CORPUS)
    assert len(candidates) == 20

    with running(keyword_app()) as url:
        done = subprocess.run(
            [sys.executable, str(EXAMPLE), "--base-url", url, QUERY],
            capture_output=True,
            text=True,
            timeout=120,
        )
        with RerankerClient(url) as client:
            expected = [r.text for r in client.rerank(QUERY, candidates, top_k=5).results]

    assert done.returncode == 0, done.stderr[-3000:]
    prompt = done.stdout.split("--- LLM prompt", 1)[1]
    passages = re.findall(r"^\[(\d)\] (.+)$", prompt, flags=re.MULTILINE)
    assert [n for n, _ in passages] == ["1", "2", "3", "4", "5"]
    assert [text for _, text in passages] == expected
    assert expected != candidates[:5]  # the rerank step changed what the LLM sees
    assert prompt.rstrip().endswith(f"Question: {QUERY}\nAnswer:")
