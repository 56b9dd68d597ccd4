"""File downloads: streamed with Content-Length, ``ETag`` = the stored sha256, ``Range`` (206 /
416, via Starlette's ``FileResponse``) and ``If-None-Match`` (304)."""

from __future__ import annotations

from pathlib import Path

from fastapi import Request, Response
from fastapi.responses import FileResponse

from service.errors import NotFound


FILE_RESPONSES = {
    200: {"content": {"application/octet-stream": {}}, "description": "the file"},
    206: {"description": "the requested byte range"},
    304: {"description": "unchanged (If-None-Match matched the ETag)"},
    416: {"description": "range not satisfiable"},
}


def etag_matches(if_none_match: str, etag: str) -> bool:
    """RFC 9110 weak comparison of an If-None-Match list against our strong ETag."""
    if if_none_match.strip() == "*":
        return True
    return any(tag.strip().removeprefix("W/") == etag for tag in if_none_match.split(","))


def file_response(request: Request, path: str | Path, *, sha256: str, filename: str) -> Response:
    path = Path(path)
    if not path.is_file():
        raise NotFound("file", filename)
    etag = f'"{sha256}"'
    headers = {"etag": etag, "cache-control": "private, no-cache"}
    if_none_match = request.headers.get("if-none-match")
    if if_none_match and etag_matches(if_none_match, etag):
        return Response(status_code=304, headers=headers)
    return FileResponse(path, filename=Path(filename).name, media_type="application/octet-stream", headers=headers)
