"""``GET /v1/jobs/{id}/logs``: the training child's log, readable while the job runs (the file the
worker writes into the shared data directory), tail, follow until the job ends, attempts in order."""

from __future__ import annotations

import threading

import httpx

from gid_core.jobdir import JobDir
from service import leases
from tests.service.test_events import live, submit  # noqa: F401  (fixture)
from tests.worker.helpers import wait_until


def attempt_log(api, job_id: str, attempt: int):
    path = JobDir(api.settings.data_dir / "jobs" / job_id).attempt_log(attempt)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def append(path, text: str) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)


def test_log_while_running_and_after(api, live):  # noqa: F811
    job_id = submit(api)
    assert api.get(f"/v1/jobs/{job_id}/logs").text == ""  # queued: nothing yet
    with api.session() as s:
        leases.claim_job(s, job_id=job_id, worker_id="w", lease_seconds=60)
    log = attempt_log(api, job_id, 1)
    append(log, "".join(f"line {i} é\n" for i in range(10)))

    r = api.get(f"/v1/jobs/{job_id}/logs")  # while running: no artifact yet, the file itself
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert r.text.splitlines() == [f"line {i} é" for i in range(10)]
    assert api.get(f"/v1/jobs/{job_id}/logs", params={"tail": 3}).text == "line 7 é\nline 8 é\nline 9 é\n"
    assert api.get(f"/v1/jobs/{job_id}/logs", params={"tail": 0}).text == ""

    # follow: the tail, then what is written, until the job ends.
    received: list[str] = []

    def follow() -> None:
        with httpx.stream("GET", f"{live}/v1/jobs/{job_id}/logs", params={"tail": 1, "follow": "true"},
                          headers=api.auth(), timeout=30) as r:
            received.extend(r.iter_text())

    reader = threading.Thread(target=follow)
    reader.start()
    wait_until(lambda: "".join(received) == "line 9 é\n", 10, "the tail")
    append(log, "step 11\n")
    wait_until(lambda: "step 11" in "".join(received), 10, "a line written while following")
    # The worker restarts the training: a new attempt's log follows a header line.
    with api.session() as s:
        assert leases.restart_attempt(s, job_id=job_id, worker_id="w", cause="killed", lease_seconds=60,
                                      max_attempts=3) == 2
    append(attempt_log(api, job_id, 2), "resumed\n")
    wait_until(lambda: "resumed" in "".join(received), 10, "the second attempt's log")
    assert reader.is_alive()
    append(attempt_log(api, job_id, 2), "last words\n")
    with api.session() as s:
        leases.finish_job(s, job_id=job_id, worker_id="w", status="succeeded")
    reader.join(timeout=10)
    assert not reader.is_alive(), "follow did not end with the job"
    assert "".join(received) == "line 9 é\nstep 11\n==> attempt 2 <==\nresumed\nlast words\n"

    # After the end: both attempts, in order.
    text = api.get(f"/v1/jobs/{job_id}/logs").text
    assert text.startswith("==> attempt 1 <==\nline 0 é\n") and text.endswith("==> attempt 2 <==\nresumed\nlast words\n")
    assert api.get(f"/v1/jobs/{job_id}/logs", params={"tail": 2, "follow": "true"}).text == "resumed\nlast words\n"


def test_log_access_and_parameters(api):
    job_id = submit(api)
    assert api.get(f"/v1/jobs/{job_id}/logs", "bob").status_code == 404
    assert api.client.get(f"/v1/jobs/{job_id}/logs").status_code == 401
    r = api.get(f"/v1/jobs/{job_id}/logs", params={"tail": -1})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "tail"]
