"""Unauthenticated probes: ``GET /healthz`` (liveness) and ``GET /readyz`` (readiness).

Liveness answers 200 whenever the process serves requests and checks nothing else: a restart would
not cure a dead database or broker, so an orchestrator must not restart the API for one. Readiness
checks the database and the broker separately, each bounded by its own timeout, and answers 503
when either is down (take the replica out of the load balancer, or wait before submitting).

The checks run in a small dedicated thread pool: a hung backend can hold at most its threads, never
the request thread pool; a check still waiting at its deadline is reported as a timeout.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from fastapi import APIRouter, Request, Response
from sqlalchemy import text

from service.schemas import CheckOut, HealthOut, ReadinessOut

router = APIRouter(tags=["health"])
_CHECKS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="gid-readyz")


@router.get("/healthz", response_model=HealthOut)
async def healthz() -> HealthOut:
    """Liveness: 200 while the process answers; no dependency is checked (see ``/readyz``)."""
    return HealthOut(status="ok")


@router.get(
    "/readyz", response_model=ReadinessOut, responses={503: {"model": ReadinessOut, "description": "a dependency is down"}}
)
async def readyz(request: Request, response: Response) -> ReadinessOut:
    """Readiness: the database and the broker, each ``ok`` or the kind of error; 503 if either fails."""
    state = request.app.state
    settings = state.settings
    database, broker = await asyncio.gather(
        _check(lambda: _ping_database(state.read_session_factory), settings.database_check_timeout_seconds),
        _check(lambda: _ping_broker(settings.redis_url, settings.broker_timeout_seconds),
               settings.broker_timeout_seconds),
    )
    ready = database.ok and broker.ok
    if not ready:
        response.status_code = 503
        response.headers["Retry-After"] = "5"
    return ReadinessOut(status="ok" if ready else "unavailable", database=database, broker=broker)


async def _check(probe: Callable[[], None], timeout: float) -> CheckOut:
    start = time.monotonic()
    loop = asyncio.get_running_loop()
    try:
        # The small margin lets the probe's own socket timeout report first when it can.
        await asyncio.wait_for(asyncio.wrap_future(_CHECKS.submit(probe), loop=loop), timeout + 0.5)
    except asyncio.TimeoutError:
        return CheckOut(ok=False, error="timeout", latency_ms=_ms(start))
    except Exception as e:  # noqa: BLE001 - the kind of error only: messages may hold addresses
        return CheckOut(ok=False, error=type(e).__name__, latency_ms=_ms(start))
    return CheckOut(ok=True, error=None, latency_ms=_ms(start))


def _ms(start: float) -> float:
    return round((time.monotonic() - start) * 1000, 1)


def _ping_database(factory) -> None:
    with factory() as session:
        session.execute(text("SELECT 1"))
        session.rollback()


def _ping_broker(url: str, timeout: float) -> None:
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        client.ping()
    finally:
        client.close()
