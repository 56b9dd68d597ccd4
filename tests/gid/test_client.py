"""``gid.client`` against a fake API (``httpx.MockTransport``): errors arrive as data, downloads are
checked, waiting stops at a terminal status, and the client needs none of the server's libraries."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from gid.client import ApiError, Client, ClientError, NoTokenError, WaitTimeout

PROBLEMS = [{"loc": ["body", "teacher", "model_id"], "msg": "model 'x' not found", "type": "value_error"}]


def client_for(handler) -> Client:
    return Client("http://gid.test", "t0ken", transport=httpx.MockTransport(handler))


def test_http_errors_carry_status_and_structured_detail():
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"] == "Bearer t0ken"
        if request.url.path == "/v1/jobs":
            return httpx.Response(422, json={"detail": PROBLEMS})
        return httpx.Response(502, text="<html>bad gateway</html>")

    client = client_for(handler)
    with pytest.raises(ApiError) as refused:
        client.submit_job({"kind": "distill"})
    assert refused.value.status_code == 422 and refused.value.detail == PROBLEMS
    assert (refused.value.method, refused.value.path) == ("POST", "/v1/jobs")
    assert str(refused.value) == "HTTP 422: body.teacher.model_id: model 'x' not found"
    with pytest.raises(ApiError) as proxy:
        client.get_job("j1")
    assert proxy.value.status_code == 502 and proxy.value.detail == "<html>bad gateway</html>"


def test_from_environment_prefers_arguments_then_variables_then_the_data_dir(tmp_path: Path, monkeypatch):
    for name in ("GID_URL", "GID_TOKEN", "GID_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(NoTokenError) as missing:
        Client.from_environment(data_dir=tmp_path)
    assert missing.value.token_path == tmp_path / "token"

    (tmp_path / "url").write_text("http://from-file:1\n")
    (tmp_path / "token").write_text("file-token\n")
    monkeypatch.setenv("GID_DATA_DIR", str(tmp_path))
    client = Client.from_environment()
    assert client.url == "http://from-file:1" and client.http.headers["authorization"] == "Bearer file-token"
    monkeypatch.setenv("GID_URL", "http://from-env:2")
    assert Client.from_environment().url == "http://from-env:2"
    client = Client.from_environment(url="http://arg:3", token="arg-token")
    assert client.url == "http://arg:3" and client.http.headers["authorization"] == "Bearer arg-token"


def test_download_checks_the_sha256_and_is_all_or_nothing(tmp_path: Path):
    payload = b"weights" * 1000
    good = hashlib.sha256(payload).hexdigest()

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/missing":
            return httpx.Response(404, json={"detail": "artifact not found"})
        etag = good if request.url.path == "/good" else "0" * 64
        return httpx.Response(200, content=payload, headers={"ETag": f'"{etag}"'})

    client = client_for(handler)
    assert client.download("/good", tmp_path / "out" / "model.bin") == (len(payload), good)
    assert (tmp_path / "out" / "model.bin").read_bytes() == payload
    with pytest.raises(ClientError, match="corrupt"):
        client.download("/corrupt", tmp_path / "corrupt.bin")
    with pytest.raises(ApiError) as missing:
        client.download("/missing", tmp_path / "missing.bin")
    assert missing.value.status_code == 404 and missing.value.detail == "artifact not found"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no partial files left


def test_wait_for_job_reports_every_state_and_stops_at_a_terminal_one():
    states = iter(["queued", "running", "running", "succeeded", "unreachable"])

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events"):  # a server without the event stream: the client polls
            return httpx.Response(404, json={"detail": "Not Found"})
        return httpx.Response(200, json={"id": "j1", "status": next(states)})

    seen = []
    job = client_for(handler).wait_for_job("j1", interval=0, on_update=lambda j: seen.append(j["status"]))
    assert job["status"] == "succeeded" and seen == ["queued", "running", "running", "succeeded"]

    stuck = client_for(lambda request: httpx.Response(200, json={"id": "j2", "status": "running"}))
    with pytest.raises(WaitTimeout) as timed_out:
        stuck.wait_for_job("j2", interval=0.01, timeout=0.05)
    assert timed_out.value.job == {"id": "j2", "status": "running"}
    assert str(timed_out.value) == "job j2 still running after 0 s"


def test_the_client_and_cli_need_none_of_the_server_libraries():
    heavy = ("fastapi", "sqlalchemy", "celery", "torch", "worker", "uvicorn")
    code = f"import sys, gid.client, gid.cli; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.replace("'", '"')) == []
