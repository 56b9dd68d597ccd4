"""``/docs`` (Swagger UI) and ``/redoc`` with every asset served by the API itself.

FastAPI's own pages load Swagger UI, ReDoc, a font and the favicon from public CDNs, so they are
blank on an air-gapped cluster. The ``fastapi-offline`` package bundles the same files (Swagger UI
5, which renders OpenAPI 3.1, and ReDoc 2); they are mounted under ``DOCS_ASSETS`` and the pages
point there.
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

DOCS_ASSETS = "/docs-assets"
ASSETS_DIR = Path(fastapi_offline.__file__).parent / "static"


def add_local_docs(app: FastAPI) -> None:
    """``/docs``, its OAuth2 redirect page and ``/redoc`` (the app is built with ``docs_url=None``
    and ``redoc_url=None``), and the assets they use."""
    title, openapi_url = app.title, app.openapi_url
    redirect_url = app.swagger_ui_oauth2_redirect_url
    favicon = f"{DOCS_ASSETS}/favicon.png"
    app.mount(DOCS_ASSETS, StaticFiles(directory=ASSETS_DIR), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url, title=f"{title} - Swagger UI", oauth2_redirect_url=redirect_url,
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js", swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=favicon,
        )

    @app.get(redirect_url, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=openapi_url, title=f"{title} - ReDoc", redoc_js_url=f"{DOCS_ASSETS}/redoc.standalone.js",
            redoc_favicon_url=favicon, with_google_fonts=False,
        )
