"""The web dashboard: a static single-page app (plain HTML, ES modules, CSS; no build step, no
external network) served by the API at ``/``, with its files under ``/dashboard/``.

The page talks to the ``/v1`` REST API with the bearer token the user signs in with (kept in the
browser's ``sessionStorage``, never in a URL). Its Content-Security-Policy allows nothing but this
origin (and ``data:``/``blob:`` images, the GI view's pictures and downloads).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "static"
CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
HEADERS = {"Content-Security-Policy": CSP, "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}


class _Static(StaticFiles):
    async def get_response(self, path, scope):
        response = await super().get_response(path, scope)
        response.headers.update(HEADERS)
        return response


def mount_dashboard(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    def dashboard_index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers=HEADERS)

    app.mount("/dashboard", _Static(directory=STATIC_DIR), name="dashboard")
