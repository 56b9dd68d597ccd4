"""Multi-node jobs over real processes: ``gid up --workers 2`` (two Celery worker nodes on this
machine), torch elastic c10d rendezvous between them, gloo. Tiny models and images."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import time

import pytest
import torch
from safetensors.torch import load_file

from gid.embedded import EmbeddedStack
from gid_core.config import SyntheticDatasetConfig
from gid_core.processes import free_port
from gid_core.synthetic import make_synthetic_dataset
from tests.worker.conftest import STACK_ENV
from tests.worker.helpers import LEASE_SECONDS, NUM_CLASSES, Api, job_body, processes_in, wait_until

pytestmark = pytest.mark.slow

GANG_TIMEOUT = 12
GANG_ENV = {**STACK_ENV, "GID_GANG_TIMEOUT_SECONDS": str(GANG_TIMEOUT), "GID_RENDEZVOUS_TIMEOUT_SECONDS": "20"}


@pytest.fixture(scope="module")
def gang(tmp_path_factory) -> Iterator[EmbeddedStack]:
    data_dir = tmp_path_factory.mktemp("gang") / "data"
    s = EmbeddedStack(data_dir, port=free_port(), extra_env=GANG_ENV, startup_timeout=180, workers=2)
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def gapi(gang: EmbeddedStack) -> Iterator[Api]:
    client = Api(gang)
    wait_until(lambda: _live_workers(gang) == 2,
               60, "both workers registered")
    yield client
    client.http.close()


def _live_workers(stack: EmbeddedStack) -> int:
    from service import workers
    from service.core.db import make_engine, make_session_factory, session_scope

    engine = make_engine(stack.database_url)
    try:
        with session_scope(make_session_factory(engine)) as s:
            return len(workers.live_workers(s, stale_seconds=30))
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def gdatasets(gang: EmbeddedStack, gapi: Api) -> dict[str, str]:
    cfg = SyntheticDatasetConfig(output_dir=gang.data_dir / "synthetic", num_train=8, num_val=4, image_size=64,
                                 num_classes=NUM_CLASSES, max_objects=3, seed=0)
    paths = make_synthetic_dataset(cfg)
    return {split: gapi.post("/v1/datasets", json={"name": f"tiny-{split}", "annotations": paths[f"{split}_annotations"],
                                                   "images": paths[f"{split}_images"]})["id"]
            for split in ("train", "val")}


@pytest.fixture(scope="module")
def teacher_id(gapi: Api, gdatasets: dict[str, str]) -> str:
    job = gapi.post("/v1/jobs", json=job_body("train", gdatasets, name="teacher", max_iters=4))
    job = gapi.wait_terminal(job["id"])
    assert job["status"] == "succeeded", job["error"]
    return job["output_model_id"]


def distill(gapi: Api, gdatasets, teacher_id: str, *, nodes: int, devices: int, name: str, **hp: Any) -> dict:
    body = job_body("distill", gdatasets, teacher=teacher_id, name=name, **{"max_iters": 8, **hp})
    body["resources"] = {"nodes": nodes, "devices": devices}
    return gapi.post("/v1/jobs", json=body)


def test_two_nodes_equal_one_node_with_two_devices(gang, gapi, gdatasets, teacher_id):
    two_nodes = gapi.wait_terminal(distill(gapi, gdatasets, teacher_id, nodes=2, devices=1, name="n2d1")["id"])
    assert two_nodes["status"] == "succeeded", two_nodes["error"]
    one_node = gapi.wait_terminal(distill(gapi, gdatasets, teacher_id, nodes=1, devices=2, name="n1d2")["id"])
    assert one_node["status"] == "succeeded", one_node["error"]

    losses = [gapi.get(f"/v1/jobs/{j['id']}/metrics")["series"]["total_loss"] for j in (two_nodes, one_node)]
    assert losses[0]["steps"] == losses[1]["steps"] == [4, 8]
    assert losses[0]["values"] == pytest.approx(losses[1]["values"], rel=1e-4, abs=1e-5)
    weights = [load_file(Path(gang.data_dir) / "jobs" / j["id"] / "export" / "model.safetensors")
               for j in (two_nodes, one_node)]
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], rtol=1e-4, atol=1e-5)
    names = {a["name"] for a in gapi.get(f"/v1/jobs/{two_nodes['id']}/artifacts")}
    assert {"attempt-1.node0.log", "attempt-1.node1.log"} <= names, names


# --------------------------------------------------------------------------- faults


def train(gapi: Api, gdatasets, *, nodes: int, name: str, **hp: Any) -> dict:
    body = job_body("train", gdatasets, name=name, **hp)
    body["resources"] = {"nodes": nodes, "devices": 1}
    return gapi.post("/v1/jobs", json=body)


def _slots(gang: EmbeddedStack, job_id: str) -> dict[int, str]:
    """node rank -> worker node name of the job's current gang."""
    from sqlalchemy import select

    from service.core.db import make_engine, make_session_factory, session_scope
    from service.models import JobNode

    engine = make_engine(gang.database_url)
    try:
        with session_scope(make_session_factory(engine)) as s:
            return {n.node_rank: n.worker_node for n in s.scalars(select(JobNode).where(JobNode.job_id == job_id))}
    finally:
        engine.dispose()


