"""Request dependencies: settings, store, a database session, and the authenticated owner.

``SessionDep`` closes its session when the endpoint returns (``scope="function"``), before a file
response starts streaming, so no database transaction (on SQLite: no write lock) outlives a handler.
GET and HEAD requests get a read-only session, which never takes SQLite's write lock: pollers do
not queue behind each other or behind the worker's heartbeats.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from service import crud, lookup
from service.core.config import Settings
from service.core.db import session_scope
from service.errors import NotFound
from service.storage import Storage


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_storage(request: Request) -> Storage:
    return request.app.state.storage


READ_ONLY_METHODS = frozenset({"GET", "HEAD"})


def get_session(request: Request) -> Iterator[Session]:
    state = request.app.state
    factory = state.read_session_factory if request.method in READ_ONLY_METHODS else state.session_factory
    with session_scope(factory) as session:
        yield session


SettingsDep = Annotated[Settings, Depends(get_settings)]
StorageDep = Annotated[Storage, Depends(get_storage)]
SessionDep = Annotated[Session, Depends(get_session, scope="function")]

_bearer = HTTPBearer(auto_error=False, description="API token from `gid admin create-token --owner NAME`")


@dataclass(frozen=True)
class OwnerRef:
    """The authenticated owner (a plain value: no ORM object outlives the auth transaction)."""

    id: str
    name: str


def get_current_owner(
    session: SessionDep,
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> OwnerRef:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "missing bearer token", headers={"WWW-Authenticate": "Bearer"}
        )
    owner = crud.get_owner_by_token(session, token=credentials.credentials, secret=settings.secret_key)
    ref = OwnerRef(id=owner.id, name=owner.name) if owner is not None else None
    session.commit()  # end the read transaction before the handler's (possibly slow) work
    if ref is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "invalid or revoked token",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    return ref


CurrentOwner = Annotated[OwnerRef, Depends(get_current_owner)]


# --------------------------------------------------------------------------------------------
# Path parameters that name a job, dataset or model: the full id, a unique name or a unique id
# prefix (``service.lookup``). The route receives the full id.


def _full_id(session: Session, owner: OwnerRef, kind: str, ref: str) -> str:
    try:
        return lookup.resolve_id(session, kind, owner_id=owner.id, ref=ref)
    except NotFound:
        # the route's own lookup answers 404, after the request's validation errors (a raise
        # here would come before them)
        return ref
    finally:
        session.commit()  # end the read transaction, as get_current_owner does


def _ref_doc(kind: str) -> str:
    return f"the {kind}'s id, its unique name, or a unique prefix of its id (at least {lookup.MIN_PREFIX} characters)"


def job_ref(job_id: Annotated[str, Path(max_length=255, description=_ref_doc("job"))],
            owner: CurrentOwner, session: SessionDep) -> str:
    return _full_id(session, owner, "job", job_id)


def dataset_ref(dataset_id: Annotated[str, Path(max_length=255, description=_ref_doc("dataset"))],
                owner: CurrentOwner, session: SessionDep) -> str:
    return _full_id(session, owner, "dataset", dataset_id)


def model_ref(model_id: Annotated[str, Path(max_length=255, description=_ref_doc("model"))],
              owner: CurrentOwner, session: SessionDep) -> str:
    return _full_id(session, owner, "model", model_id)


JobId = Annotated[str, Depends(job_ref)]
DatasetId = Annotated[str, Depends(dataset_ref)]
ModelId = Annotated[str, Depends(model_ref)]
