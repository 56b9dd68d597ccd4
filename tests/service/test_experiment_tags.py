"""An experiment's tags go on every job it creates, beside its own ``experiment:<id>`` tag: repeated
tags, one tag too many or a tag in the experiment's own namespace are 422s on ``tags`` (they were
500s: the jobs' requests failed validation after the experiment was accepted), and nothing is made."""

from __future__ import annotations

import pytest

from tests.service.helpers import TINY_MODEL


@pytest.fixture
def body(api) -> dict:
    dataset = api.register_dataset(num_classes=2)
    teacher = api.add_model({**TINY_MODEL, "fpn_channels": 32}, categories=["class_0", "class_1"])
    return {"teacher": {"model_id": teacher}, "student": dict(TINY_MODEL), "train_dataset": dataset,
            "val_dataset": dataset, "hyperparameters": {"max_iters": 4, "batch_size": 2}}


@pytest.mark.parametrize("tags", [["a", "a"], [f"t{i}" for i in range(20)], ["experiment:1234abcd"]])
def test_bad_tags_are_422s_and_create_nothing(api, body, tags):
    r = api.post("/v1/experiments", json={**body, "tags": tags})
    assert r.status_code == 422, r.text
    assert [e["loc"][:2] for e in r.json()["detail"]] == [["body", "tags"]]
    assert api.get("/v1/jobs").json()["total"] == 0


def test_nineteen_tags_reach_every_job(api, body):  # baseline, GID, and an evaluation of the teacher
    tags = [f"t{i}" for i in range(19)]
    exp = api.post("/v1/experiments", json={**body, "tags": tags})
    assert exp.status_code == 201, exp.text
    jobs = api.get("/v1/jobs").json()["items"]
    assert len(jobs) >= 2 and all(set(tags) < set(job["tags"]) and len(job["tags"]) == 20 for job in jobs)
