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
