"""The worker's lease protocol (``service.leases``), on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest

from service import crud, leases
from service.errors import Conflict
from service.models import utcnow


def test_claim_renew_finish(session, make_job):
    job = make_job()
    claimed = leases.claim_job(session, job_id=job.id, worker_id="w1", lease_seconds=30)
    assert claimed is not None and claimed.status == "running" and claimed.lease_owner == "w1"
    assert claimed.attempts == 1 and claimed.started_at is not None
    assert claimed.lease_expires_at > utcnow() + timedelta(seconds=25)
    # A redelivered message while the lease is alive: no second claim.
    assert leases.claim_job(session, job_id=job.id, worker_id="w2", lease_seconds=30) is None
    assert leases.renew_lease(session, job_id=job.id, worker_id="w1", lease_seconds=30) == leases.LeaseState(True, False)
    assert leases.renew_lease(session, job_id=job.id, worker_id="w2", lease_seconds=30).alive is False
    assert leases.update_progress(session, job_id=job.id, worker_id="w1", progress={"iteration": 5}, latest_metrics={"loss": float("nan")})
    assert not leases.update_progress(session, job_id=job.id, worker_id="w2", progress={"iteration": 9})
    assert not leases.finish_job(session, job_id=job.id, worker_id="w2", status="succeeded")
    assert leases.finish_job(session, job_id=job.id, worker_id="w1", status="succeeded", final_metrics={"AP": 12.5})
    done = leases.get_job(session, job_id=job.id)
    assert done.status == "succeeded" and done.lease_owner is None and done.finished_at is not None
    assert done.progress == {"iteration": 5} and done.latest_metrics == {"loss": None}
    assert done.final_metrics == {"AP": 12.5}
    # Terminal: nothing moves it any more.
    assert not leases.finish_job(session, job_id=job.id, worker_id="w1", status="failed")
    assert leases.claim_job(session, job_id=job.id, worker_id="w1", lease_seconds=30) is None
    assert leases.renew_lease(session, job_id=job.id, worker_id="w1", lease_seconds=30).alive is False


def test_finish_refuses_non_terminal_status(session, make_job):
    job = make_job()
    leases.claim_job(session, job_id=job.id, worker_id="w1", lease_seconds=30)
    with pytest.raises(ValueError, match="must be one of"):
        leases.finish_job(session, job_id=job.id, worker_id="w1", status="queued")
    with pytest.raises(ValueError):
        leases.finish_job(session, job_id=job.id, worker_id="w1", status="paused")


def test_expired_lease_is_taken_over(session, make_job):
    job = make_job()
    leases.claim_job(session, job_id=job.id, worker_id="w1", lease_seconds=-1)  # already expired
    taken = leases.claim_job(session, job_id=job.id, worker_id="w2", lease_seconds=30)
    assert taken is not None and taken.lease_owner == "w2" and taken.attempts == 2
    # The lost worker finds out on its next heartbeat and cannot finish the job.
    assert leases.renew_lease(session, job_id=job.id, worker_id="w1", lease_seconds=30).alive is False
    assert not leases.finish_job(session, job_id=job.id, worker_id="w1", status="failed", error="x")
    # With max_attempts the takeover stops at the limit.
    leases.renew_lease(session, job_id=job.id, worker_id="w2", lease_seconds=-1)
    assert leases.claim_job(session, job_id=job.id, worker_id="w3", lease_seconds=30, max_attempts=2) is None


def test_cancel_request_reaches_the_worker(session, make_job):
    job = make_job()
    leases.claim_job(session, job_id=job.id, worker_id="w1", lease_seconds=30)
    cancelled = crud.cancel_job(session, owner_id=make_job.owner_id, job_id=job.id)
    assert cancelled.status == "running" and cancelled.cancel_requested
    assert leases.renew_lease(session, job_id=job.id, worker_id="w1", lease_seconds=30) == leases.LeaseState(True, True)
    assert leases.finish_job(session, job_id=job.id, worker_id="w1", status="cancelled")
    with pytest.raises(Conflict, match="already cancelled"):
        crud.cancel_job(session, owner_id=make_job.owner_id, job_id=job.id)


def test_requeue_or_fail_stale_jobs(session, make_job):
    alive, stale, exhausted, cancelling = make_job(), make_job(), make_job(), make_job()
    leases.claim_job(session, job_id=alive.id, worker_id="w", lease_seconds=60)
    for job in (stale, exhausted, cancelling):
        leases.claim_job(session, job_id=job.id, worker_id="w", lease_seconds=-1)
    for _ in range(2):  # two more lost workers for "exhausted": attempts 3
        leases.claim_job(session, job_id=exhausted.id, worker_id="w", lease_seconds=-1)
    crud.cancel_job(session, owner_id=make_job.owner_id, job_id=cancelling.id)

    requeued, failed = leases.requeue_or_fail_stale_jobs(session, max_attempts=3)
    assert requeued == [stale.id] and failed == [exhausted.id]
    states = {j.id: leases.get_job(session, job_id=j.id) for j in (alive, stale, exhausted, cancelling)}
    assert states[alive.id].status == "running"
    assert states[stale.id].status == "queued" and states[stale.id].lease_owner is None
    assert states[exhausted.id].status == "failed" and states[exhausted.id].error == "worker lost 3 times"
    assert states[cancelling.id].status == "cancelled"
    # The requeued job can be claimed again (attempt 2); a second sweep finds nothing.
    assert leases.claim_job(session, job_id=stale.id, worker_id="w9", lease_seconds=30).attempts == 2
    assert leases.requeue_or_fail_stale_jobs(session, max_attempts=3) == ([], [])


def test_requeue_respects_now(session, make_job):
    job = make_job()
    leases.claim_job(session, job_id=job.id, worker_id="w", lease_seconds=30)
    assert leases.requeue_or_fail_stale_jobs(session, max_attempts=3) == ([], [])
    later = utcnow() + timedelta(seconds=31)
    assert leases.requeue_or_fail_stale_jobs(session, now=later, max_attempts=3) == ([job.id], [])


def test_list_queued_job_ids(session, make_job):
    a, b = make_job(), make_job()
    leases.claim_job(session, job_id=b.id, worker_id="w", lease_seconds=30)
    assert leases.list_queued_job_ids(session, older_than_seconds=3600) == []
    assert leases.list_queued_job_ids(session, older_than_seconds=0) == [a.id]


def test_metric_points_and_artifacts(session, make_job):
    job = make_job()
    stored = leases.add_metric_points(session, job_id=job.id, points=[("loss", 1, 2.0), ("loss", 2, float("inf")), ("lr", 1, 0.1)])
    assert stored == 2
    series = crud.get_metrics(session, job_id=job.id)
    assert series["loss"]["steps"] == [1] and series["lr"]["values"] == [0.1]
    leases.add_artifact(session, job_id=job.id, name="metrics.json", path="/x", size=3, sha256="a" * 64)
    leases.add_artifact(session, job_id=job.id, name="metrics.json", path="/y", size=4, sha256="b" * 64)
    (artifact,) = crud.list_artifacts(session, job_id=job.id)
    assert (artifact.path, artifact.size) == ("/y", 4)


@pytest.mark.parametrize("queued", [True, False], ids=["queued", "expired-running"])
def test_concurrent_claims_have_one_winner(session_factory, make_job, queued):
    job = make_job()
    if not queued:
        with session_factory() as s:
            leases.claim_job(s, job_id=job.id, worker_id="lost", lease_seconds=-1)
    barrier = threading.Barrier(2)
    results: dict[str, object] = {}

    def worker(name: str) -> None:
        with session_factory() as s:
            barrier.wait()
            results[name] = leases.claim_job(s, job_id=job.id, worker_id=name, lease_seconds=30)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    winners = [name for name, claimed in results.items() if claimed is not None]
    assert len(results) == 2 and len(winners) == 1
    with session_factory() as s:
        final = leases.get_job(s, job_id=job.id)
    assert final.lease_owner == winners[0] and final.attempts == (1 if queued else 2)


def _causes(session, job_id: str) -> list[tuple[int, str | None]]:
    job = leases.get_job(session, job_id=job_id)
    session.refresh(job)
    return [(a.number, a.cause) for a in job.attempt_history]


def test_attempts_are_recorded_with_their_cause(session, make_job):
    job = make_job()
    leases.claim_job(session, job_id=job.id, worker_id="w1", lease_seconds=30)
    assert _causes(session, job.id) == [(1, None)]  # running
    assert leases.restart_attempt(session, job_id=job.id, worker_id="w2", cause="x", lease_seconds=30,
                                  max_attempts=3) is None  # not the holder
    assert leases.restart_attempt(session, job_id=job.id, worker_id="w1", cause="killed by SIGKILL",
                                  lease_seconds=30, max_attempts=3) == 2
    assert leases.restart_attempt(session, job_id=job.id, worker_id="w1", cause="again", lease_seconds=30,
                                  max_attempts=3) == 3
    assert leases.restart_attempt(session, job_id=job.id, worker_id="w1", cause="no more", lease_seconds=30,
                                  max_attempts=3) is None  # out of attempts: attempt 3 stays open
    assert leases.finish_job(session, job_id=job.id, worker_id="w1", status="failed", error="E: boom")
    assert _causes(session, job.id) == [(1, "killed by SIGKILL"), (2, "again"), (3, "E: boom")]
    assert leases.get_job(session, job_id=job.id).attempts == 3


def test_jobs_of_a_dead_worker_are_requeued_at_once(session, make_job):
    mine, other, cancelled = make_job(), make_job(), make_job()
    leases.claim_job(session, job_id=mine.id, worker_id="node_1@h:12:abc", lease_seconds=600)
    leases.claim_job(session, job_id=other.id, worker_id="node_11@h:13:abc", lease_seconds=600)  # another node
    leases.claim_job(session, job_id=cancelled.id, worker_id="node_1@h:12:def", lease_seconds=600)
    crud.cancel_job(session, owner_id=make_job.owner_id, job_id=cancelled.id)
    # LIKE wildcards in the prefix ("_") are taken literally.
    assert leases.requeue_jobs_of_worker(session, worker_prefix="node_1@h:") == [mine.id]
    assert leases.get_job(session, job_id=mine.id).status == "queued"
    assert leases.get_job(session, job_id=other.id).status == "running"
    assert leases.get_job(session, job_id=cancelled.id).status == "cancelled"
    assert _causes(session, mine.id) == [(1, "worker died")]


def test_claim_next_job_takes_the_oldest_queued_job_first(session, make_job):
    older, newer = make_job(), make_job()
    leases.claim_job(session, job_id=older.id, worker_id="dead", lease_seconds=600)
    assert leases.requeue_jobs_of_worker(session, worker_prefix="dead") == [older.id]
    # The newer job's message comes first, but the requeued older job runs first.
    first = leases.claim_next_job(session, job_id=newer.id, worker_id="w", lease_seconds=30)
    assert first.id == older.id and first.attempts == 2
    second = leases.claim_next_job(session, job_id=older.id, worker_id="w2", lease_seconds=30)
    assert second.id == newer.id
    assert leases.claim_next_job(session, job_id=newer.id, worker_id="w3", lease_seconds=30) is None
