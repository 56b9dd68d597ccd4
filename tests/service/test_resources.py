"""Resources and the gang lease (``service.workers``), on SQLite and PostgreSQL: the 422 for a job
no set of live workers can hold, and the all-or-nothing gathering of a multi-node job's nodes."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select, update

from service import leases, workers
from service.models import Job, JobAttempt, JobNode, Worker, utcnow
from tests.service.helpers import TINY_MODEL

LEASE = 30.0

# --------------------------------------------------------------------------- 422


def _body(ids, *, nodes: int, devices: int) -> dict:
    return {"kind": "train", "name": "r", "student": dict(TINY_MODEL), "train_dataset": ids["train"],
            "val_dataset": ids["val"], "hyperparameters": {"max_iters": 4, "batch_size": 12},
            "resources": {"nodes": nodes, "devices": devices}}


@pytest.fixture
def ids(api):
    return {"train": api.register_dataset(num_classes=2), "val": api.register_dataset(num_classes=2)}


def _register(api, name: str, n_devices: int, *, stale: bool = False) -> None:
    with api.session() as s:
        workers.register_worker(s, worker_node=name, address="127.0.0.1", kind="cpu",
                                devices=[f"cpu{i}" for i in range(n_devices)], slots=1)
        if stale:  # a node that stopped heartbeating long ago
            s.execute(update(Worker).where(Worker.id == name).values(heartbeat_at=utcnow() - timedelta(hours=1)))
            s.commit()


def _problem(response) -> tuple[tuple, str]:
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    return tuple(error["loc"]), error["type"]


def test_no_worker_registered_the_job_waits_queued(api, ids):
    r = api.post("/v1/jobs", json=_body(ids, nodes=3, devices=2))
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "queued"


def test_job_no_live_workers_can_hold_is_refused(api, ids):
    _register(api, "w1", 2)
    _register(api, "w2", 2)
    _register(api, "dead", 4, stale=True)  # a dead node's capacity does not count
    assert _problem(api.post("/v1/jobs", json=_body(ids, nodes=1, devices=3))) == (
        ("body", "resources", "devices"), "no_capacity")
    assert _problem(api.post("/v1/jobs", json=_body(ids, nodes=3, devices=2))) == (
        ("body", "resources", "nodes"), "no_capacity")
    # What the live workers can hold is queued (it may have to wait for busy workers).
    for nodes, devices in ((2, 2), (1, 2), (2, 1)):
        r = api.post("/v1/jobs", json=_body(ids, nodes=nodes, devices=devices))
        assert r.status_code == 201, r.text


# --------------------------------------------------------------------------- gang lease


@pytest.fixture
def gang_job(session, make_job):
    """``gang_job(nodes)``: a queued job spanning ``nodes`` nodes."""

    def make(nodes: int = 2) -> Job:
        job = make_job()
        session.execute(update(Job).where(Job.id == job.id).values(nodes=nodes))
        session.commit()
        return job

    return make


def _lead(session, job: Job, leader: str) -> int:
    """``leader`` claims ``job`` (node 0) and opens its gang; returns the attempt."""
    claimed = leases.claim_job(session, job_id=job.id, worker_id=f"{leader}:1", lease_seconds=LEASE)
    assert claimed is not None
    workers.open_gang(session, job_id=job.id, attempt=claimed.attempts, worker_node=leader,
                      worker_id=f"{leader}:1", endpoint=f"{leader}:29500", lease_seconds=LEASE)
    return claimed.attempts


def _join(session, job_id: str, attempt: int, node: str) -> int | None:
    return workers.join_gang(session, job_id=job_id, attempt=attempt, worker_node=node, worker_id=f"{node}:1",
                             lease_seconds=LEASE)


def _state(session, job_id: str, attempt: int, rank: int, node: str) -> workers.GangState:
    return workers.renew_node(session, job_id=job_id, attempt=attempt, node_rank=rank, worker_id=f"{node}:1",
                              lease_seconds=LEASE)


def test_gang_is_complete_only_with_all_nodes(session, gang_job):
    job = gang_job(3)
    attempt = _lead(session, job, "a")
    assert workers.joinable_gang(session, worker_node="a") is None  # node 0 is in it already
    assert workers.joinable_gang(session, worker_node="b") == (job.id, attempt)
    assert _join(session, job.id, attempt, "b") == 1
    assert _join(session, job.id, attempt, "b") is None  # one slot per worker node
    state = _state(session, job.id, attempt, 0, "a")
    assert state.alive and state.members == 2 and not state.complete and state.endpoint == "a:29500"
    assert _join(session, job.id, attempt, "c") == 2
    for rank, node in enumerate("abc"):
        assert _state(session, job.id, attempt, rank, node).complete
    # Full: nobody else gets a slot.
    assert workers.joinable_gang(session, worker_node="d") is None
    assert _join(session, job.id, attempt, "d") is None


def test_gang_timeout_releases_slots_and_requeues_without_an_attempt(session, gang_job):
    job = gang_job(3)
    attempt = _lead(session, job, "a")
    assert _join(session, job.id, attempt, "b") == 1
    status = workers.release_gang(session, job_id=job.id, worker_id="a:1", cause="gang timeout", started=False,
                                  max_attempts=1)
    assert status == "queued"
    back = leases.get_job(session, job_id=job.id)
    assert back.attempts == 0 and back.lease_owner is None
    assert session.scalars(select(JobAttempt).where(JobAttempt.job_id == job.id)).all() == []
    assert session.scalars(select(JobNode).where(JobNode.job_id == job.id)).all() == []
    # The follower's next heartbeat says the gang is over; it cannot join again.
    assert not _state(session, job.id, attempt, 1, "b").alive
    assert _join(session, job.id, attempt, "c") is None
    # Only node 0's lease holder may release; a second release changes nothing.
    assert workers.release_gang(session, job_id=job.id, worker_id="a:1", cause="x", started=False, max_attempts=1) is None
    # Even with max_attempts=1 the job can still run: the released gang spent no attempt.
    assert _lead(session, job, "b") == 1


def test_released_after_start_spends_the_attempt(session, gang_job):
    job = gang_job(2)
    attempt = _lead(session, job, "a")
    assert _join(session, job.id, attempt, "b") == 1
    assert workers.release_gang(session, job_id=job.id, worker_id="a:1", cause="node 1 of 2 lost", started=True,
                                max_attempts=2) == "queued"
    back = leases.get_job(session, job_id=job.id)
    assert back.attempts == 1 and back.status == "queued"
    (row,) = session.scalars(select(JobAttempt).where(JobAttempt.job_id == job.id)).all()
    assert row.cause == "node 1 of 2 lost" and row.ended_at is not None
    # The next gang (any two workers) is attempt 2; out of attempts, the job fails.
    attempt = _lead(session, job, "c")
    assert attempt == 2 and _join(session, job.id, attempt, "a") == 1
    assert workers.release_gang(session, job_id=job.id, worker_id="c:1", cause="crash", started=True,
                                max_attempts=2) == "failed"
    failed = leases.get_job(session, job_id=job.id)
    assert failed.status == "failed" and "crash (after 2 attempts)" in failed.error


def test_release_of_a_cancelled_gang_cancels_the_job(session, gang_job):
    job = gang_job(2)
    attempt = _lead(session, job, "a")
    session.execute(update(Job).where(Job.id == job.id).values(cancel_requested=True))
    session.commit()
    assert workers.joinable_gang(session, worker_node="b") is None
    assert _join(session, job.id, attempt, "b") is None
    assert workers.release_gang(session, job_id=job.id, worker_id="a:1", cause="cancel requested", started=False,
                                max_attempts=3) == "cancelled"


def test_older_gang_takes_priority(session, gang_job):
    """Two 2-node jobs, two workers, each the node 0 of one job: the younger gang's node 0 sees the
    older gang gathering and yields; the older one completes. No deadlock, even at equal timestamps."""
    older, younger = gang_job(2), gang_job(2)
    same = utcnow()
    session.execute(update(Job).where(Job.id.in_([older.id, younger.id])).values(created_at=same))
    session.commit()
    older, younger = sorted((older, younger), key=lambda j: j.id)  # equal times: the id decides
    a_attempt, b_attempt = _lead(session, older, "a"), _lead(session, younger, "b")
    key = {j.id: (same, j.id) for j in (older, younger)}
    assert workers.joinable_gang(session, worker_node="a", older_than=key[older.id]) is None  # a keeps its gang
    assert workers.joinable_gang(session, worker_node="b", older_than=key[younger.id]) == (older.id, a_attempt)
    assert workers.release_gang(session, job_id=younger.id, worker_id="b:1", cause="an older job is gathering",
                                started=False, max_attempts=3) == "queued"
    assert _join(session, older.id, a_attempt, "b") == 1
    assert _state(session, older.id, a_attempt, 0, "a").complete
    assert leases.get_job(session, job_id=younger.id).status == "queued"
    assert b_attempt == 1


def test_lost_node_and_dead_leader(session, gang_job):
    job = gang_job(2)
    attempt = _lead(session, job, "a")
    assert _join(session, job.id, attempt, "b") == 1
    # Node 1's worker died: its slot is not renewed and expires; node 0's heartbeat names it.
    workers.renew_node(session, job_id=job.id, attempt=attempt, node_rank=1, worker_id="b:1", lease_seconds=-1)
    assert _state(session, job.id, attempt, 0, "a").lost == (1,)
    # A gang whose node 0 is dead gathers nobody.
    job2 = gang_job(2)
    attempt2 = _lead(session, job2, "c")
    workers.renew_node(session, job_id=job2.id, attempt=attempt2, node_rank=0, worker_id="c:1", lease_seconds=-1)
    assert workers.joinable_gang(session, worker_node="d") is None
    # A finished job's slots go: followers learn the gang is over.
    workers.clear_gang(session, job_id=job.id)
    assert not _state(session, job.id, attempt, 1, "b").alive


def test_follower_leaving_before_start_frees_its_slot(session, gang_job):
    job = gang_job(2)
    attempt = _lead(session, job, "a")
    assert _join(session, job.id, attempt, "b") == 1
    workers.leave_gang(session, job_id=job.id, attempt=attempt, node_rank=1, worker_id="b:1")
    assert workers.joinable_gang(session, worker_node="c") == (job.id, attempt)
    assert _join(session, job.id, attempt, "c") == 1


# --------------------------------------------------------------------------- devices of one worker


def _capacity(**overrides):
    from types import SimpleNamespace

    base = {"worker_devices": None, "worker_slots": None, "worker_cpu_devices": 4}
    return workers.detect_capacity(SimpleNamespace(**{**base, **overrides}))


def test_capacity_from_the_settings(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,6")
    assert _capacity(worker_devices="0, 2,3") == workers.Capacity("cuda", ("0", "2", "3"), 3)  # one job per GPU
    assert _capacity(worker_devices="0,1", worker_slots=1).slots == 1  # one job over both GPUs
    assert _capacity(worker_devices="0,1", worker_slots=8).slots == 2  # never more jobs than GPUs
    assert _capacity() == workers.Capacity("cuda", ("5", "6"), 2)  # the environment's GPUs
    assert _capacity(worker_devices="") == workers.Capacity("cpu", ("cpu0", "cpu1", "cpu2", "cpu3"), 1)


def _take_in_child(root, count, conn) -> None:
    from worker.node import DeviceSlots

    slots = DeviceSlots("node", workers.Capacity("cuda", ("0", "1", "2", "3"), 4), root=root)
    conn.send(slots.take(count))
    conn.recv()  # hold them until told (or killed)


def test_each_job_gets_its_own_devices(tmp_path):
    """Jobs of one worker run in different pool processes: each child sees only the GPUs its job
    locked; a process that dies frees its GPUs (fake GPU ids: no GPU needed)."""
    import multiprocessing

    from worker.node import DeviceSlots

    ctx = multiprocessing.get_context("fork")
    cap = workers.Capacity("cuda", ("0", "1", "2", "3"), 4)
    mine = DeviceSlots("node", cap, root=tmp_path)
    assert mine.take(2) == ["0", "1"] and mine.env() == {"CUDA_VISIBLE_DEVICES": "0,1"}
    parent, child = ctx.Pipe()
    other = ctx.Process(target=_take_in_child, args=(tmp_path, 2, child))
    other.start()
    assert parent.recv() == ["2", "3"]  # another job's process: the other two
    assert DeviceSlots("node", cap, root=tmp_path).take(1) is None  # all four are held
    other.kill()
    other.join()
    again = DeviceSlots("node", cap, root=tmp_path)
    assert again.take(3) is None and again.held == []  # all or none
    assert again.take(2) == ["2", "3"]  # the killed process's GPUs are free again
    mine.give_back()
    assert DeviceSlots("node", cap, root=tmp_path).take(2) == ["0", "1"]
    cpu = DeviceSlots("node", workers.Capacity("cpu", ("cpu0",), 1), root=tmp_path)
    assert cpu.take(1) == ["cpu0"] and cpu.env() == {}  # CPU slots leave CUDA_VISIBLE_DEVICES alone
