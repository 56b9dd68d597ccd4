"""The error responses of the API, for the OpenAPI document (``responses=`` of routers and routes).

Every 4xx body is an ``ErrorOut``: ``{"detail": "message"}`` or, for problems with named request
fields, ``{"detail": [{"loc": [...], "msg": ..., "type": ...}]}`` (``service.errors``).
"""

from __future__ import annotations

from typing import Any

from service.schemas import ErrorOut

_DESCRIPTIONS = {
    400: "malformed multipart body",
    401: "missing, invalid or revoked bearer token",
    403: "a server path outside the allowed data roots, or inside the service's own store",
    404: "no such resource for this owner",
    409: "the request contradicts the resource's current state",
    413: "request body or uploaded file larger than the server's limit",
    422: "invalid request: the fields at fault are listed",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorOut, "description": _DESCRIPTIONS[code]} for code in codes}


# Every authenticated route: a bad token, an invalid parameter, a body over the size limit (the
# limit applies to any request that carries a body).
AUTHENTICATED = error_responses(401, 413, 422)
