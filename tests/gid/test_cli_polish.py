"""The ``gid`` command against a real API over HTTP: uploads, ``init`` -> ``submit``, engine YAML
configs, id prefixes, ``status`` with ETA, AP and artifacts, global options, ``--version``, a
closed pipe; and ``/docs`` served without any external URL."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from service.main import create_app
from service.models import Job
from tests.gid.helpers import run_gid
from tests.service.conftest import api, redis_server, settings  # noqa: F401 - fixtures
from tests.service.helpers import TINY_MODEL, Api, finish_like_the_worker, write_coco
from tests.service.live import serve


# the smallest checkpoint a test can upload (MobileNetV3 body, 16 FPN channels: ~13 MB)
SMALL_MODEL = {**TINY_MODEL, "backbone": "mobilenet_v3_large", "norm": "bn"}


@pytest.fixture
def db_url(tmp_path: Path) -> str:  # SQLite only: these tests are about the command line
    from service.migrate import upgrade_to_head

    url = f"sqlite:///{tmp_path / 'gid.db'}"
    upgrade_to_head(url)
    return url


@pytest.fixture
def live(api: Api) -> Iterator[tuple[Api, dict[str, str]]]:
    api.configure(max_upload_bytes=64 * 1024 * 1024)  # a real (tiny) checkpoint
    with serve(create_app(api.settings)) as url:
        yield api, {"GID_URL": url, "GID_TOKEN": api.tokens["alice"]}


def gid(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    out = run_gid(*args, env=env)
    assert "Traceback" not in out.stderr, out.stderr
    return out


def ok(env: dict[str, str], *args: str) -> str:
    out = gid(env, *args)
    assert out.returncode == 0, out.stderr
    return out.stdout


def tiny_weights(folder: Path, config: dict) -> Path:
    from gid_core.config import ModelConfig
    from gid_core.models import build_detector, save_state_dict_file

    path = folder / "teacher.safetensors"
    save_state_dict_file(build_detector(ModelConfig(**config), load_weights=False).state_dict(), path)
    return path


def test_version_and_global_options_before_or_after_the_command(live):
    api, env = live
    assert ok({}, "--version").startswith("gid ")
    url, token = env["GID_URL"], env["GID_TOKEN"]
    assert "ID" in ok({}, "--url", url, "--token", token, "jobs", "list")
    assert "ID" in ok({}, "jobs", "list", "--url", url, "--token", token)
    assert "ID" in ok({"GID_TOKEN": token}, "--url", url, "datasets", "list")


def test_upload_init_submit_status_by_prefix(live, tmp_path: Path):
    api, env = live
    ann = write_coco(tmp_path / "shapes", num_classes=2)
    dataset = ok(env, "datasets", "upload", "--name", "shapes", "--annotations", str(ann),
                 "--images", str(tmp_path / "shapes" / "images")).strip()
    config = SMALL_MODEL
    weights = tiny_weights(tmp_path, config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = ok(env, "models", "upload", str(weights), "--name", "teacher", "--config", str(tmp_path / "config.json"),
               "--categories", '["class_0", "class_1"]').strip()
    assert api.get("/v1/models/teacher").json()["id"] == model

    body = json.loads(ok(env, "init", "distill", "--teacher", "teacher", "--train-dataset", "shapes",
                         "--max-iters", "20"))
    assert body["teacher"]["model_id"] == model and body["train_dataset"] == dataset
    (tmp_path / "job.json").write_text(json.dumps({**body, "name": "first", "tags": ["cli"]}))
    job_id = ok(env, "submit", str(tmp_path / "job.json")).strip()
    assert "# " in ok(env, "init", "train", "--format", "yaml")  # described fields

    finish_like_the_worker(api, job_id)
    with api.session() as s:  # what the worker reports at the end
        job = s.get(Job, job_id)
        job.final_metrics = {"AP": 12.345, "AP50": 30.0, "AP75": 10.0}
        s.commit()
    status = ok(env, "status", job_id[:8])
    assert f"job       {job_id}" in status and "AP 12.35%" in status and "duration" in status
    assert "artifacts attempt-1.log  (13 B)\n          model.safetensors  (1000 B)" in status, status
    listed = ok(env, "jobs", "list", "--tag", "cli").splitlines()
    assert listed[0].split() == ["ID", "NAME", "KIND", "STATUS", "PROGRESS", "AP", "DURATION"]
    assert listed[1].startswith(job_id[:8] + "  first") and "12.3%" in listed[1]


def test_status_shows_eta_of_a_running_job(live):
    api, env = live
    dataset = api.register_dataset()
    r = api.post("/v1/jobs", json={"kind": "train", "student": dict(TINY_MODEL), "train_dataset": dataset})
    job_id = r.json()["id"]
    from service import leases

    with api.session() as s:
        assert leases.claim_job(s, job_id=job_id, worker_id="w", lease_seconds=60) is not None
        job = s.get(Job, job_id)
        job.progress = {"iteration": 250, "max_iters": 1000, "eta_seconds": 125.0}
        s.commit()
    status = ok(env, "status", job_id[:8])
    assert "250/1000 it (25%)  ETA 2m 05s" in status, status


def test_engine_yaml_config_is_mapped_to_the_servers_datasets_and_models(live, tmp_path: Path):
    api, env = live
    root = api.roots / "synthetic"
    for split in ("train", "val"):
        write_coco(root / split, num_classes=2)
    config = SMALL_MODEL
    engine = {
        "kind": "distill",
        "teacher": {**config, "weights": str(tiny_weights(tmp_path, config))},
        "student": config,
        "data": {f"{split}_{what}": str(root / split / ("annotations.json" if what == "annotations" else "images"))
                 for split in ("train", "val") for what in ("annotations", "images")},
        "hyperparameters": {"max_iters": 4, "batch_size": 2},
        "devices": 1,
    }
    (tmp_path / "distill.yaml").write_text(yaml.safe_dump(engine))
    first = gid(env, "submit", str(tmp_path / "distill.yaml"))
    assert first.returncode == 0, first.stderr
    second = ok(env, "submit", str(tmp_path / "distill.yaml")).strip()
    jobs = [api.get(f"/v1/jobs/{j}").json() for j in (first.stdout.strip(), second)]
    assert jobs[0]["train_dataset_id"] == jobs[1]["train_dataset_id"]  # reused, not registered twice
    assert jobs[0]["teacher_model_id"] == jobs[1]["teacher_model_id"]
    assert api.get("/v1/datasets").json()["total"] == 2 and api.get("/v1/models").json()["total"] == 1
    # an engine evaluation config: the same model and val dataset, reused
    val = {"annotations": engine["data"]["val_annotations"], "images": engine["data"]["val_images"]}
    evaluation = {"model": engine["teacher"], **val, "batch_size": 2, "devices": 1}
    (tmp_path / "evaluate.yaml").write_text(yaml.safe_dump(evaluation))
    job = api.get(f"/v1/jobs/{ok(env, 'submit', str(tmp_path / 'evaluate.yaml')).strip()}").json()
    assert job["kind"] == "evaluate" and job["init_model_id"] == jobs[0]["teacher_model_id"]
    assert job["val_dataset_id"] == jobs[0]["val_dataset_id"] and job["config"]["batch_size"] == 2
    (tmp_path / "untrained.yaml").write_text(yaml.safe_dump({"model": config, **val}))
    refused = gid(env, "submit", str(tmp_path / "untrained.yaml"))
    assert refused.returncode == 1 and "model.weights" in refused.stderr


def test_no_traceback_when_the_reader_closes_the_pipe(live):
    api, env = live
    dataset = api.register_dataset()
    for _ in range(3):
        api.post("/v1/jobs", json={"kind": "train", "student": dict(TINY_MODEL), "train_dataset": dataset})
    import os

    base = {k: v for k, v in os.environ.items() if not k.startswith("GID_")}
    proc = subprocess.Popen([sys.executable, "-m", "gid", "jobs", "list"], env={**base, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before anything is written (`| head -0`)
    _, err = proc.communicate(timeout=120)
    assert b"Traceback" not in err and b"BrokenPipe" not in err, err.decode()
    assert proc.returncode == 141


def test_docs_reference_no_external_url_and_their_assets_are_served(api: Api):
    for page in ("/docs", "/redoc"):
        html = api.client.get(page).text
        assert not re.search(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", html, re.I), html
        assets = re.findall(r'(?:src|href)="(/[^"]+)"', html)
        assert assets, html
        for asset in assets:
            r = api.client.get(asset)
            assert r.status_code == 200 and len(r.content) > 1000, asset
    assert "swagger-ui-bundle.js" in api.client.get("/docs").text


def test_engine_config_with_teacher_classes_keeps_the_teachers_names_and_class_map(live, tmp_path: Path):
    """``teacher_classes`` of an engine config reaches the request: the uploaded teacher carries its
    category names and the class map goes along, so a teacher with other classes is matched by name."""
    api, env = live
    root = api.roots / "renamed"
    for split in ("train", "val"):
        write_coco(root / split, names=["dog", "cat"])
    teacher = {**SMALL_MODEL, "num_classes": 3}
    engine = {
        "kind": "distill",
        "teacher": {**teacher, "weights": str(tiny_weights(tmp_path, teacher))},
        "teacher_classes": {"categories": ["bird", "feline", "dog"], "class_map": {"cat": "feline"}},
        "student": SMALL_MODEL,
        "data": {f"{split}_{what}": str(root / split / ("annotations.json" if what == "annotations" else "images"))
                 for split in ("train", "val") for what in ("annotations", "images")},
        "hyperparameters": {"max_iters": 4, "batch_size": 2},
    }
    (tmp_path / "distill.yaml").write_text(yaml.safe_dump(engine))
    job = api.get(f"/v1/jobs/{ok(env, 'submit', str(tmp_path / 'distill.yaml')).strip()}").json()
    assert api.get(f"/v1/models/{job['teacher_model_id']}").json()["categories"] == ["bird", "feline", "dog"]
    assert job["config"]["teacher"]["class_map"] == {"cat": "feline"}


def test_upload_unlabeled_images_from_a_folder(live, tmp_path: Path):
    api, env = live
    write_coco(tmp_path / "photos", num_images=3)
    out = gid(env, "datasets", "upload", "--name", "raw", "--images", str(tmp_path / "photos" / "images"))
    assert out.returncode != 0 and "--annotations is required unless --unlabeled" in out.stderr
    dataset = ok(env, "datasets", "upload", "--name", "raw", "--unlabeled",
                 "--images", str(tmp_path / "photos" / "images")).strip()
    got = api.get(f"/v1/datasets/{dataset}").json()
    assert (got["labeled"], got["num_images"], got["source"]) == (False, 3, "upload")


def test_jobs_update_renames_and_retags(live):
    api, env = live
    r = api.post("/v1/jobs", json={"kind": "train", "student": dict(TINY_MODEL), "train_dataset": api.register_dataset(),
                                   "tags": ["old", "keep"]})
    job_id = r.json()["id"]
    out = gid(env, "jobs", "update", job_id[:8])
    assert out.returncode != 0 and "nothing to change" in out.stderr
    ok(env, "jobs", "update", job_id[:8], "--name", "second", "--tag", "new", "--untag", "old")
    got = api.get(f"/v1/jobs/{job_id}").json()
    assert (got["name"], got["tags"]) == ("second", ["keep", "new"])
    ok(env, "jobs", "update", "second", "--clear-name")
    assert api.get(f"/v1/jobs/{job_id}").json()["name"] is None
