"""A hung or dead Redis does not hang the API: submissions answer within seconds (the job stays
``queued`` and the reaper's sweep sends it later), ``/healthz`` stays 200 and ``/readyz`` names the
broker. Faults are real: a real redis-server frozen with SIGSTOP or killed, or a socket that accepts
connections and never answers."""

from __future__ import annotations

import functools
import os
import signal
import socket
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine

from service import leases
from service.core.db import make_session_factory
from service.queue import enqueue_job
from tests.redis_server import RedisServer, start_redis
from tests.service.helpers import TINY_MODEL
from worker.reaper import job_ids_in_queue, reap

FAST_ENOUGH_S = 4.0  # the request may wait broker_timeout_seconds (1 s here), never a retry loop


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis of this test alone (the session's one must not be frozen)."""
    server = start_redis()
    yield server
    if server.process.poll() is None:
        os.kill(server.process.pid, signal.SIGCONT)
    server.stop()


@pytest.fixture
def black_hole() -> Iterator[str]:
    """A Redis URL whose port accepts TCP connections (the kernel's backlog) and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield f"redis://127.0.0.1:{listener.getsockname()[1]}/0"


def train_body(dataset_id: str) -> dict:
    return {"kind": "train", "student": dict(TINY_MODEL), "train_dataset": dataset_id,
            "hyperparameters": {"max_iters": 2, "batch_size": 1}}


def timed_post(api, body) -> tuple[object, float]:
    start = time.monotonic()
    r = api.post("/v1/jobs", json=body)
    return r, time.monotonic() - start


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return result


def assert_queued(api, job_id: str) -> None:
    with api.session() as s:
        assert leases.get_job(s, job_id=job_id).status == "queued"


def test_submit_with_a_frozen_redis_answers_quickly_and_the_job_is_sent_later(api, own_redis):
    api.configure(redis_url=own_redis.url, broker_timeout_seconds=1.0)
    dataset = api.register_dataset()
    r = api.post("/v1/jobs", json=train_body(dataset))  # warm: the producer holds a live connection
    assert r.status_code == 201, r.text
    os.kill(own_redis.process.pid, signal.SIGSTOP)
    try:
        r, elapsed = timed_post(api, train_body(dataset))
    finally:
        os.kill(own_redis.process.pid, signal.SIGCONT)
    assert r.status_code == 201, r.text
    assert elapsed < FAST_ENOUGH_S, f"POST /v1/jobs took {elapsed:.1f} s with a hung broker"
    job_id = r.json()["id"]
    assert r.json()["status"] == "queued"
    assert_queued(api, job_id)
    # Redis is back: the sweep makes sure a message for the job is waiting (it may also have been
    # delivered late by the thawed server; the sweep then does not send a second one).
    client = own_redis.client()
    with api.session() as s:
        reap(s, requeue_after_seconds=0, redis_client=client,
             enqueue=functools.partial(enqueue_job, broker_url=own_redis.url))
    wait_until(lambda: job_id in job_ids_in_queue(client), 10, "the job's message in the queue")
    assert_queued(api, job_id)


def test_submit_to_a_silent_broker_is_swept_when_redis_answers(api, black_hole, redis_server):
    api.configure(redis_url=black_hole, broker_timeout_seconds=1.0)
    r, elapsed = timed_post(api, train_body(api.register_dataset()))
    assert r.status_code == 201, r.text
    assert elapsed < FAST_ENOUGH_S, f"POST /v1/jobs took {elapsed:.1f} s with a silent broker"
    job_id = r.json()["id"]
    client = redis_server.client()
    assert job_id not in job_ids_in_queue(client)  # nothing reached any broker
    assert_queued(api, job_id)
    with api.session() as s:
        report = reap(s, requeue_after_seconds=0, redis_client=client,
                      enqueue=functools.partial(enqueue_job, broker_url=redis_server.url))
    assert job_id in report.reenqueued
    assert job_id in job_ids_in_queue(client)


def test_liveness_and_readiness_with_a_frozen_and_a_dead_redis(api, own_redis):
    api.configure(redis_url=own_redis.url, broker_timeout_seconds=1.0)
    ready = api.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ok", ready.text
    os.kill(own_redis.process.pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        ready = api.client.get("/readyz")
        elapsed = time.monotonic() - start
        assert api.client.get("/healthz").status_code == 200
    finally:
        os.kill(own_redis.process.pid, signal.SIGCONT)
    body = ready.json()
    assert ready.status_code == 503 and ready.headers["retry-after"]
    assert body["status"] == "unavailable" and body["database"]["ok"] is True
    assert body["broker"]["ok"] is False and body["broker"]["error"]
    assert elapsed < FAST_ENOUGH_S
    own_redis.stop()  # now dead: connection refused
    ready = api.client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["broker"] == {
        "ok": False, "error": "ConnectionError", "latency_ms": ready.json()["broker"]["latency_ms"]
    }
    assert "127.0.0.1" not in ready.text  # no addresses to unauthenticated callers
    assert api.client.get("/healthz").json() == {"status": "ok"}


def test_readiness_reports_a_broken_database(api, tmp_path):
    api.client.app.state.read_session_factory = _broken_factory(tmp_path)
    ready = api.client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["database"]["ok"] is False and ready.json()["broker"]["ok"] is True
    assert api.client.get("/healthz").status_code == 200


def _broken_factory(tmp_path):
    """Sessions on a database file that cannot be opened (its folder is missing)."""
    return make_session_factory(create_engine(f"sqlite:///{tmp_path / 'missing' / 'x.db'}"))
