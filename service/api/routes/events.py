"""``/v1/jobs/{id}/events`` (Server-Sent Events) and ``/v1/jobs/{id}/logs`` (text, optionally
followed): a running job seen as it happens, without polling the job resource."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse
from sqlalchemy import select

from gid_core.jobdir import JobDir
from service import crud, events, logs
from service.api.deps import CurrentOwner, JobId, SessionDep, SettingsDep, StorageDep
from service.api.limits import MAX_QUERY_INT, StrictJSONRoute
from service.api.responses import error_responses
from service.models import Job

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], route_class=StrictJSONRoute)

STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering

EVENTS_DESCRIPTION = """\
A `text/event-stream` of what happens to the job, oldest first, from its creation on:

```
id: 42
event: progress
data: {"iteration":120,"max_iters":1000,"eta_seconds":61.2}
```

| event | data |
| --- | --- |
| `status` | `{"status", "attempt"?, "error"?, "cancel_requested"?, "restarted_after"?}`: created (`queued`), claimed or restarted (`running` with its `attempt`), cancel requested, requeued, finished |
| `progress` | the job's `progress` object (`iteration`, `max_iters`, `eta_seconds`, `attempt`, ...) |
| `metric` | `{"step", "values": {name: value}}`: new points of the series of `/metrics` |
| `final` | `{"step", "metrics"}`: the final evaluation (also `eval/*` points at `step`), before the `succeeded` status |

`id`s only grow. To resume, send the last id seen as `Last-Event-ID` (what `EventSource` does on
its own) or `?after=`: the stream goes on with exactly the events after it. Idle streams get a
`: keep-alive` comment every `GID_EVENTS_KEEPALIVE_SECONDS`. The stream ends once the job is
succeeded, failed or cancelled and every event was sent.
"""


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    description=EVENTS_DESCRIPTION,
    responses={200: {"content": {"text/event-stream": {}}, "description": "the event stream"},
               **error_responses(401, 404, 422)},
)
def job_events(
    job_id: JobId,
    request: Request,
    owner: CurrentOwner,
    session: SessionDep,
    settings: SettingsDep,
    after: Annotated[int | None, Query(ge=0, le=MAX_QUERY_INT, description="only events with a larger id")] = None,
    last_event_id: Annotated[str | None, Header(max_length=40)] = None,
) -> StreamingResponse:
    """Server-Sent Events of the job (see the description)."""
    crud.get_owned_job(session, owner_id=owner.id, job_id=job_id)
    start = after if after is not None else events.parse_event_id(last_event_id)
    body = events.stream_events(
        request.app.state.read_session_factory, job_id=job_id, after_id=start,
        poll_seconds=settings.events_poll_seconds, keepalive_seconds=settings.events_keepalive_seconds,
        disconnected=request.is_disconnected,
    )
    return StreamingResponse(body, media_type="text/event-stream", headers=STREAM_HEADERS)


@router.get(
    "/{job_id}/logs",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/plain": {}}, "description": "the log text"}, **error_responses(401, 404, 422)},
)
def job_logs(
    job_id: JobId,
    request: Request,
    owner: CurrentOwner,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    tail: Annotated[int | None, Query(ge=0, le=1_000_000, description="only the last N lines")] = None,
    follow: Annotated[bool, Query(description="keep streaming new lines until the job ends")] = False,
) -> StreamingResponse:
    """The output of the job's training (each attempt's, in order), readable while it runs.

    With ``follow=true`` the response goes on with what is written until the job is succeeded,
    failed or cancelled (an attempt restarted meanwhile follows an ``==> attempt N <==`` line)."""
    crud.get_owned_job(session, owner_id=owner.id, job_id=job_id)
    factory = request.app.state.read_session_factory

    def status() -> str | None:
        with factory() as s:
            return s.scalar(select(Job.status).where(Job.id == job_id))

    body = logs.stream_log(
        JobDir(storage.job_dir(job_id)), tail=tail, follow=follow, status=status,
        poll_seconds=settings.events_poll_seconds, disconnected=request.is_disconnected,
    )
    return StreamingResponse(body, media_type="text/plain; charset=utf-8", headers=STREAM_HEADERS)
