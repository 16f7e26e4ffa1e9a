"""`/docs` (Swagger UI) and `/redoc` (ReDoc), with their JavaScript and CSS served by this server.

FastAPI's own pages load those files from a CDN, so on a host without internet they stay blank.
Here they come from the `fastapi-offline` package's `static/` folder (only its files are used),
under `/docs/assets/`; no request leaves the server. Behind a proxy the pages follow `root_path`.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from fastapi import FastAPI, HTTPException, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, Response

ASSETS_PATH = "/docs/assets"
ASSET_TYPES = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "redoc.standalone.js": "text/javascript; charset=utf-8",
    "favicon.png": "image/png",
}
# ReDoc's sidebar shows a logo from its CDN: the bundle gets an empty inline image instead.
REWRITES = {
    "redoc.standalone.js": [
        (
            b"https://cdn.redoc.ly/redoc/logo-mini.svg",
            b"data:image/svg+xml,%3Csvg xmlns='http://www.w3.org/2000/svg'/%3E",
        )
    ]
}
# validatorUrl None: Swagger UI would otherwise ask an online validator about the schema.
SWAGGER_PARAMETERS = {"validatorUrl": None}


@cache
def asset_bytes(name: str) -> bytes:
    """One bundled file, read once (and rewritten to fetch nothing from elsewhere)."""
    content = (files("fastapi_offline") / "static" / name).read_bytes()
    for old, new in REWRITES.get(name, []):
        content = content.replace(old, new)
    return content


def install_docs(app: FastAPI) -> None:
    """Add GET /docs, /redoc and their assets to an app built with docs_url=redoc_url=None."""
    openapi_url = app.openapi_url or "/openapi.json"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - API docs",
            swagger_js_url=f"{root}{ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_PATH}/favicon.png",
            oauth2_redirect_url=None,
            swagger_ui_parameters=SWAGGER_PARAMETERS,
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_redoc_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - API reference",
            redoc_js_url=f"{root}{ASSETS_PATH}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{ASSETS_PATH}/favicon.png",
            with_google_fonts=False,
        )

    @app.get(ASSETS_PATH + "/{name}", include_in_schema=False)
    async def docs_asset(name: str) -> Response:
        media_type = ASSET_TYPES.get(name)
        if media_type is None:
            raise HTTPException(404, f"no docs asset {name!r}")
        return Response(
            asset_bytes(name),
            media_type=media_type,
            headers={"Cache-Control": "public, max-age=86400"},
        )
