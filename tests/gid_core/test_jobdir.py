"""The job folder layout shared by the engine and the worker."""

from __future__ import annotations

from pathlib import Path

import pytest

from gid_core.jobdir import JobDir, checkpoint_filename


def test_checkpoint_pointer(tmp_path: Path):
    job_dir = JobDir(tmp_path)
    assert job_dir.latest_checkpoint() is None and job_dir.checkpoint_iteration() is None
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    (ckpts / "last").write_text("ckpt_0000500.pt")
    assert job_dir.checkpoint_iteration() is None  # the pointer names a file that is not there
    (ckpts / "ckpt_0000500.pt").write_bytes(b"x")
    assert job_dir.latest_checkpoint() == ckpts / "ckpt_0000500.pt"
    assert job_dir.checkpoint_iteration() == 500


def test_checkpoint_without_pointer_and_invalid_pointer(tmp_path: Path):
    job_dir = JobDir(tmp_path)
    job_dir.checkpoints.mkdir()
    (job_dir.checkpoints / checkpoint_filename(8)).write_bytes(b"x")  # written, pointer not yet
    assert job_dir.checkpoint_iteration() == 8
    job_dir.last_pointer.write_text("../../etc/passwd")
    with pytest.raises(ValueError, match="invalid checkpoint name"):
        job_dir.latest_checkpoint()


def test_layout(tmp_path: Path):
    job_dir = JobDir(tmp_path)
    assert checkpoint_filename(500) == "ckpt_0000500.pt"
    assert job_dir.last_pointer == tmp_path / "checkpoints" / "last"
    assert job_dir.export_weights == tmp_path / "export" / "model.safetensors"
    assert job_dir.export_metadata == tmp_path / "export" / "metadata.json"
    assert (job_dir.metrics, job_dir.train_log) == (tmp_path / "metrics.json", tmp_path / "train_log.jsonl")
    assert job_dir.attempt_log(2) == tmp_path / "logs" / "attempt-2.log"
    assert job_dir.attempt_result(2) == tmp_path / "logs" / "attempt-2.result.json"
