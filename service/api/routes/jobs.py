"""``/v1/jobs``: submit (validated, idempotent, enqueued after commit), list, status, rename and
re-tag, metrics, cancel, artifacts."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError

from service import crud, deletion, jobspec, queue
from service.api.deps import CurrentOwner, JobId, SessionDep, SettingsDep, StorageDep
from service.api.files import FILE_RESPONSES, file_response
from service.api.limits import MAX_QUERY_INT, StrictJSONRoute
from service.api.responses import AUTHENTICATED, error_responses
from service.schemas import MAX_TAGS, ArtifactOut, JobOut, JobRequest, JobUpdate, MetricsOut, Page, Tag
from service.status import JobStatus

JOB_KINDS = ("train", "distill", "evaluate")


class JobBodyRoute(StrictJSONRoute):
    """Errors of a job body located as the body's own fields: pydantic puts the matched ``kind``
    of the ``JobRequest`` union into each location (``["body", "evaluate", "dataset"]``)."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as e:
                raise RequestValidationError([_untagged(error) for error in e.errors()]) from None

        return route


def _untagged(error: dict) -> dict:
    loc = tuple(error.get("loc", ()))
    if loc[:1] != ("body",):
        return error
    if len(loc) > 1 and loc[1] in JOB_KINDS:
        return {**error, "loc": (*loc[:1], *loc[2:])}
    if error.get("type") == "union_tag_invalid":
        return {**error, "loc": ("body", "kind"), "type": "literal_error",
                "msg": f"Input should be one of {', '.join(map(repr, JOB_KINDS))}"}
    if error.get("type") == "union_tag_not_found":
        return {**error, "loc": ("body", "kind"), "type": "missing", "msg": "Field required"}
    return error


router = APIRouter(prefix="/v1/jobs", tags=["jobs"], route_class=JobBodyRoute, responses=AUTHENTICATED)


@router.post(
    "", status_code=201, response_model=JobOut,
    responses={200: {"description": "idempotent replay"}, **error_responses(409)},
)
def submit_job(
    body: JobRequest,
    response: Response,
    owner: CurrentOwner,
    session: SessionDep,
    settings: SettingsDep,
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=255)] = None,
):
    """Validate fully, store the job as ``queued``, then send it to the workers. ``kind`` train or
    distill: a training job (``JobCreate``); evaluate: COCO AP of a model on a dataset (``EvaluateCreate``).

    With an ``Idempotency-Key`` header a retried submission returns the first job (200); the same
    key with a different body is a 409."""
    job, created = jobspec.submit_job(
        session, owner_id=owner.id, request=body, idempotency_key=idempotency_key, settings=settings
    )
    if created:
        # After the commit, bounded in time: a down or hung broker leaves the job queued for the sweep.
        queue.enqueue_job(job.id, broker_url=settings.redis_url, timeout=settings.broker_timeout_seconds)
    else:
        response.status_code = 200
    return job


@router.get("", response_model=Page[JobOut])
def list_jobs(
    owner: CurrentOwner,
    session: SessionDep,
    status: JobStatus | None = None,
    kind: Annotated[Literal["train", "distill", "evaluate"] | None, Query()] = None,
    name: Annotated[str | None, Query(max_length=200, description="exact job name")] = None,
    tag: Annotated[list[Tag], Query(max_length=MAX_TAGS, description="repeatable: jobs with every tag")] = [],
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_QUERY_INT)] = 0,
):
    """Newest first; every filter given must hold."""
    items, total = crud.list_jobs(session, owner_id=owner.id, status=status, kind=kind, name=name, tags=tag,
                                  limit=limit, offset=offset)
    return Page(items=items, total=total, limit=limit, offset=offset)


@router.get("/{job_id}", response_model=JobOut, responses=error_responses(404))
def get_job(job_id: JobId, owner: CurrentOwner, session: SessionDep):
    return crud.get_owned_job(session, owner_id=owner.id, job_id=job_id)


@router.get("/{job_id}/metrics", response_model=MetricsOut, responses=error_responses(404))
def get_metrics(
    job_id: JobId,
    owner: CurrentOwner,
    session: SessionDep,
    names: Annotated[str | None, Query(description="comma-separated series names; all when absent")] = None,
    since_step: Annotated[int | None, Query(ge=-MAX_QUERY_INT, le=MAX_QUERY_INT, description="only points with a larger step")] = None,
    max_points: Annotated[int, Query(ge=1, le=10_000, description="per series, downsampled by step")] = 1000,
):
    crud.get_owned_job(session, owner_id=owner.id, job_id=job_id)
    wanted = [n.strip() for n in names.split(",") if n.strip()] if names else None
    series = crud.get_metrics(session, job_id=job_id, names=wanted, since_step=since_step, max_points=max_points)
    last = max((s["steps"][-1] for s in series.values() if s["steps"]), default=None)
    return MetricsOut(job_id=job_id, series=series, last_step=last)


@router.patch("/{job_id}", response_model=JobOut, responses=error_responses(404))
def update_job(job_id: JobId, body: JobUpdate, owner: CurrentOwner, session: SessionDep):
    """Rename or re-tag a job, in any state: the fields given replace the job's (null clears)."""
    return crud.update_job(session, owner_id=owner.id, job_id=job_id, changes=body.model_dump(exclude_unset=True))


@router.post("/{job_id}/cancel", response_model=JobOut, responses=error_responses(404, 409))
def cancel_job(job_id: JobId, owner: CurrentOwner, session: SessionDep):
    """Queued: cancelled at once. Running: ``cancel_requested`` is set and the worker stops it."""
    return crud.cancel_job(session, owner_id=owner.id, job_id=job_id)


@router.get("/{job_id}/artifacts", response_model=list[ArtifactOut], responses=error_responses(404))
def list_artifacts(job_id: JobId, owner: CurrentOwner, session: SessionDep):
    crud.get_owned_job(session, owner_id=owner.id, job_id=job_id)
    return crud.list_artifacts(session, job_id=job_id)


@router.get("/{job_id}/artifacts/{name:path}", responses={**FILE_RESPONSES, **error_responses(404)})
def download_artifact(job_id: JobId, name: str, request: Request, owner: CurrentOwner, session: SessionDep):
    crud.get_owned_job(session, owner_id=owner.id, job_id=job_id)
    artifact = crud.get_artifact(session, job_id=job_id, name=name)
    return file_response(request, artifact.path, sha256=artifact.sha256, filename=artifact.name)


@router.delete("/{job_id}", status_code=204, responses=error_responses(404, 409))
def delete_job(job_id: JobId, owner: CurrentOwner, session: SessionDep, storage: StorageDep) -> None:
    """Delete a finished job: its record, metrics, artifacts and folder (checkpoints, logs). The
    model it produced stays (``source_job_id`` becomes null). 409 while queued or running."""
    deletion.delete_job(session, storage, owner_id=owner.id, job_id=job_id)
