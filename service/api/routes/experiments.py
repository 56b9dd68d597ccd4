"""``/v1/experiments``: a teacher / baseline / GID comparison in one call (``service.experiments``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request

from service import experiments, queue
from service.api.deps import CurrentOwner, SessionDep, SettingsDep
from service.api.limits import MAX_QUERY_INT, StrictJSONRoute
from service.api.responses import AUTHENTICATED, error_responses
from service.core.db import session_scope
from service.models import Experiment
from service.schemas import ExperimentCreate, ExperimentOut, Page

router = APIRouter(prefix="/v1/experiments", tags=["experiments"], route_class=StrictJSONRoute,
                   responses=AUTHENTICATED)
ExperimentId = Annotated[str, Path(min_length=1, max_length=64)]


@router.post("", status_code=201, response_model=ExperimentOut)
def create_experiment(body: ExperimentCreate, owner: CurrentOwner, session: SessionDep, settings: SettingsDep):
    """Validate every job, create them (the GID job waits uncreated while its teacher trains),
    then send them to the workers."""
    experiment, job_ids = experiments.create_experiment(session, owner_id=owner.id, request=body, settings=settings)
    for job_id in job_ids:  # after the commit; a down broker leaves them queued for the sweep
        queue.enqueue_job(job_id, broker_url=settings.redis_url, timeout=settings.broker_timeout_seconds)
    return experiments.experiment_out(session, experiment)


@router.get("", response_model=Page[ExperimentOut])
def list_experiments(
    request: Request,
    owner: CurrentOwner,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    offset: Annotated[int, Query(ge=0, le=MAX_QUERY_INT)] = 0,
):
    """Newest first, each with its comparison table."""
    items, total = experiments.list_experiments(session, owner_id=owner.id, limit=limit, offset=offset)
    items = [_advanced(request, session, e) for e in items]
    return Page(items=[experiments.experiment_out(session, e) for e in items], total=total, limit=limit, offset=offset)


@router.get("/{experiment_id}", response_model=ExperimentOut, responses=error_responses(404))
def get_experiment(experiment_id: ExperimentId, request: Request, owner: CurrentOwner, session: SessionDep):
    """The comparison table (teacher, baseline, GID) and the jobs behind it."""
    experiment = experiments.get_experiment(session, owner_id=owner.id, experiment_id=experiment_id)
    return experiments.experiment_out(session, _advanced(request, session, experiment))


def _advanced(request: Request, session, experiment: Experiment) -> Experiment:
    """The experiment, after creating its GID job if its teacher has just finished training
    (GET's session is read-only: the change takes a session of its own)."""
    if experiments.waiting_on_teacher(session, experiment) is None:
        return experiment
    settings = request.app.state.settings
    with session_scope(request.app.state.session_factory) as writer:
        job_id = experiments.advance(writer, experiment_id=experiment.id, settings=settings)
    if job_id is not None:
        queue.enqueue_job(job_id, broker_url=settings.redis_url, timeout=settings.broker_timeout_seconds)
    session.commit()  # end the read transaction: the next read sees the new job
    return experiments.get_experiment(session, owner_id=experiment.owner_id, experiment_id=experiment.id)
