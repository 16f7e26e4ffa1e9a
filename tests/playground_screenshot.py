"""Take docs/playground.png: the playground after the built-in RAG example, on a live server with
generated tiny models (random weights, so the scores mean nothing).

    python -m tests.playground_screenshot docs/playground.png
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path

from playwright.sync_api import sync_playwright

from reranker_server.app import create_app
from reranker_server.model_generator import write_test_models
from reranker_server.settings import Settings

from .browser import CHROMIUM
from .conftest import running


def main(target: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            models = write_test_models(Path(tmp) / "models")
        settings = Settings(
            stage1_model=str(models.stage1),
            stage2_model=str(models.stage2),
            model_cache_dir=Path(tmp) / "cache",
            offline=True,
            device="cpu",
            stage2_on_cpu=True,
            cpu_threads=1,
        )
        with running(create_app(settings)) as url, sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"]
            )
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.emulate_media(color_scheme="light")
            page.goto(f"{url}/playground")
            page.select_option("#example", "rag")
            page.get_by_role("button", name="Rerank").click()
            page.wait_for_selector("#results tbody tr")
            page.evaluate("document.activeElement.blur()")
            page.screenshot(path=str(target), full_page=True)
            browser.close()
    print(f"wrote {target}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/playground.png"))
