"""The base install has no torch, transformers or sentence-transformers: what it runs works
without them, and what needs them stops with one line naming the extra.

Each test runs a fresh interpreter that cannot see those packages: `python -S` (no site
processing) over a copy of site-packages made of links to everything else, so they are as
absent as in a venv that never installed them (`importlib.util.find_spec` returns None too).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from reranker_server.model_generator import TestModelPaths
from reranker_server.runners.flashrank import FlashRankRunner
from reranker_server.runners.onnx_cross_encoder import OnnxCrossEncoderRunner

from .conftest import free_port
from .test_startup import env_for, wait_healthy

ROOT = Path(__file__).resolve().parent.parent
TORCH_STACK = ("torch", "functorch", "torchgen", "transformers", "sentence_transformers")
EXTRA = "pip install 'reranker-server[torch]'"


@pytest.fixture(scope="module")
def torch_free_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """site-packages without the torch stack (links to everything else)."""
    site = Path(sysconfig.get_paths()["purelib"])
    target = tmp_path_factory.mktemp("site-without-torch")
    for entry in site.iterdir():
        top = entry.name.split("-")[0].lower()
        if top in TORCH_STACK or entry.suffix == ".pth":
            continue
        (target / entry.name).symlink_to(entry)
    return target


def torch_free(args: list[str]) -> list[str]:
    """`python -S <args>`: no site-packages but what `torch_free_env` puts on the path."""
    return [sys.executable, "-S", *args]


def torch_free_env(site: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """The project and the torch-free site on the path."""
    env = dict(base if base is not None else os.environ)
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{site}"
    env["HF_HUB_OFFLINE"] = "1"
    return env


@contextmanager
def torch_free_server(
    env: dict[str, str], stderr: list[str] | None = None
) -> Iterator[tuple[str, dict[str, Any]]]:
    """The seed's command (`uvicorn reranker_server:app`) under `python -S` on the torch-free
    site; yields its URL and its /health once ready. Its log ends up in `stderr`."""
    port = free_port()
    process = subprocess.Popen(
        torch_free(
            ["-m", "uvicorn", "reranker_server:app", "--host", "127.0.0.1", "--port", str(port)],
        ),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        yield url, wait_healthy(url, process)
    finally:
        process.terminate()
        _, log = process.communicate(timeout=30)
        if stderr is not None:
            stderr.append(log)


PROGRAM = """
import importlib.util, json, sys
from pathlib import Path
from reranker_server.runners.flashrank import FlashRankRunner
from reranker_server.runners.onnx_cross_encoder import OnnxCrossEncoderRunner

