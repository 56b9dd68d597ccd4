"""Freed host memory kept for reuse (gid_core.hostmem), measured by the page faults it saves.

Each case runs in a fresh interpreter: ``mallopt`` is process-wide and cannot be undone, so the
pytest process would carry it into every later test. The probe allocates and frees six 8 MiB
tensors a round and counts the minor page faults of a round (the median round): a malloc that hands freed blocks back
to the kernel faults every page in again, one that keeps them faults none. glibc's own default
adapts to the process's history (whether a round's blocks sit at the heap's top decides whether
they are trimmed), so each case starts from a malloc that is known to hand them back:
``hand_back_freed_memory`` (an mmap threshold of 128 KiB, fixed) gives every such block its own
mapping, unmapped on ``free``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gid_core.hostmem import ENV_SWITCH, glibc_mallopt, retain_wanted

REPO = Path(__file__).resolve().parents[2]
PAGES_PER_ROUND = 6 * 8 * 256  # six 8 MiB tensors, 4 KiB pages

glibc_only = pytest.mark.skipif(glibc_mallopt() is None, reason="mallopt is glibc's")

PROBE = textwrap.dedent("""
    def hand_back_freed_memory():
        from gid_core.hostmem import M_MMAP_THRESHOLD, glibc_mallopt
        assert glibc_mallopt()(M_MMAP_THRESHOLD, 128 << 10) == 1

    def faults_per_round():
        # the median over 10 rounds (after 3): a round in which the heap still grows faults its
        # new pages once, whatever malloc does with freed ones
        import resource, statistics, torch
        counts = []
        for _ in range(13):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            tensors = [torch.ones(8 << 18) for _ in range(6)]  # 8 MiB of float32 each
            del tensors
            counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        return statistics.median(counts[3:])
""")


def run_python(code: str, env: dict[str, str] | None = None) -> dict:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    out = subprocess.run([sys.executable, "-c", PROBE + textwrap.dedent(code)], env=full_env, capture_output=True,
                         text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc_only
@pytest.mark.parametrize("switch", ["1", "0"])
def test_retained_memory_is_reused_without_page_faults(switch):
    got = run_python("""
        import json
        from gid_core.hostmem import retain_freed_memory
        hand_back_freed_memory()
        before = faults_per_round()
        applied = retain_freed_memory()
        print(json.dumps({"applied": applied, "before": before, "after": faults_per_round()}))
    """, env={ENV_SWITCH: switch})
    assert got["before"] > 0.9 * PAGES_PER_ROUND  # the probe sees a malloc that hands memory back
    if switch == "1":
        assert got["applied"] is True
        assert got["after"] < 0.05 * PAGES_PER_ROUND
    else:  # turned off: malloc is left as it was
        assert got["applied"] is False
        assert got["after"] > 0.9 * PAGES_PER_ROUND


def test_switch_values(monkeypatch):
    monkeypatch.delenv(ENV_SWITCH, raising=False)
    assert retain_wanted() is True
    monkeypatch.setenv(ENV_SWITCH, "0")
    assert retain_wanted() is False
    monkeypatch.setenv(ENV_SWITCH, "yes")
    with pytest.raises(ValueError, match=f"{ENV_SWITCH} must be 0 or 1, got 'yes'"):
        retain_wanted()


@glibc_only
@pytest.mark.slow
def test_cpu_training_process_retains_freed_memory(tmp_path):
    """The engine turns it on in its training processes on the CPU: a process whose malloc handed
    freed memory back reuses it after a one-iteration job."""
    got = run_python(f"""
        import json
        from pathlib import Path
        from gid_core.config import DataConfig, Hyperparameters, JobConfig, ModelConfig, SyntheticDatasetConfig
        from gid_core.engine import run_job
        from gid_core.synthetic import make_synthetic_dataset

        hand_back_freed_memory()
        root = Path({str(tmp_path)!r})
        info = make_synthetic_dataset(SyntheticDatasetConfig(output_dir=root / "data", num_train=4, num_val=1,
                                                             image_size=32, num_classes=1, max_objects=1))
        data = DataConfig(train_annotations=info["train_annotations"], train_images=info["train_images"])
        student = ModelConfig(arch="retinanet", backbone="resnet18", num_classes=1, fpn_channels=32, norm="gn",
                              min_size=32, max_size=32)
        job = JobConfig(kind="train", student=student, data=data,
                        hyperparameters=Hyperparameters(max_iters=1, batch_size=2, num_workers=0))
        result = run_job(job, output_dir=root / "job")
        print(json.dumps({{"status": result["status"], "faults": faults_per_round()}}))
    """, env={"CUDA_VISIBLE_DEVICES": ""})
    assert got["status"] == "completed"
    assert got["faults"] < 0.05 * PAGES_PER_ROUND
