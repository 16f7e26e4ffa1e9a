"""The "Use it from…" Python snippets of docs/clients.md (linked from the README), run as written
(base URL aside) against a live server, in one fresh interpreter as a user would run them."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from .conftest import running
from .keyword_server import keyword_app

ROOT = Path(__file__).resolve().parents[1]
CLIENTS_DOC = ROOT / "docs" / "clients.md"
PARIS = "Paris is the capital of France."


def use_it_from_snippets() -> list[str]:
    text = CLIENTS_DOC.read_text()
    section = text.split("## Use it from…", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)


def test_every_python_snippet_runs_and_ranks() -> None:
    snippets = use_it_from_snippets()
    assert len(snippets) >= 4  # client, cohere, LangChain, LlamaIndex
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
        )
    assert done.returncode == 0, done.stderr[-3000:]
    outputs = done.stdout.split("=== snippet ")[1:]
    assert len(outputs) == len(snippets)
    for output in outputs:
        lines = output.strip().splitlines()[1:]
        assert lines, output
        # Every snippet prints the best document first: index 1 or its text.
        assert lines[0].startswith("1 ") or PARIS in lines[0] or lines[0] == "[1, 0]", output
