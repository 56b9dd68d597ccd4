"""``GET /v1/jobs/{id}/events``: Server-Sent Events in order, live, resumable with Last-Event-ID;
the final evaluation is a point of the metric series. Real uvicorn, real database (SQLite and
PostgreSQL), the real lease protocol the worker runs."""

from __future__ import annotations

import threading

import httpx
import pytest

from gid.client import Client, parse_sse
from service import leases
from service.main import create_app
from tests.service.helpers import TINY_MODEL
from tests.service.live import serve
from tests.worker.helpers import wait_until

FINAL = {"AP": 41.5, "AP50": 70.25, "AP75": 40.0, "per_category": [{"name": "class_0", "AP": 39.0}], "num_images": 3}


@pytest.fixture
def live(api):
    """The app of ``api``'s settings under uvicorn (a stream needs a real server), quick polls."""
    api.configure(events_poll_seconds=0.05, events_keepalive_seconds=0.2)
    with serve(create_app(api.settings)) as url:
        yield url


def submit(api, **extra) -> str:
    dataset = api.register_dataset(num_classes=2)
    body = {"kind": "train", "name": "ev", "student": dict(TINY_MODEL), "train_dataset": dataset, **extra}
    r = api.post("/v1/jobs", json=body)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def run_like_the_worker(api, job_id: str) -> None:
    """Claim, progress, two metric batches and success with final metrics at iteration 8."""
    with api.session() as s:
        assert leases.claim_job(s, job_id=job_id, worker_id="w", lease_seconds=60) is not None
        assert leases.update_progress(s, job_id=job_id, worker_id="w", progress={"iteration": 4, "max_iters": 8})
        leases.add_metric_points(s, job_id=job_id, points=[("total_loss", 4, 2.0), ("lr", 4, 0.01)])
        leases.add_metric_points(s, job_id=job_id, points=[("total_loss", 8, 1.5)])
        assert leases.finish_job(s, job_id=job_id, worker_id="w", status="succeeded", final_metrics=FINAL,
                                 final_step=8)


def read_events(url: str, api, job_id: str, headers: dict | None = None) -> tuple[list, int]:
    """Every event of a (finished) job's stream and the number of keep-alive comments."""
    with httpx.stream("GET", f"{url}/v1/jobs/{job_id}/events", headers=api.auth(**(headers or {})), timeout=30) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        parsed = list(parse_sse(r.iter_lines()))
    return [e for e in parsed if e is not None], sum(e is None for e in parsed)


def test_events_in_order_then_resume_after_last_event_id(api, live):
    job_id = submit(api)
    run_like_the_worker(api, job_id)

    events, _ = read_events(live, api, job_id)
    ids = [e.id for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert [(e.event, e.data.get("status")) for e in events] == [
        ("status", "queued"), ("status", "running"), ("progress", None), ("metric", None), ("metric", None),
        ("final", None), ("status", "succeeded"),
    ]
    assert events[1].data["attempt"] == 1
    assert events[2].data == {"iteration": 4, "max_iters": 8}
    assert events[3].data == {"step": 4, "values": {"lr": 0.01, "total_loss": 2.0}}
    assert events[5].data == {"step": 8, "metrics": FINAL}

    # Reconnecting after any event gives exactly the rest, by header or by query.
    for k in range(len(events)):
        rest, _ = read_events(live, api, job_id, {"Last-Event-ID": str(events[k].id)})
        assert rest == events[k + 1:]
    with httpx.stream("GET", f"{live}/v1/jobs/{job_id}/events", params={"after": events[3].id},
                      headers=api.auth(), timeout=30) as r:
        assert [e for e in parse_sse(r.iter_lines()) if e] == events[4:]

    # The final evaluation is a point of the series, at the last iteration.
    series = api.get(f"/v1/jobs/{job_id}/metrics").json()["series"]
    assert series["eval/AP"] == {"steps": [8], "values": [41.5], "count": 1, "downsampled": False}
    assert series["eval/per_category/class_0/AP"]["values"] == [39.0]


def test_events_arrive_live_and_the_stream_ends_with_the_job(api, live):
    job_id = submit(api)
    seen: list = []
    comments = []

    def listen() -> None:
        with httpx.stream("GET", f"{live}/v1/jobs/{job_id}/events", headers=api.auth(), timeout=30) as r:
            for event in parse_sse(r.iter_lines()):
                (seen if event is not None else comments).append(event)

    reader = threading.Thread(target=listen)
    reader.start()
    wait_until(lambda: seen, 10, "the queued event")
    wait_until(lambda: len(comments) >= 2, 10, "keep-alive comments while idle")
    with api.session() as s:
        leases.claim_job(s, job_id=job_id, worker_id="w", lease_seconds=60)
    wait_until(lambda: len(seen) == 2, 10, "the running event, while the job runs")
    assert reader.is_alive()
    with api.session() as s:
        leases.update_progress(s, job_id=job_id, worker_id="w", progress={"iteration": 1, "max_iters": 8})
        leases.finish_job(s, job_id=job_id, worker_id="w", status="failed", error="RuntimeError: boom")
    reader.join(timeout=10)
    assert not reader.is_alive(), "the stream did not end with the job"
    assert [e.event for e in seen] == ["status", "status", "progress", "status"]
    assert seen[-1].data == {"status": "failed", "error": "RuntimeError: boom"}


def test_cancel_events_and_access(api, live):
    job_id = submit(api)
    assert api.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
    events, _ = read_events(live, api, job_id)
    assert [e.data["status"] for e in events] == ["queued", "cancelled"]

    r = httpx.get(f"{live}/v1/jobs/{job_id}/events", headers=api.auth("bob"), timeout=10)
    assert r.status_code == 404  # another owner's job
    r = httpx.get(f"{live}/v1/jobs/{job_id}/events", timeout=10)
    assert r.status_code == 401


def test_client_wait_for_job_follows_events(api, live):
    job_id = submit(api)
    states: list[tuple[str, int]] = []
    client = Client(live, api.tokens["alice"])
    result: dict = {}
    waiter = threading.Thread(target=lambda: result.update(client.wait_for_job(
        job_id, interval=60, on_update=lambda j: states.append((j["status"], j["progress"].get("iteration", 0))))))
    waiter.start()
    wait_until(lambda: states, 10, "the first state")
    run_like_the_worker(api, job_id)
    waiter.join(timeout=20)
    client.close()
    assert not waiter.is_alive()
    # interval=60: a poll would have taken a minute; the changes came from the stream.
    assert ("running", 0) in states and ("running", 4) in states
    assert result["status"] == "succeeded" and result["final_metrics"]["AP"] == 41.5
