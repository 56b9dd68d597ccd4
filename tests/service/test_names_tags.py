"""Jobs, datasets and models by id, unique name or unique id prefix (path parameters and job
bodies); ambiguous references answer with their candidates; tags and job list filters."""

from __future__ import annotations

from service import crud
from tests.service.helpers import TINY_MODEL, Api


def submit(api: Api, dataset: str, **fields) -> dict:
    body = {"kind": "train", "student": dict(TINY_MODEL), "train_dataset": dataset,
            "hyperparameters": {"max_iters": 2}, **fields}
    r = api.post("/v1/jobs", json=body)
    assert r.status_code == 201, r.text
    return r.json()


def add_dataset(api: Api, dataset_id: str, name: str, who: str = "alice") -> None:
    with api.session() as s:
        crud.create_dataset(s, owner_id=api.owner_ids[who], name=name, source="path", annotations_path="/a.json",
                            images_path="/i", num_images=1, num_annotations=1, categories=["a", "b"],
                            dataset_id=dataset_id)


def test_job_by_id_prefix_and_unique_name(api: Api):
    dataset = api.register_dataset()
    job = submit(api, dataset, name="baseline-r18")
    for ref in (job["id"][:8], job["id"][:4], "baseline-r18"):
        r = api.get(f"/v1/jobs/{ref}")
        assert r.status_code == 200 and r.json()["id"] == job["id"], (ref, r.text)
    assert api.get(f"/v1/jobs/{job['id'][:8]}/metrics").json()["job_id"] == job["id"]
    assert api.get(f"/v1/jobs/{job['id'][:8]}/artifacts").status_code == 200
    assert api.post(f"/v1/jobs/{job['id'][:8]}/cancel").json()["status"] == "cancelled"
    assert api.get(f"/v1/jobs/{job['id'][:3]}").status_code == 404  # too short to be a prefix
    assert api.get(f"/v1/jobs/{job['id'][:8]}", who="bob").status_code == 404  # not bob's


def test_ambiguous_references_list_their_candidates(api: Api):
    add_dataset(api, "abcd0000-0000-4000-8000-000000000000", "twin")
    add_dataset(api, "abcd1111-0000-4000-8000-000000000000", "twin")
    for ref, by in (("abcd", "id prefix"), ("twin", "name")):
        r = api.get(f"/v1/datasets/{ref}")
        assert r.status_code == 409, r.text
        (error,) = r.json()["detail"]
        assert error["loc"] == ["path", "dataset_id"] and error["type"] == "ambiguous" and by in error["msg"]
        assert {c["id"] for c in error["ctx"]["candidates"]} == {
            "abcd0000-0000-4000-8000-000000000000", "abcd1111-0000-4000-8000-000000000000"}
    assert api.get("/v1/datasets/abcd1").json()["id"] == "abcd1111-0000-4000-8000-000000000000"
    # in a job body the same is a 422 naming the field
    r = api.post("/v1/jobs", json={"kind": "train", "student": dict(TINY_MODEL), "train_dataset": "twin"})
    assert r.status_code == 422
    (error,) = [e for e in r.json()["detail"] if e["loc"] == ["body", "train_dataset"]]
    assert error["type"] == "ambiguous" and len(error["ctx"]["candidates"]) == 2


def test_datasets_and_models_by_name_in_paths_and_bodies(api: Api):
    dataset = api.register_dataset()
    name = api.get(f"/v1/datasets/{dataset}").json()["name"]
    assert api.get(f"/v1/datasets/{name}").json()["id"] == dataset
    model = api.add_model(dict(TINY_MODEL))  # named "m"
    assert api.get("/v1/models/m").json()["id"] == model
    assert api.get(f"/v1/models/{model[:6]}").json()["id"] == model
    job = submit(api, name, student={**TINY_MODEL, "init_model_id": "m"})
    assert (job["train_dataset_id"], job["init_model_id"]) == (dataset, model)
    assert api.client.delete(f"/v1/datasets/{dataset}", headers=api.auth()).status_code == 409  # in use by the job


def test_tags_are_validated_stored_and_filtered(api: Api):
    dataset = api.register_dataset()
    a = submit(api, dataset, name="a", tags=["exp1", "gid"])
    b = submit(api, dataset, name="b", tags=["exp1"])
    assert a["tags"] == ["exp1", "gid"] and api.get(f"/v1/jobs/{a['id']}").json()["tags"] == ["exp1", "gid"]

    def listed(**params) -> list[str]:
        r = api.get("/v1/jobs", params=params)
        assert r.status_code == 200, r.text
        return [j["name"] for j in r.json()["items"]]

    assert listed(tag="exp1") == ["b", "a"]
    assert listed(tag=["exp1", "gid"]) == ["a"]
    assert listed(name="b") == ["b"] and listed(kind="distill") == [] and listed(kind="train", status="queued") == ["b", "a"]
    assert listed(tag="none") == []
    for tags, loc in ((["bad tag"], ["body", "tags", 0]), (["x", "x"], ["body", "tags"]), (["x" * 65], ["body", "tags", 0])):
        r = api.post("/v1/jobs", json={"kind": "train", "student": dict(TINY_MODEL), "train_dataset": dataset,
                                       "tags": tags})
        assert r.status_code == 422 and [e["loc"] for e in r.json()["detail"]] == [loc], r.text
    assert api.get("/v1/jobs", params={"tag": "bad tag"}).status_code == 422
