"""``python -m gid_core``: config errors, dataset errors, and a real make-dataset -> train -> evaluate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gid_core.__main__ import main

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, "-m", "gid_core", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def tiny_job(data_dir: Path, **overrides) -> dict:
    job = {
        "kind": "train",
        "student": {"arch": "retinanet", "backbone": "resnet18", "num_classes": 2, "fpn_channels": 32,
                    "norm": "gn", "min_size": 64, "max_size": 64},
        "data": {"train_annotations": str(data_dir / "train" / "annotations.json"),
                 "train_images": str(data_dir / "train" / "images")},
        "hyperparameters": {"max_iters": 2, "batch_size": 2, "num_workers": 0, "warmup_iters": 0},
    }
    job.update(overrides)
    return job


def test_bad_config_exits_2_and_names_every_field(tmp_path):
    job = tiny_job(tmp_path)
    job["student"]["arch"] = "retinanett"
    job["hyperparameters"]["lr"] = -1
    job["epochs"] = 3
    cfg = write_yaml(tmp_path / "job.yaml", job)
    proc = run_cli("train", "--config", str(cfg), "--output-dir", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    for field in ("student.arch", "hyperparameters.lr", "epochs"):
        assert field in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_config_level_errors(tmp_path, capsys):
    cfg = write_yaml(tmp_path / "job.yaml", tiny_job(tmp_path))
    assert main(["distill", "--config", str(cfg), "--output-dir", str(tmp_path / "o")]) == 2
    assert "kind: the config says 'train' but the command is 'distill'" in capsys.readouterr().err

    assert main(["train", "--config", str(cfg), "--output-dir", str(tmp_path / "o"), "--devices", "3"]) == 2
    assert "batch_size (2) must be divisible by devices (3)" in capsys.readouterr().err

    (tmp_path / "broken.json").write_text("{not json")
    assert main(["train", "--config", str(tmp_path / "broken.json"), "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is not valid JSON" in err and "broken.json" in err
    assert main(["train", "--config", str(tmp_path / "missing.yaml"), "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "cannot read config file" in err and "missing.yaml: not found" in err
    (tmp_path / "list.yaml").write_text("- kind: train\n")
    assert main(["train", "--config", str(tmp_path / "list.yaml"), "--output-dir", str(tmp_path)]) == 2
    assert "list.yaml: expected a mapping, got list" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # argparse: --output-dir is required for training
        main(["train", "--config", str(cfg)])
    assert exc.value.code == 2


@pytest.mark.parametrize("devices", [1, 2])
def test_dataset_problems_are_all_listed(tmp_path, capsys, devices):
    images = tmp_path / "train" / "images"
    images.mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (64, 64)).save(images / "a.png")
    (tmp_path / "train" / "annotations.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 64},
                   {"id": 2, "file_name": "gone.png", "width": 64, "height": 64}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, -3, 4]}],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }))
    cfg = write_yaml(tmp_path / "job.yaml", tiny_job(tmp_path, devices=devices))
    assert main(["train", "--config", str(cfg), "--output-dir", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "gone.png" in err and "non-positive width" in err


def test_make_dataset_train_evaluate(tmp_path):
    ds_cfg = write_yaml(tmp_path / "data.yaml", {"output_dir": "data", "num_train": 4, "num_val": 2,
                                                 "image_size": 64, "num_classes": 2, "max_objects": 2})
    proc = run_cli("make-dataset", "--config", str(ds_cfg), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    made = json.loads(proc.stdout)
    assert made["num_train_images"] == 4 and (tmp_path / "data" / "val" / "annotations.json").is_file()

    job = tiny_job(tmp_path / "data")
    job["data"].update(val_annotations=made["val_annotations"], val_images=made["val_images"])
    job_cfg = tmp_path / "job.json"
    job_cfg.write_text(json.dumps(job))
    proc = run_cli("train", "--config", str(job_cfg), "--output-dir", "run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["status"] == "completed" and result["iterations"] == 2
    assert "AP" in result["metrics"] and "AP50" in proc.stderr  # one-line summary
    assert "2/2" in proc.stderr  # the progress bar reached the end
    assert (tmp_path / "run" / "export" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["AP"] == result["metrics"]["AP"]

    eval_cfg = write_yaml(tmp_path / "eval.yaml", {
        "model": {**job["student"], "weights": str(tmp_path / "run" / "export")},
        # make-dataset reported paths relative to its working directory
        "annotations": str(tmp_path / made["val_annotations"]), "images": str(tmp_path / made["val_images"]),
        "num_workers": 0,
    })
    assert main(["evaluate", "--config", str(eval_cfg), "--output-dir", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["AP"] == result["metrics"]["AP"]
