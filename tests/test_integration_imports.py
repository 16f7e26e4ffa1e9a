"""The integrations are opt-in: importing the package loads no framework, and each integration
loads only its own framework (no torch, no server stack). Checked in one fresh interpreter that
imports them one after another and notes what each import added."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

WATCHED = [
    *("torch", "sentence_transformers", "transformers", "onnxruntime", "flashrank", "fastapi"),
    *("mem0", "langchain_core", "llama_index.core"),
]
EXPECTED = {
    "reranker_server.integrations": [],
    "reranker_server.integrations.mem0": ["mem0"],
    "reranker_server.integrations.langchain": ["langchain_core"],
    "reranker_server.integrations.llamaindex": ["llama_index.core"],
}

PROGRAM = """
import importlib, json, sys
watched, modules = json.loads(sys.argv[1]), json.loads(sys.argv[2])
added = {}
for module in modules:
    before = {m for m in watched if m in sys.modules}
    importlib.import_module(module)
    added[module] = sorted(m for m in watched if m in sys.modules and m not in before)
print(json.dumps(added))
"""


def test_each_integration_loads_only_its_framework(tmp_path: Path) -> None:
    env = {**os.environ, "MEM0_TELEMETRY": "false", "MEM0_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM, json.dumps(WATCHED), json.dumps(list(EXPECTED))],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == EXPECTED
