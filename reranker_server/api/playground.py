"""`GET /playground`: a page to try the reranker in a browser, and `GET /`, which links to it.

The page is one static file (reranker_server/static/playground.html: HTML, CSS and a little plain
JavaScript; nothing loaded from elsewhere) that calls the public API like any client: `POST
/rerank` with `return_stages`, and `GET /v1/models` for model names when the server lists them.
It holds no secret, so it is served without the API key; the key typed into it goes with each
request it sends. `GET /favicon.ico` (static/favicon.ico) is the icon browsers ask for.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from .. import __version__

router = APIRouter(include_in_schema=False)


@cache
def playground_html() -> str:
    return resources.files("reranker_server").joinpath("static/playground.html").read_text("utf-8")


@cache
def favicon_bytes() -> bytes:
    return resources.files("reranker_server").joinpath("static/favicon.ico").read_bytes()


@router.get("/favicon.ico")
async def favicon() -> Response:
    return Response(
        favicon_bytes(),
        media_type="image/x-icon",
        headers={"Cache-Control": "public, max-age=86400"},
    )


@router.get("/playground", response_class=HTMLResponse)
async def playground() -> HTMLResponse:
    return HTMLResponse(playground_html())


@router.get("/", response_class=HTMLResponse)
async def home(request: Request) -> HTMLResponse:
    links = [
        ("playground", "try a query in the browser: the ranking, stage by stage"),
        ("docs", "the API (OpenAPI)"),
        ("health", "status, models and GPU"),
        ("metrics", "Prometheus metrics"),
    ]
    items = "".join(f'<li><a href="{path}">/{path}</a>: {what}</li>' for path, what in links)
    return HTMLResponse(
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        "<title>reranker-server</title></head>"
        '<body style="font:16px/1.5 system-ui,sans-serif;max-width:40rem;margin:2rem auto;'
        'padding:0 1rem">'
        f"<h1>reranker-server {__version__}</h1>"
        "<p>Two-stage reranking for RAG pipelines: <code>POST /rerank</code>.</p>"
        f"<ul>{items}</ul></body></html>"
    )
