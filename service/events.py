"""Job events: what happened to a job, in order, for ``GET /v1/jobs/{id}/events`` (Server-Sent Events).

Every change worth telling is one ``job_events`` row, written in the transaction of the change
itself (``service.crud.set_job_status``, ``service.leases``), so an event exists exactly when its
change was committed. Kinds and their ``data``:

* ``status``   ``{"status", "attempt"?, "error"?, "cancel_requested"?}``: the job was created,
  claimed, restarted (a new ``attempt``), asked to cancel, requeued or finished.
* ``progress`` the job's ``progress`` object (``iteration``, ``max_iters``, ``eta_seconds``, ...).
  Progress is a state, not history: a new one replaces the job's older progress events, so a
  long job keeps one such row instead of one per progress write (a reader resuming after an old
  id gets the newest progress, which is all it would have used).
* ``metric``   ``{"step", "values": {name: value}}``: new points of the metric series.
* ``final``    ``{"step", "metrics"}``: the final evaluation (also stored as ``eval/*`` points at
  ``step``), just before the ``succeeded`` status event.

Ids only grow, per job in commit order: every write that records an event first updates or locks
the job's row, and that row lock makes writers of one job take their ids one after the other (on
PostgreSQL a sequence hands out ids at insert time, not at commit). So a reader that resumes after
the last id it saw (``Last-Event-ID``) misses nothing and sees nothing twice.

A stream polls the table every ``events_poll_seconds`` (SQLite and PostgreSQL alike: no broker
involved), sends a keep-alive comment when idle, and ends once the job is terminal and every event
was sent. It reads the job's status *before* the events: the terminal status is committed with its
events, so once it is seen they are visible too.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any

import anyio
from sqlalchemy import delete, insert, select
from sqlalchemy.orm import Session, sessionmaker

from gid_core.fileio import finite_only
from service.models import Job, JobEvent, utcnow
from service.status import TERMINAL_STATUSES

STATUS, PROGRESS, METRIC, FINAL = "status", "progress", "metric", "final"
EVENT_KINDS = (STATUS, PROGRESS, METRIC, FINAL)
BATCH = 500  # events per read of a stream
RETRY_MS = 2000  # the reconnection delay an EventSource should use


def record(session: Session, *, job_id: str, kind: str, data: Mapping[str, Any]) -> None:
    """Add an event to the caller's transaction (no commit). Call it after the statement that
    updates or locks the job's row (see the module docstring)."""
    if kind not in EVENT_KINDS:
        raise ValueError(f"unknown event kind {kind!r}")
    if kind == PROGRESS:
        session.execute(delete(JobEvent).where(JobEvent.job_id == job_id, JobEvent.kind == PROGRESS))
    session.execute(insert(JobEvent).values(job_id=job_id, kind=kind, data=finite_only(dict(data)),
                                            created_at=utcnow()))


def record_metric_points(session: Session, *, job_id: str, rows: Iterable[Mapping[str, Any]]) -> None:
    """One ``metric`` event per step of ``rows`` (``{"name", "step", "value"}``), steps ascending."""
    by_step: dict[int, dict[str, float]] = defaultdict(dict)
    for row in rows:
        by_step[int(row["step"])][str(row["name"])] = float(row["value"])
    for step in sorted(by_step):
        record(session, job_id=job_id, kind=METRIC, data={"step": step, "values": by_step[step]})


def events_after(session: Session, *, job_id: str, after_id: int, limit: int = BATCH) -> tuple[list[Any], str | None]:
    """``(events, status)``: up to ``limit`` events of the job with ``id > after_id``, oldest
    first, and the job's status read before them (None: the job is gone)."""
    status = session.scalar(select(Job.status).where(Job.id == job_id))
    rows = session.execute(
        select(JobEvent.id, JobEvent.kind, JobEvent.data)
        .where(JobEvent.job_id == job_id, JobEvent.id > after_id)
        .order_by(JobEvent.id)
        .limit(limit)
    ).all()
    session.commit()  # end the read transaction (a later poll must see newer commits)
    return list(rows), status


def format_event(event_id: int, kind: str, data: Any) -> str:
    """One SSE message; ``data`` is compact JSON on one line."""
    return f"id: {event_id}\nevent: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


async def stream_events(
    factory: sessionmaker[Session],
    *,
    job_id: str,
    after_id: int,
    poll_seconds: float,
    keepalive_seconds: float,
    disconnected: Callable[[], Awaitable[bool]],
) -> AsyncIterator[str]:
    """The SSE body of a job's events after ``after_id`` (see the module docstring)."""

    def read(after: int) -> tuple[list[Any], str | None]:
        with factory() as session:
            return events_after(session, job_id=job_id, after_id=after)

    yield f"retry: {RETRY_MS}\n\n"
    last_write = time.monotonic()
    while True:
        rows, status = await anyio.to_thread.run_sync(read, after_id)
        for event_id, kind, data in rows:
            after_id = event_id
            yield format_event(event_id, kind, data)
        if rows:
            last_write = time.monotonic()
        if status is None or (status in TERMINAL_STATUSES and len(rows) < BATCH):
            return
        if len(rows) == BATCH:
            continue  # a backlog: read on at once
        if await disconnected():
            return
        if time.monotonic() - last_write >= keepalive_seconds:
            yield ": keep-alive\n\n"
            last_write = time.monotonic()
        await anyio.sleep(poll_seconds)


def parse_event_id(value: str | None) -> int:
    """A ``Last-Event-ID`` header: our ids are integers; anything else starts from the beginning."""
    try:
        return max(int((value or "").strip()), 0)
    except ValueError:
        return 0
