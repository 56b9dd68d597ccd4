"""Jobs, datasets and models by id, unique name, or unique id prefix.

A reference (``ref``) is tried as, in order: the full id; the name of exactly one of the owner's
live rows; the start of exactly one id (at least ``MIN_PREFIX`` characters, the 8 that ``gid``
prints are plenty). A reference that fits several rows is ``Ambiguous`` (its ``candidates`` are
data: the API answers 409 and lists them); one that fits none is ``NotFound``. Full ids skip the
search, so the routes pay nothing extra for them.
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.errors import NotFound
from service.models import Dataset, Job, Model

MIN_PREFIX = 4
MAX_CANDIDATES = 10
_FULL_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_ID_PREFIX = re.compile(rf"^[0-9a-f-]{{{MIN_PREFIX},36}}$")  # only these characters reach LIKE

ENTITIES = {"job": Job, "dataset": Dataset, "model": Model}


class Ambiguous(Exception):
    """``ref`` names several of the owner's ``kind``s; ``candidates`` are ``{"id", "name"}``."""

    def __init__(self, kind: str, ref: str, candidates: list[dict[str, Any]], *, by: str) -> None:
        listed = ", ".join(f"{c['id']} ({c['name']})" if c["name"] else c["id"] for c in candidates)
        super().__init__(f"'{ref}' is the {by} of {len(candidates)} {kind}s: {listed}; use a longer prefix or the id")
        self.kind, self.ref, self.candidates, self.by = kind, ref, candidates, by


def resolve_id(session: Session, kind: str, *, owner_id: str, ref: str) -> str:
    """The full id that ``ref`` stands for among the owner's live ``kind``s (job, dataset, model).

    A full id is returned as is (the caller's own lookup answers 404 for a wrong one)."""
    if _FULL_ID.match(ref):
        return ref
    entity = ENTITIES[kind]
    live = [entity.owner_id == owner_id]
    if entity is not Job:
        live.append(entity.deleted_at.is_(None))
    for by, condition in _conditions(entity, ref):
        rows = session.execute(
            select(entity.id, entity.name).where(*live, condition).order_by(entity.created_at.desc())
            .limit(MAX_CANDIDATES)
        ).all()
        if len(rows) == 1:
            return rows[0].id
        if rows:
            raise Ambiguous(kind, ref, [{"id": r.id, "name": r.name} for r in rows], by=by)
    raise NotFound(kind, ref)


def _conditions(entity, ref: str):
    yield "name", entity.name == ref
    if _ID_PREFIX.match(ref):
        yield "id prefix", entity.id.startswith(ref, autoescape=True)
