"""The playground page in a real headless Chromium against a live server with generated models:
it runs the built-in examples and shows exactly what the API answered."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from reranker_server.app import create_app
from reranker_server.settings import Settings

from .browser import browser, page  # noqa: F401
from .conftest import running
from .keyword_server import keyword_app

KEY = "s3cret-key"


def test_home_links_to_the_playground_and_the_page_is_self_contained() -> None:
    with running(keyword_app()) as url:
        home = httpx.get(f"{url}/")
        html = httpx.get(f"{url}/playground")
    assert home.status_code == html.status_code == 200
    assert 'href="playground"' in home.text and 'href="docs"' in home.text
    assert html.headers["content-type"].startswith("text/html")
    # nothing from elsewhere: no absolute URL in a src, href or fetch
    assert not re.search(r"""(src|href)=["']?(https?:)?//|fetch\(["']https?:""", html.text)


def run_and_capture(pg: Any, click: Callable[[], None]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Trigger a rerank on the page; the request body it sent and the answer it got."""
    with pg.expect_response(lambda r: r.url.endswith("/rerank")) as info:
        click()
    response = info.value
    answer = response.json()
    pg.wait_for_function(
        "n => document.querySelectorAll('#results tbody tr').length === n",
        arg=len(answer.get("results", [])),
    )
    return json.loads(response.request.post_data), answer


def cells(pg: Any, table: str, column: str) -> list[str]:
    return [t.strip() for t in pg.locator(f"#{table} tbody td.{column}").all_inner_texts()]


def check_page_shows(pg: Any, url: str, sent: dict[str, Any], answer: dict[str, Any]) -> None:
    """Every figure on the page is the API's: the answer the page got, and (for order and stage-1
    ranks) the same request sent again directly."""
    results = answer["results"]
    indices = [
        int(i)
        for i in pg.locator("#results tbody tr").evaluate_all(
            "rows => rows.map(r => r.dataset.index)"
        )
    ]
    assert indices == [r["index"] for r in results]
    assert cells(pg, "results", "score") == [f"{r['score']:.4f}" for r in results]
    assert cells(pg, "results", "text") == [r["text"] for r in results]
    assert cells(pg, "results", "rank") == [str(i) for i in range(1, len(results) + 1)]

    headers = {"Authorization": f"Bearer {KEY}"}
    direct = httpx.post(f"{url}/rerank", json=sent, headers=headers).json()
    assert [r["index"] for r in direct["results"]] == indices

    if all("stage1_rank" in r for r in results):
        ranks = [r["stage1_rank"] for r in results]
        assert cells(pg, "results", "stage1-rank") == [str(r) for r in ranks]
        assert [r["stage1_rank"] for r in direct["results"]] == ranks
        moved = [rank - position for position, rank in enumerate(ranks, start=1)]
        shown = ["=" if m == 0 else f"▲ {m}" if m > 0 else f"▼ {-m}" for m in moved]
        assert cells(pg, "results", "moved") == shown
        assert cells(pg, "results", "stage1-score") == [f"{r['stage1_score']:.4f}" for r in results]
        assert pg.locator("#no-stages").is_hidden()
    else:  # a server before issue 13's return_stages: the page says so
        assert set(cells(pg, "results", "stage1-rank")) == {"—"}
        assert pg.locator("#no-stages").is_visible()

    stages = answer["stages"]
    assert cells(pg, "stages", "name") == [s["name"] for s in stages]
    assert cells(pg, "stages", "device") == [s["device"] for s in stages]
    assert cells(pg, "stages", "documents") == [str(s["documents"]) for s in stages]
    times = [float(t.removesuffix(" ms")) for t in cells(pg, "stages", "seconds")]
    assert times == pytest.approx([s["seconds"] * 1000 for s in stages], abs=0.006)
    assert pg.locator("#backend").inner_text() == answer["backend"]
    assert pg.locator("#fallback").inner_text() == (answer["fallback"] or "none")

    assert json.loads(pg.locator("#request-json").inner_text()) == sent
    assert json.loads(pg.locator("#response-json").text_content()) == answer
    curl = pg.locator("#curl").inner_text()
    assert curl.startswith(f"curl -s {url}/rerank")
    assert f"-d '{json.dumps(sent, separators=(',', ':'))}'" in curl
    if shutil.which("curl"):  # the copied command works as it is
        env = {**os.environ, "RERANKER_API_KEY": KEY}
        ran = subprocess.run(["bash", "-c", curl], env=env, capture_output=True, timeout=60)
        assert [r["index"] for r in json.loads(ran.stdout)["results"]] == indices


def test_the_built_in_example_shows_the_apis_answer(
    page: Any,  # noqa: F811
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(stage2_on_cpu=True)
    with running(create_app(settings)) as url:
        outside: list[str] = []
        page.on("request", lambda r: None if r.url.startswith(url) else outside.append(r.url))
        page.goto(f"{url}/")
        page.get_by_role("link", name="/playground").click()
        page.wait_for_url(f"{url}/playground")
        assert page.locator("#query").input_value() == "What is the capital of France?"
        sent, answer = run_and_capture(page, page.get_by_role("button", name="Rerank").click)
        assert sent["top_k"] == 2 and sent["return_stages"] is True and len(sent["documents"]) == 3
        check_page_shows(page, url, sent, answer)
        assert [s["device"] for s in answer["stages"]] == ["cpu", "cpu"]  # both stages ran
        assert outside == []  # no CDN, no font, nothing but this server


def test_with_an_api_key_and_the_keyboard(
    page: Any,  # noqa: F811
    make_settings: Callable[..., Settings],
) -> None:
    with running(create_app(make_settings(stage2_on_cpu=True, api_key=KEY))) as url:
        page.goto(f"{url}/playground")
        page.select_option("#example", "rag")
        assert page.locator("#candidates").input_value() == "5"

        page.get_by_role("button", name="Rerank").click()
        alert = page.get_by_role("alert")
        alert.wait_for()
        assert alert.inner_text().startswith("401 unauthorized: ")
        assert page.evaluate("document.activeElement.id") == "api_key"  # where the fix goes

        page.locator("#api_key").fill(KEY)
        page.locator("#query").focus()
        with page.expect_request(lambda r: r.url.endswith("/rerank")) as request:
            sent, answer = run_and_capture(page, lambda: page.keyboard.press("Control+Enter"))
        assert request.value.headers["authorization"] == f"Bearer {KEY}"
        assert alert.is_hidden()
        assert sent["top_k"] == 3 and len(sent["documents"]) == 8
        check_page_shows(page, url, sent, answer)
        if "return_stages" in httpx.get(f"{url}/openapi.json").text:  # issue 13's fields
            assert [s["documents"] for s in answer["stages"]] == [8, 5]
        curl = page.locator("#curl").inner_text()
        assert '-H "Authorization: Bearer $RERANKER_API_KEY"' in curl
        assert KEY not in page.locator("body").inner_text()  # the key is never shown


def test_an_example_runs_when_picked_and_an_error_clears_the_previous_answer(
    page: Any,  # noqa: F811
    make_settings: Callable[..., Settings],
) -> None:
    """docs/tuning.md: picking a built-in example runs it at once; after a 422 only the error
    shows, not the error above the previous answer's ranking."""
    with running(create_app(make_settings(stage2_on_cpu=True))) as url:
        page.goto(f"{url}/playground")
        sent, answer = run_and_capture(page, lambda: page.select_option("#example", "rag"))
        assert sent["top_k"] == 3 and len(sent["documents"]) == 8  # ran without a click
        check_page_shows(page, url, sent, answer)

        page.locator("#top_k").fill("0")
        with page.expect_response(lambda r: r.url.endswith("/rerank")) as info:
            page.locator("#query").focus()
            page.keyboard.press("Control+Enter")  # the form's own min=1 check is skipped
        assert info.value.status == 422
        alert = page.get_by_role("alert")
        alert.wait_for()
        assert alert.inner_text().startswith("422 ")
        assert page.locator("#results tbody tr").count() == 0
        assert page.locator("#answer").is_hidden()
        assert page.locator("#response-json").text_content() == ""


def test_the_favicon_is_served() -> None:
    with running(keyword_app()) as url:
        icon = httpx.get(f"{url}/favicon.ico")
        page_html = httpx.get(f"{url}/playground").text
    assert icon.status_code == 200 and icon.headers["content-type"] == "image/x-icon"
    assert icon.content[:4] == b"\x00\x00\x01\x00"  # an ICO file's header
    assert '<link rel="icon" href="favicon.ico">' in page_html