def _wait_no_processes(directory: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while processes_in(directory):
        assert time.monotonic() < deadline, f"left running in {directory}: {processes_in(directory)}"
        time.sleep(0.2)


def test_killed_node_resumes_from_checkpoint_on_two_workers(gang, gapi, gdatasets):
    job = train(gapi, gdatasets, nodes=2, name="kill-node", max_iters=400, checkpoint_period=4)
    gapi.wait_for(job["id"], lambda j: j["progress"].get("iteration", 0) >= 6, 180, "a checkpoint")
    follower = _slots(gang, job["id"])[1]
    name = next(n for n in gang.worker_names if gang.worker_node_of(n) == follower)
    gang.stop_worker(name, kill=True)  # node 1's worker dies with its ranks
    # Node 0 stops promptly (its ranks lose their peer, or node 1's slot expires) and gives the
    # job back; it resumes on two workers once the dead one is back.
    gapi.wait_for(job["id"], lambda j: len(j["attempt_history"]) >= 1 and j["attempt_history"][0]["ended_at"],
                  LEASE_SECONDS + 40, "the first attempt ended")
    _wait_no_processes(Path(gang.data_dir) / "jobs" / job["id"], 20)
    gang.start_worker(name)
    resumed = gapi.wait_for(job["id"], lambda j: j["progress"].get("attempt") == 2, 120, "attempt 2")
    assert resumed["progress"]["start_iteration"] >= 4
    gapi.post(f"/v1/jobs/{job['id']}/cancel", expect=200)  # the resume is what matters: no need to finish 400
    done = gapi.wait_terminal(job["id"])
    assert done["status"] == "cancelled", done["error"]
    assert len(_nodes_logged(gapi, job["id"], attempt=2)) == 2


def _nodes_logged(gapi: Api, job_id: str, *, attempt: int) -> set[str]:
    return {a["name"] for a in gapi.get(f"/v1/jobs/{job_id}/artifacts") if a["name"].startswith(f"attempt-{attempt}.node")}


def test_cancel_stops_every_node(gang, gapi, gdatasets):
    job = train(gapi, gdatasets, nodes=2, name="cancel-nodes", max_iters=10_000)
    gapi.wait_for(job["id"], lambda j: j["progress"].get("iteration", 0) >= 1, 180, "training")
    assert len(_slots(gang, job["id"])) == 2
    gapi.post(f"/v1/jobs/{job['id']}/cancel", expect=200)
    done = gapi.wait_terminal(job["id"], timeout=60)
    assert done["status"] == "cancelled" and len(done["attempt_history"]) == 1
    _wait_no_processes(Path(gang.data_dir) / "jobs" / job["id"], 20)  # every node's ranks
    assert _slots(gang, job["id"]) == {}


def test_gang_timeout_requeues_then_runs(gang, gapi, gdatasets):
    """One worker is busy: the 2-node job cannot gather, goes back to the queue after the gang
    timeout (spending no attempt) and runs once both workers are free."""
    blocker = train(gapi, gdatasets, nodes=1, name="blocker", max_iters=10_000)
    gapi.wait_for(blocker["id"], lambda j: j["progress"].get("iteration", 0) >= 1, 120, "blocker running")
    job = train(gapi, gdatasets, nodes=2, name="gang-timeout", max_iters=4)
    logs = [gang.logs_dir / f"{n}.log" for n in gang.worker_names]
    wait_until(lambda: any(f"job {job['id']}: gang not started (gang timeout" in p.read_text() for p in logs),
               GANG_TIMEOUT + 60, "a gang timeout")
    # Released without spending an attempt (it may be gathering again already, as attempt 1).
    assert [a["number"] for a in gapi.job(job["id"])["attempt_history"]] in ([], [1])
    gapi.post(f"/v1/jobs/{blocker['id']}/cancel", expect=200)
    done = gapi.wait_terminal(job["id"], timeout=240)
    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] == 1 and len(done["attempt_history"]) == 1
