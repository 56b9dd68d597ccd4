"""The job state machine (``service.models``) and ``crud.set_job_status``, the conditional UPDATE that
follows it, on SQLite and PostgreSQL (the lease protocol: ``test_service_leases.py``)."""

from __future__ import annotations

import pytest

from service import crud
from service.models import IllegalTransition, Job, allowed_sources, check_transition
from service.status import JobStatus

LEGAL = {
    ("queued", "running"), ("queued", "cancelled"), ("running", "succeeded"), ("running", "failed"),
    ("running", "cancelled"), ("running", "queued"),
}


@pytest.mark.parametrize("current", [s.value for s in JobStatus])
@pytest.mark.parametrize("target", [s.value for s in JobStatus])
def test_transition_table(current, target):
    if (current, target) in LEGAL:
        check_transition(current, target)
    else:
        with pytest.raises(IllegalTransition, match=f"'{current}' -> '{target}'"):
            check_transition(current, target)


def test_transition_rejects_unknown_status_and_lists_sources():
    with pytest.raises(IllegalTransition):
        check_transition("queued", "paused")
    assert sorted(allowed_sources("cancelled")) == ["queued", "running"]
    assert allowed_sources("queued") == ["running"]


def test_set_job_status_follows_the_state_machine(session, make_job):
    job = make_job()
    assert not crud.set_job_status(session, job_id=job.id, status=JobStatus.SUCCEEDED)  # queued -/-> succeeded
    assert not crud.set_job_status(session, job_id=job.id, status=JobStatus.CANCELLED, where=[Job.attempts > 0])
    assert crud.set_job_status(session, job_id=job.id, status=JobStatus.CANCELLED, error="x")
    session.commit()
    cancelled = crud.get_owned_job(session, owner_id=make_job.owner_id, job_id=job.id)
    assert cancelled.status == "cancelled" and cancelled.error == "x"
    assert not crud.set_job_status(session, job_id=job.id, status=JobStatus.QUEUED)  # terminal: nothing moves it
    session.rollback()
