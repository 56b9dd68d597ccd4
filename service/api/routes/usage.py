"""``GET /v1/usage``: what the caller stores on the server, by kind."""

from __future__ import annotations

from fastapi import APIRouter

from service import deletion
from service.api.deps import CurrentOwner, SessionDep, StorageDep
from service.api.responses import AUTHENTICATED
from service.schemas import UsageOut

router = APIRouter(prefix="/v1/usage", tags=["usage"], responses=AUTHENTICATED)


@router.get("", response_model=UsageOut)
def get_usage(owner: CurrentOwner, session: SessionDep, storage: StorageDep) -> UsageOut:
    """Counts and bytes of the caller's datasets, models and jobs (each stored file counted once)."""
    return UsageOut.model_validate(deletion.usage(session, storage, owner_id=owner.id))
