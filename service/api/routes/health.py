"""``GET /healthz``: unauthenticated liveness and database check."""

from __future__ import annotations

from fastapi import APIRouter, Response
from sqlalchemy import text

from service.api.deps import SessionDep
from service.schemas import HealthOut

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthOut)
def healthz(session: SessionDep, response: Response) -> HealthOut:
    try:
        session.execute(text("SELECT 1"))
        session.rollback()
        return HealthOut(status="ok", database=True)
    except Exception:  # noqa: BLE001 - any database failure is "degraded"
        response.status_code = 503
        return HealthOut(status="degraded", database=False)