stage1_dir, stage1_file, stage2_dir, query = sys.argv[1:5]
docs = json.loads(sys.argv[5])
stage1 = FlashRankRunner(Path(stage1_dir), Path(stage1_file))
stage2 = OnnxCrossEncoderRunner(stage2_dir)
first = stage1.score(query, docs)
kept = sorted(range(len(docs)), key=lambda i: -first[i])[:3]
second = stage2.score(query, [docs[i] for i in kept])
print(json.dumps({
    "stage1": first, "kept": kept, "stage2": second,
    "torch_visible": [m for m in ("torch", "transformers", "sentence_transformers")
                      if importlib.util.find_spec(m) is not None or m in sys.modules],
}))
"""
DOCS = [
    "paris is the capital of france",
    "berlin is the capital of germany",
    "the eiffel tower is in paris",
    "a dog and a cat",
    "music and film",
]


def test_flashrank_then_onnx_runs_without_torch(
    torch_free_site: Path, tiny_models: TestModelPaths, model_matrix: dict[str, Path]
) -> None:
    stage1_file = next(tiny_models.stage1.glob("*.onnx"))
    export = model_matrix["onnx/bert"]
    done = subprocess.run(
        [
            *torch_free(["-c", PROGRAM]),
            str(tiny_models.stage1),
            str(stage1_file),
            str(export),
            "capital of france",
            json.dumps(DOCS),
        ],
        env=torch_free_env(torch_free_site),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["torch_visible"] == []
    # the same scores as in this (torch-equipped) process
    assert got["stage1"] == pytest.approx(
        FlashRankRunner(tiny_models.stage1, stage1_file).score("capital of france", DOCS), abs=1e-6
    )
    kept = [DOCS[i] for i in got["kept"]]
    assert got["stage2"] == pytest.approx(
        OnnxCrossEncoderRunner(export).score("capital of france", kept), abs=1e-6
    )


def test_the_default_cpu_server_runs_without_torch(
    torch_free_site: Path, tiny_models: TestModelPaths, tmp_path: Path
) -> None:
    """Default settings (device auto, stage 2 off without a GPU): no torch needed at all."""
    env = torch_free_env(torch_free_site, env_for(tiny_models, tmp_path, RERANKER_DEVICE="auto"))
    log: list[str] = []
    with torch_free_server(env, log) as (url, health):
        assert health["status"] == "ok"
        body = httpx.post(
            f"{url}/rerank",
            json={"query": "capital of france", "documents": DOCS, "top_k": 2},
            timeout=30,
        ).json()
        scores = FlashRankRunner(tiny_models.stage1, next(tiny_models.stage1.glob("*.onnx"))).score(
            "capital of france", DOCS
        )
        assert body["backend"] == "cpu"
        assert [r["index"] for r in body["results"]] == sorted(
            range(len(DOCS)), key=lambda i: -scores[i]
        )[:2]
        assert [r["score"] for r in body["results"]] == pytest.approx(
            sorted(scores, reverse=True)[:2], abs=1e-6
        )
    assert log[0].count("torch is not installed") == 1, log[0][-3000:]  # said once


def test_a_flashrank_to_onnx_cascade_is_served_without_torch(
    torch_free_site: Path,
    tiny_models: TestModelPaths,
    model_matrix: dict[str, Path],
    tmp_path: Path,
) -> None:
    """The torch-free install serving the whole cascade: FlashRank, then the ONNX cross-encoder
    on the CPU (RERANKER_STAGE2_KIND=onnx-cross-encoder), over HTTP, with the answers the
    runners give in this process."""
    export = model_matrix["onnx/bert"]
    env = torch_free_env(
        torch_free_site,
        env_for(
            tiny_models,
            tmp_path,
            RERANKER_DEVICE="auto",
            RERANKER_STAGE2_MODEL=str(export),
            RERANKER_STAGE2_KIND="onnx-cross-encoder",
            RERANKER_STAGE2_ON_CPU="true",
            RERANKER_CANDIDATES="3",
        ),
    )
    with torch_free_server(env) as (url, _):
        body = httpx.post(
            f"{url}/rerank",
            json={"query": "capital of france", "documents": DOCS, "top_k": 3},
            timeout=30,
        ).json()
    first = FlashRankRunner(tiny_models.stage1, next(tiny_models.stage1.glob("*.onnx"))).score(
        "capital of france", DOCS
    )
    kept = sorted(range(len(DOCS)), key=lambda i: -first[i])[:3]
    second = OnnxCrossEncoderRunner(export).score("capital of france", [DOCS[i] for i in kept])
    order = [kept[j] for j in sorted(range(3), key=lambda j: -second[j])]
    assert [s["device"] for s in body["stages"]] == ["cpu", "cpu"]
    assert body["stages"][1]["documents"] == 3
    assert [r["index"] for r in body["results"]] == order
    assert [r["score"] for r in body["results"]] == pytest.approx(
        sorted(second, reverse=True), abs=1e-6
    )


@pytest.mark.parametrize(
    ("setting", "value", "what"),
    [
        ("RERANKER_STAGE2_ON_CPU", "true", 'kind "cross-encoder"'),
        ("RERANKER_DEVICE", "cuda", "RERANKER_DEVICE=cuda"),
    ],
)
def test_what_needs_torch_stops_startup_with_one_line(
    torch_free_site: Path,
    tiny_models: TestModelPaths,
    tmp_path: Path,
    setting: str,
    value: str,
    what: str,
) -> None:
    env = torch_free_env(torch_free_site, env_for(tiny_models, tmp_path, **{setting: value}))
    done = subprocess.run(
        torch_free(["-m", "uvicorn", "reranker_server:app", "--port", str(free_port())]),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "Traceback" not in done.stderr and "ModuleNotFoundError" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if EXTRA in line and "ERROR" in line]
    assert len(lines) == 1, done.stderr[-3000:]
    # uvicorn's own lines are JSON too (the default log format): read the message
    message = json.loads(lines[0])["message"] if lines[0].startswith("{") else lines[0]
    assert what in message and "onnx-cross-encoder" in message


def test_make_test_models_without_torch_names_the_extra(
    torch_free_site: Path, tmp_path: Path
) -> None:
    done = subprocess.run(
        torch_free(["-m", "reranker_server", "make-test-models", str(tmp_path)]),
        env=torch_free_env(torch_free_site),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "torch" in done.stderr and "reranker-server[torch]" in done.stderr
