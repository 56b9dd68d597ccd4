"""Job webhooks: a real local HTTP receiver that fails the first call; the sweep the worker runs
(``service.webhooks.deliver_due``) retries it with back-off, signs it, stops after the limit.

The receiver listens on loopback, which webhooks may only call with ``webhook_allow_private``: this
module's ``settings`` allow it, and the tests of the refusals take it away again."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from service import webhooks
from service.models import Job, WebhookDelivery
from tests.service.helpers import TINY_MODEL
from tests.service.test_events import run_like_the_worker, submit

SECRET = "a-webhook-secret-of-some-length"


class Receiver:
    """Records every request; answers ``statuses`` in turn (then 200)."""

    def __init__(self, statuses: list[int]) -> None:
        self.requests: list[tuple[dict, bytes]] = []
        self.statuses = list(statuses)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                if 300 <= status < 400:  # a redirect to a path that would accept it
                    self.send_header("Location", "/elsewhere")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def settings(settings):
    """The receiver is on loopback: allowed here, refused by default."""
    return settings.model_copy(update={"webhook_allow_private": True})


@pytest.fixture
def receiver():
    r = Receiver([500])
    yield r
    r.close()


def sweep(api, **settings):
    with api.session() as s:
        return webhooks.deliver_due(s, settings=api.settings.model_copy(update=settings))


def test_terminal_state_calls_the_webhook_signed_with_a_retry(api, receiver):
    job_id = submit(api, webhook_url=receiver.url)
    assert api.get(f"/v1/jobs/{job_id}").json()["config"]["webhook_url"] == receiver.url
    assert sweep(api, webhook_secret=SECRET) == []  # nothing while the job runs
    run_like_the_worker(api, job_id)

    first = sweep(api, webhook_secret=SECRET, webhook_backoff_seconds=0)
    assert [(a.attempt, a.delivered, a.error) for a in first] == [(1, False, "HTTP 500")]
    second = sweep(api, webhook_secret=SECRET, webhook_backoff_seconds=0)
    assert [(a.attempt, a.delivered) for a in second] == [(2, True)]
    assert sweep(api, webhook_secret=SECRET, webhook_backoff_seconds=0) == []  # delivered once

    assert len(receiver.requests) == 2
    headers, raw = receiver.requests[-1]
    expected = "sha256=" + hmac.new(SECRET.encode(), raw, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["x-gid-signature-256"], expected)
    assert headers["x-gid-event"] == "job.finished" and headers["content-type"] == "application/json"
    body = json.loads(raw)
    assert body["event"] == "job.finished" and body["job"]["id"] == job_id
    assert body["job"]["status"] == "succeeded" and body["job"]["final_metrics"]["AP"] == 41.5


def test_back_off_and_bounded_attempts(api, receiver):
    receiver.statuses = [503] * 10
    job_id = submit(api, webhook_url=receiver.url)
    assert api.post(f"/v1/jobs/{job_id}/cancel").status_code == 200  # the API ends it: queued -> cancelled

    assert [a.delivered for a in sweep(api, webhook_backoff_seconds=3600)] == [False]
    assert sweep(api, webhook_backoff_seconds=3600) == []  # not due again before its back-off
    with api.session() as s:  # make it due now, twice more: the limit of 3 calls is reached
        for _ in range(2):
            s.query(WebhookDelivery).update({"next_attempt_at": WebhookDelivery.created_at})
            s.commit()
            webhooks.deliver_due(s, settings=api.settings.model_copy(update={"webhook_max_attempts": 3}))
        delivery = s.query(WebhookDelivery).one()
        assert delivery.attempts == 3 and delivery.failed_at is not None and delivery.last_error == "HTTP 503"
    assert len(receiver.requests) == 3
    assert "x-gid-signature-256" not in receiver.requests[0][0]  # no secret configured: unsigned
    assert json.loads(receiver.requests[0][1])["job"]["status"] == "cancelled"


def test_webhook_url_is_validated(api):
    for bad in ("ftp://example.com/x", "not a url", "http://" + "a" * 2001 + ".com"):
        r = api.post("/v1/jobs", json={"kind": "train", "student": {"arch": "retinanet", "backbone": "resnet18",
                                                                   "num_classes": 2},
                                       "train_dataset": "x", "webhook_url": bad})
        assert r.status_code == 422 and ["body", "webhook_url"] in [e["loc"] for e in r.json()["detail"]], r.text


BODY = {"kind": "train", "student": {"arch": "retinanet", "backbone": "resnet18", "num_classes": 2}, "train_dataset": "x"}


@pytest.fixture
def strict_api(api):
    """The API with the default: webhooks call public addresses only."""
    api.configure(webhook_allow_private=False)
    return api


@pytest.mark.parametrize("host", [
    "127.0.0.1", "10.1.2.3", "192.168.0.7", "169.254.169.254", "[fe80::1]", "224.0.0.1", "0.0.0.0", "[::]",
    "[::1]", "[::ffff:127.0.0.1]", "2130706433", "localhost",
])
def test_private_ip_literals_are_refused_at_submission(strict_api, host):
    r = strict_api.post("/v1/jobs", json={**BODY, "webhook_url": f"http://{host}:8080/hook"})
    assert r.status_code == 422, r.text
    [error] = [e for e in r.json()["detail"] if e["loc"] == ["body", "webhook_url"]]
    assert "address" in error["msg"] and "GID_WEBHOOK_ALLOW_PRIVATE" in error["msg"]


def test_a_public_ip_literal_is_accepted_and_called_at_that_address(strict_api):
    assert submit(strict_api, webhook_url="http://93.184.216.34/hook")
    target, refusal = webhooks.pinned_target("https://93.184.216.34:8443/h?x=1", allow_private=False)
    assert refusal is None and str(target) == "https://93.184.216.34:8443/h?x=1"


def test_a_name_resolving_to_loopback_is_not_called(api, receiver):
    job_id = submit(api, webhook_url=receiver.url.replace("127.0.0.1", "localhost"))  # allowed at submission here
    assert api.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
    [attempt] = sweep(api, webhook_allow_private=False, webhook_backoff_seconds=0)
    assert not attempt.delivered and "localhost resolves to" in attempt.error and "loopback" in attempt.error
    assert receiver.requests == []
    with api.session() as s:  # failed at once, with why: no retry can change the address
        delivery = s.query(WebhookDelivery).one()
        assert delivery.failed_at is not None and delivery.attempts == 1 and delivery.last_error == attempt.error
    assert sweep(api, webhook_allow_private=False, webhook_backoff_seconds=0) == []
    assert receiver.requests == []


def test_redirects_are_not_followed(api, receiver):
    receiver.statuses = [307, 302]
    job_id = submit(api, webhook_url=receiver.url)
    assert api.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
    assert [a.error for a in sweep(api, webhook_backoff_seconds=0)] == ["HTTP 307"]
    assert [a.error for a in sweep(api, webhook_backoff_seconds=0)] == ["HTTP 302"]
    assert [a.delivered for a in sweep(api, webhook_backoff_seconds=0)] == [True]
    assert [h["host"] for h, _ in receiver.requests] == [receiver.url.split("/")[2]] * 3  # never /elsewhere
    assert len(receiver.requests) == 3


JOB_SECRET = "this-jobs-own-webhook-secret"


def test_a_jobs_own_secret_signs_and_is_never_returned(api, receiver):
    receiver.statuses = []
    job_id = submit(api, webhook_url=receiver.url, webhook_secret=JOB_SECRET)
    for r in (api.get(f"/v1/jobs/{job_id}"), api.get("/v1/jobs")):
        assert r.status_code == 200 and JOB_SECRET not in r.text and "webhook_secret" not in r.text
    with api.session() as s:
        job = s.get(Job, job_id)
        assert job.webhook_secret == JOB_SECRET and "webhook_secret" not in job.config
    run_like_the_worker(api, job_id)
    assert [a.delivered for a in sweep(api, webhook_secret=SECRET)] == [True]
    headers, raw = receiver.requests[0]
    expected = "sha256=" + hmac.new(JOB_SECRET.encode(), raw, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["x-gid-signature-256"], expected)  # the job's, not the server's


def test_webhook_secret_is_checked_and_part_of_an_idempotent_replay(api, receiver):
    for extra in ({"webhook_secret": JOB_SECRET}, {"webhook_url": receiver.url, "webhook_secret": "short"}):
        r = api.post("/v1/jobs", json={**BODY, **extra})
        assert r.status_code == 422 and ["body", "webhook_secret"] in [e["loc"] for e in r.json()["detail"]], r.text
    dataset = api.register_dataset(num_classes=2)
    body = {**BODY, "student": dict(TINY_MODEL), "train_dataset": dataset, "webhook_url": receiver.url, "webhook_secret": JOB_SECRET}
    key = {"Idempotency-Key": "webhook-secret-replay"}
    assert api.post("/v1/jobs", json=body, headers=key).status_code == 201
    assert api.post("/v1/jobs", json=body, headers=key).status_code == 200
    other = {**body, "webhook_secret": JOB_SECRET + "-other"}
    assert api.post("/v1/jobs", json=other, headers=key).status_code == 409
