"""The ``gid`` command line: clear errors with exit codes, against the real API where one is needed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.cli import main
from service.embedded import free_port


def run_gid(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("GID_")}
    return subprocess.run([sys.executable, "-m", "service.cli", *args], env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def test_bad_job_files_are_refused_before_any_request(tmp_path: Path, capsys):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: no request may be needed
    cases = {
        "missing.json": None,
        "broken.json": "{not json",
        "broken.yaml": "kind: [train",
        "list.yaml": "- kind: train\n",
    }
    expected = {
        "missing.json": "cannot read",
        "broken.json": "is not valid JSON",
        "broken.yaml": "is not valid YAML",
        "list.yaml": "expected a mapping",
    }
    for name, text in cases.items():
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        assert main(["submit", str(path), "--url", url, "--token", "t"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and expected[name] in err and name in err, err


def test_missing_token_and_unreachable_server(tmp_path: Path, capsys):
    assert main(["status", "abc", "--data-dir", str(tmp_path)]) == 1
    assert "no API token" in capsys.readouterr().err
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["status", "abc", "--url", url, "--token", "t"]) == 1
    assert f"cannot reach the GID API at {url}" in capsys.readouterr().err


def test_usage_errors_exit_2():
    assert run_gid("download", "-o", "x").returncode == 2
    out = run_gid("download", "job", "--model", "m", "-o", "x")
    assert out.returncode == 2 and "one of them" in out.stderr
    assert run_gid("frobnicate").returncode == 2


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
