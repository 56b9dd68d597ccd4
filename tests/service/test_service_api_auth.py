"""Authentication, per-owner isolation and the unauthenticated endpoints."""

from __future__ import annotations

import pytest

from service import crud
from service.admin import create_token
from service.models import ApiToken, utcnow
from tests.service.helpers import TINY_MODEL


def test_healthz_and_docs_need_no_token(api):
    assert api.client.get("/healthz").json() == {"status": "ok"}  # liveness: no dependency checks
    ready = api.client.get("/readyz")  # readiness: the database check moved here
    assert ready.status_code == 200 and ready.json()["database"]["ok"] and ready.json()["broker"]["ok"]
    assert api.client.get("/docs").status_code == 200
    paths = api.client.get("/openapi.json").json()["paths"]
    assert {"/v1/jobs", "/v1/jobs/{job_id}/metrics", "/v1/datasets", "/v1/models/{model_id}/download"} <= set(paths)


def test_missing_or_bad_token_is_401(api):
    for headers in ({}, {"Authorization": "Basic YWxpY2U6cHc="}, {"Authorization": "Bearer"}):
        r = api.client.get("/v1/jobs", headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer"), headers
    r = api.client.get("/v1/datasets", headers={"Authorization": "Bearer gid_not-a-token"})
    assert r.status_code == 401 and 'error="invalid_token"' in r.headers["www-authenticate"]
    r = api.client.post("/v1/jobs", json={}, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401  # auth is checked before the body
    assert api.get("/v1/jobs").status_code == 200


def test_token_is_stored_hashed_and_revocable(api):
    token = api.tokens["alice"]
    with api.session() as s:
        rows = s.query(ApiToken).all()
        assert all(token not in (row.token_hash,) for row in rows) and len(rows) == 2
        row = s.query(ApiToken).filter_by(token_hash=crud.hash_token(token, secret=api.settings.secret_key)).one()
        row.revoked_at = utcnow()
        s.commit()
    assert api.get("/v1/jobs").status_code == 401


def test_other_owners_resources_are_404(api):
    dataset_id = api.register_dataset(num_classes=2)
    model_id = api.add_model(TINY_MODEL)
    body = {"kind": "train", "student": TINY_MODEL, "train_dataset": dataset_id,
            "hyperparameters": {"batch_size": 2}}
    job_id = api.post("/v1/jobs", json=body).json()["id"]
    for url in (
        f"/v1/datasets/{dataset_id}", f"/v1/models/{model_id}", f"/v1/models/{model_id}/download",
        f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/metrics", f"/v1/jobs/{job_id}/artifacts",
        f"/v1/jobs/{job_id}/artifacts/metrics.json",
    ):
        assert api.get(url, "bob").status_code == 404, url
    assert api.post(f"/v1/jobs/{job_id}/cancel", "bob").status_code == 404
    for url in ("/v1/datasets", "/v1/models", "/v1/jobs"):
        assert api.get(url, "bob").json()["total"] == 0
        assert api.get(url).json()["total"] == 1
    # Bob cannot use Alice's dataset or model by id either: the field does not resolve.
    r = api.post("/v1/jobs", "bob", json={**body, "kind": "distill", "teacher": {"model_id": model_id}})
    locs = {tuple(e["loc"]) for e in r.json()["detail"]}
    assert r.status_code == 422 and locs == {("body", "train_dataset"), ("body", "teacher", "model_id")}
    assert api.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"  # untouched


def test_admin_create_token(api):
    token = create_token("carol", settings=api.settings)
    assert token.startswith("gid_") and len(token) > 40
    assert api.client.get("/v1/jobs", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    second = create_token("carol", settings=api.settings)  # same owner, another token
    with api.session() as s:
        assert crud.get_owner_by_token(s, token=second, secret=api.settings.secret_key).name == "carol"
        assert crud.get_owner_by_token(s, token=token, secret="another-secret-key") is None
    with pytest.raises(ValueError, match="owner name"):
        create_token("  ", settings=api.settings)
