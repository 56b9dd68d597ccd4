"""Request body size limits, enforced while the body streams in (before anything is spooled).

Multipart uploads (``POST /v1/datasets`` and ``POST /v1/models``) get a large limit, everything
else (JSON) a small one. A declared Content-Length over the limit is refused before reading; a chunked body is counted
and refused once it passes the limit. Per-file limits are checked again while storing.

JSON bodies are parsed by ``StrictJSONRoute`` (the ``route_class`` of every router): strict JSON only,
so ``NaN``, ``Infinity``, out-of-range numbers and stack-exhausting nesting are a 422, never a
500 (``gid_core.fileio.loads_finite``).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import HTTPException, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gid_core.fileio import loads_finite

# Largest integer query parameter (offsets, steps): what a 64-bit database column can compare with.
MAX_QUERY_INT = 2**63 - 1


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body larger than the limit of {limit} bytes")


class BodySizeLimitMiddleware:
    """Limits from the app's settings (``app.state.settings``), read per request."""

    def __init__(self, app: ASGIApp, *, upload_paths: frozenset[str], put_upload_prefixes: tuple[str, ...] = ()) -> None:
        self.app = app
        self.upload_paths = upload_paths
        self.put_upload_prefixes = put_upload_prefixes  # raw-body file uploads (PUT /v1/weights/{name})

    def limit_for(self, scope: Scope) -> int:
        settings = scope["app"].state.settings
        multipart = any(k == b"content-type" and v.startswith(b"multipart/form-data") for k, v in scope["headers"])
        if multipart and scope["method"] == "POST" and scope["path"].rstrip("/") in self.upload_paths:
            # Both files of a dataset upload plus form overhead; each file's own limit is checked on write.
            return settings.max_upload_bytes + settings.max_annotation_bytes + 1024 * 1024
        if scope["method"] == "PUT" and scope["path"].startswith(self.put_upload_prefixes):
            return settings.max_upload_bytes
        return settings.max_json_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            error = BodyTooLarge(limit)
            await JSONResponse({"detail": error.detail}, status_code=413)(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, limited_receive, send)


def _content_length(scope: Scope) -> int | None:
    for key, value in scope["headers"]:
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class StrictJSONRequest(Request):
    """A request whose ``json()`` refuses what ``loads_finite`` refuses (a ``JSONDecodeError``, which
    FastAPI answers with a 422 ``json_invalid``)."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = loads_finite(await self.body())
        return self._json


class StrictJSONRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict_handler
