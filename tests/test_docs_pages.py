"""/docs and /redoc work with no internet: their assets come from this server, and a real headless
Chromium (Debian's `chromium`, driven by Playwright) renders the operations while every request
it makes goes to the loopback server."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from fastapi.testclient import TestClient

from reranker_server.api.docs_pages import ASSET_TYPES, ASSETS_PATH

from .conftest import running
from .keyword_server import keyword_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
SCREENSHOTS = os.environ.get("DOCS_SCREENSHOTS")  # a directory: keep the screenshots there


def test_pages_point_only_at_this_server() -> None:
    with running(keyword_app()) as url:
        for page in ("/docs", "/redoc"):
            html = httpx.get(url + page, timeout=10).text
            assert "http://" not in html and "https://" not in html, html
            assert f'"{ASSETS_PATH}/' in html
        for name, media_type in ASSET_TYPES.items():
            asset = httpx.get(f"{url}{ASSETS_PATH}/{name}", timeout=10)
            assert asset.status_code == 200, name
            assert asset.headers["content-type"] == media_type
            assert len(asset.content) > 1000
        assert httpx.get(f"{url}{ASSETS_PATH}/..%2Fcore.py", timeout=10).status_code == 404
        assert httpx.get(f"{url}{ASSETS_PATH}/secret.js", timeout=10).status_code == 404


def test_docs_pages_follow_root_path() -> None:
    """Behind a proxy that strips /reranker, the pages ask for /reranker/... URLs."""
    with TestClient(keyword_app(), root_path="/reranker") as client:
        html = client.get("/docs").text
        assert "/reranker/openapi.json" in html
        assert f"/reranker{ASSETS_PATH}/swagger-ui-bundle.js" in html


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (CI installs it)")
def test_docs_and_redoc_render_in_headless_chromium(tmp_path: Path) -> None:
    from playwright.sync_api import Route, sync_playwright

    outside: list[str] = []
    errors: list[str] = []

    def only_loopback(route: Route) -> None:
        host = urlsplit(route.request.url).hostname or ""
        if host in LOOPBACK or route.request.url.startswith(("data:", "blob:")):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    shots = Path(SCREENSHOTS) if SCREENSHOTS else tmp_path
    with running(keyword_app()) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 1400})
            context.route("**/*", only_loopback)
            page = context.new_page()
            page.on("pageerror", lambda exc: errors.append(str(exc)))

            page.goto(url + "/docs", wait_until="networkidle")
            operation = page.locator('.opblock-post .opblock-summary-path[data-path="/rerank"]')
            operation.wait_for(state="visible", timeout=30_000)
            summaries = page.locator(".opblock-summary").all_inner_texts()
            flat = [" ".join(text.split()) for text in summaries]
            assert any(text.startswith("POST /rerank ") for text in flat), flat
            assert any(text.startswith("POST /v1/rerank") for text in flat), flat
            assert any(text.startswith("GET /health") for text in flat), flat
            page.screenshot(path=str(shots / "docs.png"))

            page.goto(url + "/redoc", wait_until="networkidle")
            page.locator(".api-content").wait_for(state="visible", timeout=30_000)
            text = page.locator("body").inner_text()
            assert "Rerank (native; also TEI and Cohere-like bodies)" in text
            assert "/v1/rerank" in text and "/health/ready" in text
            page.screenshot(path=str(shots / "redoc.png"))
        finally:
            browser.close()
    assert outside == [], f"requests left the server: {outside}"
    assert errors == [], errors
