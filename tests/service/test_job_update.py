"""``PATCH /v1/jobs/{id}``: rename and re-tag a job in any state; the fields given replace the job's,
the others stay; bad values are 422s naming the field; another owner's job is a 404."""

from __future__ import annotations

from tests.service.helpers import TINY_MODEL, finish_like_the_worker


def submit(api, **extra) -> dict:
    r = api.post("/v1/jobs", json={"kind": "train", "student": dict(TINY_MODEL),
                                   "train_dataset": api.register_dataset(), **extra})
    assert r.status_code == 201, r.text
    return r.json()


def patch(api, job_id: str, body, who: str = "alice"):
    return api.client.patch(f"/v1/jobs/{job_id}", json=body, headers=api.auth(who))


def test_rename_and_retag_replace_only_the_fields_given(api):
    job = submit(api, name="first", tags=["a", "b"])
    r = patch(api, job["id"], {"tags": ["b", "c"]})
    assert r.status_code == 200, r.text
    assert (r.json()["name"], r.json()["tags"]) == ("first", ["b", "c"])
    assert [j["id"] for j in api.get("/v1/jobs", params={"tag": "c"}).json()["items"]] == [job["id"]]
    assert api.get("/v1/jobs", params={"tag": "a"}).json()["total"] == 0

    r = patch(api, job["id"][:8], {"name": "renamed"})  # by id prefix, like every job route
    assert (r.json()["name"], r.json()["tags"]) == ("renamed", ["b", "c"])
    assert api.get("/v1/jobs/renamed").json()["id"] == job["id"]

    r = patch(api, job["id"], {"name": None, "tags": []})
    assert (r.json()["name"], r.json()["tags"]) == (None, [])
    # an ended job can be re-labelled too
    finish_like_the_worker(api, job["id"])
    assert patch(api, job["id"], {"tags": ["done"]}).json()["tags"] == ["done"]


def test_bad_values_are_422s_naming_the_field_and_change_nothing(api):
    job = submit(api, name="keep", tags=["x"])
    cases = [
        ({"tags": ["ok", "ok"]}, ["body", "tags"]),
        ({"tags": ["bad tag"]}, ["body", "tags", 0]),
        ({"tags": [f"t{i}" for i in range(21)]}, ["body", "tags"]),
        ({"name": ""}, ["body", "name"]),
        ({"status": "succeeded"}, ["body", "status"]),
    ]
    for body, loc in cases:
        r = patch(api, job["id"], body)
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == loc, (body, r.text)
    got = api.get(f"/v1/jobs/{job['id']}").json()
    assert (got["name"], got["tags"]) == ("keep", ["x"])
    assert patch(api, job["id"], {"name": "mine"}, who="bob").status_code == 404
