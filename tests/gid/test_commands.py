"""The ``gid`` command line without a server: clear errors with exit codes before any request."""

from __future__ import annotations

from pathlib import Path

from gid.cli import main
from gid_core.processes import free_port
from tests.gid.helpers import run_gid


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
