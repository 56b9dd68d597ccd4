"""``GET /metrics``: the Prometheus text format, parsed by prometheus-client's own parser and
checked against the database state the test creates; request latency counts across several real
API processes (``gid serve --workers 2``: multiprocess mode)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gid_core.processes import free_port
from service import workers
from tests.service.helpers import TINY_MODEL, finish_like_the_worker

JOB_ROUTE = "/v1/jobs/{job_id}"


def scrape(get) -> dict[str, dict[tuple, float]]:
    """``{sample name: {sorted label items: value}}`` of one scrape."""
    r = get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


def value(samples, name: str, **labels) -> float:
    return samples[name].get(tuple(sorted(labels.items())), 0.0)


def latency_count(samples, route: str, method: str = "GET", status: str = "200") -> float:
    return value(samples, "gid_http_request_duration_seconds_count", route=route, method=method, status=status)


def train_body(dataset_id: str) -> dict:
    return {"kind": "train", "student": dict(TINY_MODEL), "train_dataset": dataset_id,
            "hyperparameters": {"max_iters": 2, "batch_size": 1, "num_workers": 0}}


def test_metrics_follow_the_database(api):
    dataset = api.register_dataset()
    ids = [api.post("/v1/jobs", json=train_body(dataset)).json()["id"] for _ in range(3)]
    m = scrape(api.client.get)  # open by default: no token
    assert value(m, "gid_jobs", status="queued", kind="train") == 3
    assert value(m, "gid_jobs", status="running", kind="distill") == 0  # every status x kind is present
    assert value(m, "gid_queue_depth") == 3
    assert value(m, "gid_queue_oldest_age_seconds") >= 0

    assert api.post(f"/v1/jobs/{ids[0]}/cancel").status_code == 200
    finish_like_the_worker(api, ids[1])
    with api.session() as s:
        workers.register_worker(s, worker_node="node-a", address="h", kind="cpu", devices=["0"], slots=1)
    m = scrape(api.client.get)
    assert value(m, "gid_jobs", status="queued", kind="train") == 1
    assert value(m, "gid_jobs", status="cancelled", kind="train") == 1
    assert value(m, "gid_jobs", status="succeeded", kind="train") == 1
    assert value(m, "gid_queue_depth") == 1
    # the finished job's duration; a job cancelled before it started has none
    assert value(m, "gid_job_duration_seconds_count", kind="train", status="succeeded") == 1
    assert value(m, "gid_job_duration_seconds_bucket", kind="train", status="succeeded", le="+Inf") == 1
    assert value(m, "gid_job_duration_seconds_count", kind="train", status="cancelled") == 0
    assert value(m, "gid_job_attempts_total", outcome="succeeded") == 1
    assert value(m, "gid_job_attempts_total", outcome="running") == 0
    assert value(m, "gid_workers_registered") == 1
    assert 0 <= value(m, "gid_worker_heartbeat_age_seconds", worker="node-a", kind="cpu") < 60
    assert value(m, "gid_worker_slots", worker="node-a", kind="cpu") == 1


def test_request_latency_counts_grow_by_route_template(api):
    job = api.post("/v1/jobs", json=train_body(api.register_dataset())).json()["id"]
    before = scrape(api.client.get)
    for _ in range(3):
        assert api.get(f"/v1/jobs/{job}").status_code == 200
    assert api.get("/v1/jobs/not-a-job").status_code == 404
    api.client.get("/no/such/path")
    after = scrape(api.client.get)
    assert latency_count(after, JOB_ROUTE) - latency_count(before, JOB_ROUTE) == 3
    assert latency_count(after, JOB_ROUTE, status="404") - latency_count(before, JOB_ROUTE, status="404") == 1
    assert not any(dict(labels)["route"].startswith("/no/") for labels in after["gid_http_request_duration_seconds_count"])
    # the previous scrape is counted too, under its own route
    assert latency_count(after, "/metrics") >= 1


def test_metrics_token(api):
    api.configure(metrics_token="m" * 20)
    assert api.client.get("/metrics").status_code == 401
    assert api.client.get("/metrics", headers={"Authorization": "Bearer wrong-token-xxxxxxx"}).status_code == 401
    scrape(lambda url: api.client.get(url, headers={"Authorization": "Bearer " + "m" * 20}))


@pytest.mark.slow
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_request_counts_add_up_across_api_processes(db_url, tmp_path: Path):
    """Two uvicorn processes accept on one socket; whichever answers a scrape reports the sum of
    both processes' counts (multiprocess mode, files under ``<data_dir>/prometheus``)."""
    port, data_dir = free_port(), tmp_path / "data"
    env = {**os.environ, "GID_DATA_DIR": str(data_dir), "GID_DATABASE_URL": db_url, "OMP_NUM_THREADS": "1"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    stale = data_dir / "prometheus" / "histogram_1.db"  # a previous run's file: removed at start
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"x")
    server = subprocess.Popen([sys.executable, "-m", "gid", "serve", "--port", str(port), "--workers", "2"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        probes = _wait_until_up(url, server)
        n = 12
        for _ in range(n):  # a fresh connection each time, so either process may answer
            with httpx.Client(base_url=url) as c:
                assert c.get("/healthz").status_code == 200
        for _ in range(6):
            with httpx.Client(base_url=url) as c:
                assert latency_count(scrape(c.get), "/healthz") == n + probes
        assert not stale.exists()
    finally:
        server.terminate()
        server.wait(timeout=30)


def _wait_until_up(url: str, server: subprocess.Popen, timeout: float = 90.0) -> int:
    """Poll ``/healthz`` until it answers; returns how many 200s it got (one)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.poll() is None, "gid serve exited"
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return 1
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"gid serve did not answer within {timeout} s")
