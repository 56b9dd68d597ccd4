"""``worker.reaper.reap`` in-process against a real SQLite database and a real Redis broker queue."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from service import crud, leases
from service.core.db import make_engine, make_session_factory
from service.migrate import upgrade_to_head
from service.models import utcnow
from service.queue import enqueue_job
from tests.redis_server import RedisServer, start_redis
from worker.reaper import job_ids_in_queue, reap


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    server = start_redis()
    yield server
    server.stop()


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    url = f"sqlite:///{tmp_path / 'gid.db'}"
    upgrade_to_head(url)
    engine = make_engine(url)
    with make_session_factory(engine)() as s:
        yield s
    engine.dispose()


@pytest.fixture
def broker(redis_server: RedisServer):
    client = redis_server.client()
    client.flushdb()
    yield client
    client.close()


def new_job(session: Session) -> str:
    owner = crud.get_or_create_owner(session, name="alice")
    ds = crud.create_dataset(session, owner_id=owner.id, name="d", source="path", annotations_path="/a.json",
                             images_path="/img", num_images=1, num_annotations=1, categories=["x"])
    job, _ = crud.create_job(session, owner_id=owner.id, kind="train", name=None, config={}, engine_config={},
                             request_hash="0" * 64, idempotency_key=None, train_dataset_id=ds.id)
    return job.id


def later(seconds: float = 1.0):
    return utcnow() + timedelta(seconds=seconds)


def test_job_ids_in_queue_reads_celery_messages(redis_server, broker):
    assert job_ids_in_queue(broker) == set()
    for job_id in ("a", "b", "a"):
        assert enqueue_job(job_id, broker_url=redis_server.url)
    broker.rpush("gid.jobs", b"not json")  # unreadable entries are skipped
    assert broker.llen("gid.jobs") == 4
    assert job_ids_in_queue(broker) == {"a", "b"}


def test_stale_running_job_is_requeued_and_enqueued_until_max_attempts(session, redis_server, broker):
    enqueue = functools.partial(enqueue_job, broker_url=redis_server.url)
    job_id = new_job(session)
    for attempt in (1, 2):
        assert leases.claim_job(session, job_id=job_id, worker_id=f"w{attempt}", lease_seconds=5).attempts == attempt
        # A live lease is left alone.
        report = reap(session, max_attempts=2, requeue_after_seconds=3600, redis_client=broker, enqueue=enqueue)
        assert report.requeued == [] and leases.get_job(session, job_id=job_id).status == "running"
        if attempt == 2:
            break
        # Expired: back to the queue, with a fresh message.
        report = reap(session, now=later(6), max_attempts=2, requeue_after_seconds=3600, redis_client=broker,
                      enqueue=enqueue)
        assert report.requeued == [job_id] and report.failed == []
        job = leases.get_job(session, job_id=job_id)
        assert (job.status, job.lease_owner) == ("queued", None)
        assert job_ids_in_queue(broker) == {job_id}
        broker.delete("gid.jobs")  # the worker takes the message

    report = reap(session, now=later(6), max_attempts=2, requeue_after_seconds=3600, redis_client=broker,
                  enqueue=enqueue)
    assert report.requeued == [] and report.failed == [job_id]
    job = leases.get_job(session, job_id=job_id)
    assert job.status == "failed" and job.error == "worker lost 2 times" and job.finished_at is not None
    assert broker.llen("gid.jobs") == 0


def test_queued_job_is_reenqueued_only_when_its_message_is_missing(session, redis_server, broker):
    enqueue = functools.partial(enqueue_job, broker_url=redis_server.url)
    waiting, lost = new_job(session), new_job(session)
    enqueue(waiting)  # still in the broker queue (a busy worker): no duplicate
    report = reap(session, requeue_after_seconds=0, redis_client=broker, enqueue=enqueue)
    assert report.reenqueued == [lost]
    assert broker.llen("gid.jobs") == 2 and job_ids_in_queue(broker) == {waiting, lost}
    # The next sweep finds both messages: nothing is multiplied.
    assert reap(session, requeue_after_seconds=0, redis_client=broker, enqueue=enqueue).reenqueued == []
    assert broker.llen("gid.jobs") == 2
    # Younger than requeue_after_seconds: left alone even without a message.
    broker.delete("gid.jobs")
    assert reap(session, requeue_after_seconds=3600, redis_client=broker, enqueue=enqueue).reenqueued == []


def test_broker_failure_is_reported_and_the_job_stays_queued(session):
    job_id = new_job(session)
    report = reap(session, requeue_after_seconds=0, enqueue=lambda _id: False)
    assert report.reenqueued == [] and report.enqueue_failed == [job_id]
    assert leases.get_job(session, job_id=job_id).status == "queued"


def test_cancel_requested_stale_job_is_cancelled_not_requeued(session, redis_server, broker):
    enqueue = functools.partial(enqueue_job, broker_url=redis_server.url)
    job_id = new_job(session)
    leases.claim_job(session, job_id=job_id, worker_id="w", lease_seconds=5)
    job = leases.get_job(session, job_id=job_id)
    crud.cancel_job(session, owner_id=job.owner_id, job_id=job_id)
    report = reap(session, now=later(6), requeue_after_seconds=3600, redis_client=broker, enqueue=enqueue)
    assert report.requeued == [] and report.failed == []
    assert leases.get_job(session, job_id=job_id).status == "cancelled"
    assert broker.llen("gid.jobs") == 0
