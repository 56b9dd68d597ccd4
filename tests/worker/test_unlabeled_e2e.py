"""A distillation job with an unlabeled dataset, end to end over HTTP with the real worker (issue #12
item 2): an image-only folder is registered, a tiny teacher trained, and the GID student's logged
losses show the unlabeled steps (no ground-truth loss) beside the labeled ones."""

from __future__ import annotations

import json

import pytest

from gid_core.jobdir import JobDir
from gid_core.unlabeled import is_unlabeled_step
from tests.worker.helpers import job_body

pytestmark = pytest.mark.slow


def test_distill_job_with_unlabeled_images_succeeds(stack, api, dataset_ids, tiny_dataset):
    unlabeled = api.post("/v1/datasets", json={"name": "tiny-unlabeled", "unlabeled": True,
                                               "images": tiny_dataset["val_images"]})
    assert unlabeled["labeled"] is False and unlabeled["num_images"] == 8

    teacher = api.post("/v1/jobs", json=job_body("train", dataset_ids, name="u-teacher", max_iters=2))
    teacher = api.wait_terminal(teacher["id"])
    assert teacher["status"] == "succeeded", teacher["error"]

    body = job_body("distill", dataset_ids, teacher=teacher["output_model_id"], name="u-student", max_iters=4,
                    log_period=1, unlabeled_ratio=0.5)
    body["unlabeled_dataset"] = unlabeled["id"]
    job = api.wait_terminal(api.post("/v1/jobs", json=body)["id"])
    assert job["status"] == "succeeded", job["error"]
    assert job["unlabeled_dataset_id"] == unlabeled["id"] and job["progress"]["iteration"] == 4

    rows = JobDir(stack.data_dir / "jobs" / job["id"]).train_log.read_text().splitlines()
    log = {r["iteration"]: r for r in map(json.loads, rows)}
    for it in range(1, 5):
        assert ("classification" not in log[it]) == is_unlabeled_step(it - 1, 0.5), log[it]
        assert "loss_relation" in log[it]
