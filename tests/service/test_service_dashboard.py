"""The dashboard's static files and ``GET /v1/jobs/{id}/instances`` refusals (the browser test,
``test_dashboard_browser.py``, covers the working path against a real worker)."""

from __future__ import annotations

import re

from service import crud
from service.dashboard import STATIC_DIR


def test_the_dashboard_is_served_at_the_root_with_a_strict_csp(api):
    index = api.client.get("/")
    assert index.status_code == 200 and 'src="/dashboard/app.js"' in index.text
    assert "default-src 'self'" in index.headers["content-security-policy"]
    for path in sorted(STATIC_DIR.iterdir()):
        r = api.client.get(f"/dashboard/{path.name}")
        assert r.status_code == 200, path.name
        assert "default-src 'self'" in r.headers["content-security-policy"]
        # Nothing from another origin: air-gapped clusters load it all from the API.
        assert not re.search(r"""(src|href)=["']?(https?:)?//""", r.text), path.name
        assert "import(" not in r.text and not re.search(r"""from\s+["']https?:""", r.text), path.name


def test_instances_need_a_token_an_owned_distill_job_and_an_image_in_range(api):
    assert api.client.get("/v1/jobs/x/instances").status_code == 401
    assert api.get("/v1/jobs/nope/instances").status_code == 404
    dataset = api.register_dataset()
    with api.session() as s:
        job, _ = crud.create_job(s, owner_id=api.owner_ids["alice"], kind="train", name=None, config={},
                                 engine_config={}, request_hash="h", idempotency_key=None, train_dataset_id=dataset)
        s.commit()
        job_id = job.id
    r = api.get(f"/v1/jobs/{job_id}/instances")
    assert r.status_code == 409 and "distillation" in r.json()["detail"]
    assert api.get(f"/v1/jobs/{job_id}/instances", who="bob").status_code == 404
    r = api.get(f"/v1/jobs/{job_id}/instances", params={"image": -1})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "image"]

