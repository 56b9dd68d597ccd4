"""End to end over real HTTP: a teacher trained by a ``train`` job (submitted with the ``gid`` CLI),
then a ``distill`` job on 2 gloo DDP processes run by the real Celery worker; the distilled student
is downloaded with the CLI, loads into a stock torchvision RetinaNet and predicts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import load_file

from gid_core.config import ModelConfig
from gid_core.export import load_export
from gid_core.fileio import sha256_file
from gid_core.models import build_detector
from tests.worker.helpers import NUM_CLASSES, job_body, wait_until

pytestmark = pytest.mark.slow


def gid(stack, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "GID_URL": stack.url, "GID_TOKEN": stack.token}
    return subprocess.run([sys.executable, "-m", "gid", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_train_teacher_then_distill_over_http(stack, api, dataset_ids, worker_tmp: Path):
    # 1. The teacher: a train job submitted and followed with the CLI.
    teacher_file = worker_tmp / "teacher.json"
    teacher_file.write_text(json.dumps(job_body("train", dataset_ids, name="teacher", max_iters=10)))
    out = gid(stack, "submit", str(teacher_file), "--wait")
    assert out.returncode == 0, out.stderr
    teacher_job = api.job(out.stdout.strip().splitlines()[-1])
    assert teacher_job["status"] == "succeeded", teacher_job
    # Not a terminal: progress comes as plain lines, one per status change or tenth of the run.
    assert f"train {teacher_job['id'][:8]}: succeeded  10/10" in out.stderr, out.stderr
    assert teacher_job["output_model_id"]

    # 2. GID distillation on two DDP processes.
    body = job_body("distill", dataset_ids, devices=2, teacher=teacher_job["output_model_id"], name="gid-student",
                    max_iters=8)
    job = api.post("/v1/jobs", json=body)
    job = api.wait_terminal(job["id"])
    assert job["status"] == "succeeded", job["error"]
    assert job["attempts"] == 1
    assert job["progress"]["iteration"] == 8 and job["progress"]["max_iters"] == 8
    for key in ("AP", "AP50", "AP75"):
        assert 0.0 <= job["final_metrics"][key] <= 100.0
    assert job["final_metrics"]["num_images"] == 8

    # Training scalars went from rank 0 to the database, batched every log period (4 iterations).
    series = api.get(f"/v1/jobs/{job['id']}/metrics")["series"]
    assert series["total_loss"]["steps"] == [4, 8]
    assert any(name.startswith("gi/") for name in series), sorted(series)
    # Artifacts carry the sha256 of the files on disk.
    artifacts = {a["name"]: a for a in api.get(f"/v1/jobs/{job['id']}/artifacts")}
    assert {"model.safetensors", "metadata.json", "metrics.json", "attempt-1.log"} <= set(artifacts)
    output_dir = stack.data_dir / "jobs" / job["id"]
    # Retention (GID_KEEP_CHECKPOINTS_AFTER_SUCCESS=false by default): a succeeded job's training
    # checkpoints are deleted; the export, metrics and logs stay. The worker deletes them right
    # after it records the success (until then a retry resumes from them): wait for that.
    assert "checkpoint.pt" not in artifacts
    wait_until(lambda: not (output_dir / "checkpoints").exists(), 30, "checkpoints deleted after the success")
    assert artifacts["model.safetensors"]["sha256"] == sha256_file(output_dir / "export" / "model.safetensors")
    assert json.loads((output_dir / "metrics.json").read_text())["AP"] == job["final_metrics"]["AP"]
    model_row = api.get(f"/v1/models/{job['output_model_id']}")
    assert model_row["source_job_id"] == job["id"] and model_row["name"] == "gid-student"
    assert model_row["config"]["backbone"] == "resnet18" and len(model_row["categories"]) == NUM_CLASSES

    # 3. Download the student with the CLI and load it into a plain torchvision model.
    weights = worker_tmp / "student.safetensors"
    out = gid(stack, "download", job["id"], "-o", str(weights))
    assert out.returncode == 0, out.stderr
    assert sha256_file(weights) == model_row["sha256"]
    model = build_detector(ModelConfig(**model_row["config"]), load_weights=False)
    assert type(model) is torchvision.models.detection.RetinaNet
    model.load_state_dict(load_file(str(weights)), strict=True)
    model.eval()
    with torch.no_grad():
        (pred,) = model([torch.rand(3, 64, 64)])
    assert set(pred) == {"boxes", "scores", "labels"} and pred["boxes"].shape[1:] == (4,)

    # The export folder (weights + metadata artifacts) also loads with gid_core.export.load_export.
    export = worker_tmp / "export"
    for name in ("model.safetensors", "metadata.json"):
        out = gid(stack, "download", job["id"], "--artifact", name, "-o", str(export / name))
        assert out.returncode == 0, out.stderr
    loaded, metadata = load_export(export)
    assert [c["name"] for c in metadata["categories"]] == model_row["categories"]
    with torch.no_grad():
        (pred2,) = loaded([torch.rand(3, 64, 64)])
    assert set(pred2) == {"boxes", "scores", "labels"}

    # `gid status` shows the outcome; `gid wait` on a finished job exits at once with 0.
    out = gid(stack, "status", job["id"])
    assert out.returncode == 0 and "succeeded" in out.stdout and job["output_model_id"] in out.stdout
    assert gid(stack, "wait", job["id"], "--no-progress").returncode == 0
