"""The ``gid`` command line against the real API: HTTP errors name the field, the status and the fix.

(Its checks that need no server are in ``tests/gid/test_commands.py``.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.gid.helpers import run_gid


@pytest.mark.slow
def test_http_errors_name_the_field(stack, dataset_ids, tmp_path: Path):
    env = {"GID_URL": stack.url, "GID_TOKEN": stack.token}
    body = {"kind": "distill", "student": {"arch": "retinanet", "backbone": "resnet18", "num_classes": 3},
            "teacher": {"model_id": "no-such-model"}, "train_dataset": dataset_ids["train"]}
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(body))
    out = run_gid("submit", str(job_file), env=env)
    assert out.returncode == 1
    assert "HTTP 422" in out.stderr and "body.teacher.model_id: model 'no-such-model' not found" in out.stderr

    out = run_gid("status", "no-such-job", env=env)
    assert out.returncode == 1 and "HTTP 404" in out.stderr

    out = run_gid("status", "no-such-job", env={**env, "GID_TOKEN": "wrong"})
    assert out.returncode == 1 and "HTTP 401" in out.stderr and "GID_TOKEN" in out.stderr

    out = run_gid("datasets", "register", "--name", "x", "--annotations", "/etc/passwd", "--images", "/etc", env=env)
    assert out.returncode == 1 and "HTTP 403" in out.stderr and "outside the allowed data roots" in out.stderr

    # The url and token files of the data directory are the defaults.
    out = run_gid("datasets", "list", "--data-dir", str(stack.data_dir))
    assert out.returncode == 0 and "tiny-train" in out.stdout


@pytest.mark.slow
def test_cancelling_a_cancelled_job_is_not_an_error(stack, api, dataset_ids):
    from tests.worker.helpers import job_body

    env = {"GID_URL": stack.url, "GID_TOKEN": stack.token}
    # Queued behind nothing it could run before: cancel it at once, then once more.
    job = api.post("/v1/jobs", json=job_body("train", dataset_ids, name="cancel-twice", max_iters=2000,
                                              checkpoint_period=1000))
    first = run_gid("cancel", job["id"], env=env)
    assert first.returncode == 0, first.stderr
    api.wait_terminal(job["id"], timeout=60)
    again = run_gid("cancel", job["id"], env=env)
    assert again.returncode == 0 and "already cancelled" in again.stderr, again.stderr


def test_create_token_refuses_a_missing_database(tmp_path: Path):
    elsewhere = tmp_path / "not-a-data-dir"
    elsewhere.mkdir()
    env = {"GID_DATA_DIR": str(elsewhere)}
    out = run_gid("admin", "create-token", "--owner", "me", env=env)
    assert out.returncode == 1 and "no GID database at sqlite:///" in out.stderr and "--init" in out.stderr
    assert str(elsewhere / "gid.db") in out.stderr
    assert not (elsewhere / "gid.db").exists()  # nothing made

    out = run_gid("admin", "create-token", "--owner", "me", "--init", env=env)
    assert out.returncode == 0 and out.stdout.strip(), out.stderr
    assert (elsewhere / "gid.db").is_file()
    out = run_gid("admin", "create-token", "--owner", "me", env=env)  # now it exists
    assert out.returncode == 0, out.stderr
