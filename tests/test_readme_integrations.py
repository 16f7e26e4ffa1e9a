"""The "Framework integrations" Python snippets of docs/clients.md (linked from the README), run
as written (base URL aside) against a live server, in one fresh interpreter as a user would."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from .conftest import running
from .keyword_server import keyword_app

ROOT = Path(__file__).resolve().parents[1]
CLIENTS_DOC = ROOT / "docs" / "clients.md"
PARIS = "Paris is the capital of France."


def integration_snippets() -> list[str]:
    text = CLIENTS_DOC.read_text()
    section = text.split("## Framework integrations", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)


def test_every_integration_snippet_runs_and_ranks(tmp_path: Path) -> None:
    snippets = integration_snippets()
    assert len(snippets) == 3  # mem0, LangChain, LlamaIndex
    env = {**os.environ, "MEM0_TELEMETRY": "false", "MEM0_DIR": str(tmp_path)}
    with running(keyword_app()) as url:
        program = "".join(
            f"print('=== snippet {i}')\n{code.replace('http://localhost:5200', url)}\n"
            for i, code in enumerate(snippets)
        )
        done = subprocess.run(
            [sys.executable, "-c", program],
            capture_output=True,
            text=True,
            timeout=180,
            cwd=ROOT,
            env=env,
        )
    assert done.returncode == 0, done.stderr[-3000:]
    outputs = done.stdout.split("=== snippet ")[1:]
    assert len(outputs) == len(snippets)
    for output in outputs:
        lines = output.strip().splitlines()[1:]
        assert len(lines) == 1, output
        text, score = lines[0].rsplit(" ", 1)
        assert text == PARIS, output  # the best document, first
        assert 0.0 < float(score) <= 1.0, output
