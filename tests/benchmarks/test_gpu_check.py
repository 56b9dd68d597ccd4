"""``make gpu-check``'s script: it refuses cleanly without CUDA, and its GPU path runs (on CPU,
tiny models) and writes the report it promises."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the check would run")
def test_refuses_cleanly_without_cuda(tmp_path: Path):
    out = tmp_path / "results" / "gpu.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "no CUDA device" in done.stdout and "nothing written" in done.stdout
    assert not out.exists() and not out.parent.exists()


@pytest.mark.timeout(600)
def test_gpu_path_runs_on_cpu_tiny(tmp_path: Path, capsys):
    out = tmp_path / "gpu.json"
    assert gpu_check.main(["--device", "cpu", "--tiny", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["tiny"] is True and report["machine"]["device"] == "cpu"
    job = report["distill_job"]
    assert job["status"] == "completed" and job["iterations"] == gpu_check.TINY.iters and job["amp"] is True
    assert job["train_images_per_s"] > 0 and job["peak_memory_mb"] > 0
    parity = report["amp_parity"]
    assert parity["autocast_dtype"] == "bfloat16" and parity["ok"]
    assert set(parity["fp32"]) == set(parity["amp"]) == set(parity["rel_diff"]) and "total" in parity["fp32"]
    assert all(math.isfinite(v) for v in parity["fp32"].values())
    assert set(report["overhead"]) == {str(s) for s in gpu_check.TINY.overhead_sizes}
    assert all(r["overhead_ratio"] > 0 for r in report["overhead"].values())
    assert all(lo <= hi for lo, hi in (r["overhead_ratio_interval"] for r in report["overhead"].values()))
    assert set(report["item5"]) == set(gpu_check.ITEM5_TARGETS)
    for name, r in report["item5"].items():
        change, target = gpu_check.ITEM5_TARGETS[name]
        assert r["target"] == target and all(r["setting"][k] == v for k, v in change.items())
        for mode in ("instances", "maps"):
            lo, hi = r[mode]["overhead_ratio_interval"]
            assert 0 < lo <= hi and r[mode]["met"] == (hi <= target)
    printed = capsys.readouterr().out
    assert "train images/s" in printed and "issue #12 item 5, top_k=40 (target 1.25): instances" in printed
