"""The README's top, as a newcomer follows it: the demo's commands start a server, and the first
request gets an answer shaped exactly like the one the README shows."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from reranker_server.model_generator import TestModelPaths

from .conftest import free_port
from .test_startup import wait_healthy

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def section(heading: str) -> str:
    start = README.index(f"\n{heading}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else len(README)]


def indented_blocks(heading: str) -> list[str]:
    """The section's indented blocks, each as one text (lines joined with newlines)."""
    blocks = re.findall(r"(?:^    .*\n?)+", section(heading), flags=re.MULTILINE)
    return [re.sub(r"(?m)^    ", "", block).rstrip("\n") for block in blocks]


def test_a_newcomer_finds_the_quick_start_demo_and_first_answer_near_the_top() -> None:
    lines = README.splitlines()
    headings = [line for line in lines if line.startswith("## ")]
    assert headings[:3] == ["## Quick start (CPU)", "## Demo without downloads", "## First request"]
    first_answer_end = lines.index("## Run the tests")
    assert first_answer_end < 80
    assert "random weights" in section("## Demo without downloads")
    for page in ("api", "clients", "settings", "deployment", "operations"):
        assert f"(docs/{page}.md)" in README and (ROOT / "docs" / f"{page}.md").is_file()


def test_the_demo_is_three_commands_and_starts_from_the_quick_start_install() -> None:
    """The demo installs what the quick start does plus the torch extra (it builds the models)."""
    (quick_start,) = indented_blocks("## Quick start (CPU)")
    (demo,) = indented_blocks("## Demo without downloads")
    install, make, serve = demo.splitlines()
    venv = "python3 -m venv .venv && . .venv/bin/activate && "
    assert quick_start == venv + "pip install -e . && reranker-server serve"
    assert install == venv + "pip install torch==2.13.0 && pip install -e '.[torch]'"
    assert make == "reranker-server make-test-models"
    assert serve.endswith(" reranker-server serve")


def test_the_first_request_gets_the_answer_the_readme_shows(
    tiny_models: TestModelPaths, tmp_path: Path
) -> None:
    """The demo's serve command, run as written in a folder where `make-test-models` wrote its
    models (copied here from the session's generated ones), then the README's curl request."""
    (demo,) = indented_blocks("## Demo without downloads")
    serve = demo.splitlines()[2]
    shutil.copytree(tiny_models.stage2.parent, tmp_path / "demo-models")
    request, shown = indented_blocks("## First request")
    shown_answer = json.loads("".join(shown.splitlines()))

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RERANKER_")}
    env.update(
        {
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            "RERANKER_HOST": "127.0.0.1",
            "RERANKER_PORT": str(port),
            "RERANKER_CPU_THREADS": "1",
            "RERANKER_MODEL_CACHE_DIR": str(tmp_path / "hf_cache"),
        }
    )
    process = subprocess.Popen(
        ["bash", "-c", serve],  # bash runs a lone command in its own place (exec)
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_healthy(f"http://127.0.0.1:{port}", process)
        argv = shlex.split(request.replace("\\\n", " "))
        assert argv[:2] == ["curl", "-s"]
        url = argv[2].replace("localhost:5200", f"127.0.0.1:{port}")
        body = json.loads(argv[argv.index("-d") + 1])
        answer = httpx.post(url, json=body, timeout=30).json()
    finally:
        process.terminate()
        process.communicate(timeout=30)

    assert answer.keys() == shown_answer.keys()
    assert len(answer["results"]) == len(shown_answer["results"]) == body["top_k"]
    assert [r.keys() for r in answer["results"]] == [r.keys() for r in shown_answer["results"]]
    for field in ("backend", "fallback", "model"):
        assert answer[field] == shown_answer[field], field
    assert [(s["name"], s["device"], s["documents"]) for s in answer["stages"]] == [
        (s["name"], s["device"], s["documents"]) for s in shown_answer["stages"]
    ]
    assert answer["usage"] == shown_answer["usage"]
    # the demo models are make-test-models' (seed 0), as in a fresh clone: the same scores
    assert [(r["index"], r["text"]) for r in answer["results"]] == [
        (r["index"], r["text"]) for r in shown_answer["results"]
    ]
    for got, shown_result in zip(answer["results"], shown_answer["results"], strict=True):
        assert got["score"] == pytest.approx(shown_result["score"], abs=1e-5)
        assert got["relevance_score"] == got["score"]
