"""Errors the domain code raises and the API turns into JSON responses.

``FieldErrors`` carries FastAPI's own validation-error shape, so every 4xx that is about the request
reads the same way whether pydantic or a service rule found it::

    {"detail": [{"loc": ["body", "teacher", "model_id"], "msg": "model '...' not found", "type": "not_found"}]}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def field_error(loc: Sequence[str | int], msg: str, type_: str = "value_error") -> dict[str, Any]:
    return {"loc": list(loc), "msg": msg, "type": type_}


class FieldErrors(Exception):
    """One or more problems with named request fields (HTTP ``status_code``, 422 by default)."""

    def __init__(self, errors: list[dict[str, Any]], status_code: int = 422) -> None:
        super().__init__("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors))
        self.errors = errors
        self.status_code = status_code

    @classmethod
    def one(cls, loc: Sequence[str | int], msg: str, type_: str = "value_error", status_code: int = 422) -> "FieldErrors":
        return cls([field_error(loc, msg, type_)], status_code=status_code)


class NotFound(Exception):
    """The resource does not exist or belongs to another owner (the API answers 404 either way)."""

    def __init__(self, kind: str, resource_id: str) -> None:
        super().__init__(f"{kind} '{resource_id}' not found")
        self.kind, self.resource_id = kind, resource_id


class Conflict(Exception):
    """The request contradicts the resource's current state (HTTP 409)."""
