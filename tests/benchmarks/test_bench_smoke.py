"""Smoke tests of the benchmarks: the speed measurement on a tiny config and the JSON it writes,
and the small formulas the reports rest on (percentiles, seed statistics, the quality verdict)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest

from benchmarks.common import config_hash, format_table, mean_std
from benchmarks.quality import FULL, QUICK, aggregate, results_table, reusable_runs, verdict
from benchmarks.service import percentiles
from benchmarks.speed import PARTS, SpeedSetting, main, measure
from gid_core.config import ModelConfig


def _tiny(backbone: str, fpn: int) -> ModelConfig:
    return ModelConfig(arch="retinanet", backbone=backbone, num_classes=2, fpn_channels=fpn, norm="gn",
                       min_size=64, max_size=64, anchor_sizes=[8, 16, 32, 64, 128])


@pytest.mark.timeout(120)
def test_speed_measure_tiny(tmp_path: Path):
    setting = SpeedSetting(batch_size=2, image_size=64, top_k=4, num_classes=2)
    r = measure(setting, iters=2, warmup=0, teacher_cfg=_tiny("resnet18", 64), student_cfg=_tiny("resnet18", 32),
                data_dir=tmp_path / "data")
    t = r["times_ms"]
    assert set(t) == {"student_step", "teacher_forward", "gid_step", "teacher_inference"}
    assert set(r["parts_ms"]) == set(PARTS)
    assert all(v > 0 and math.isfinite(v) for v in [*t.values(), *r["parts_ms"].values()])
    # The ratio is what its definition says, from the same medians.
    assert r["overhead_ratio"] == pytest.approx(t["gid_step"] / (t["student_step"] + t["teacher_forward"]))
    assert r["overhead_ratio"] > 0
    assert r["parts_sum_ms"] == pytest.approx(sum(r["parts_ms"].values()))
    assert len(r["samples_ms"]["gid_step"]) == 2
    assert 0 < r["gi_per_image"] <= 4  # GISM kept at most top_k instances per image


@pytest.mark.timeout(120)
def test_speed_main_writes_json(tmp_path: Path):
    out = tmp_path / "results"
    assert main(["--batch-size", "1", "--image-size", "64", "--iters", "1", "--warmup", "0", "--no-sweep",
                 "--no-profile", "--num-classes", "2", "--out", str(out), "--data-dir", str(tmp_path / "data")]) == 0
    report = json.loads((out / "speed.json").read_text())
    assert report["overhead_ratio"] > 0
    assert set(report["parts_ms"]) == set(PARTS)
    assert report["models"]["teacher"]["backbone"] != report["models"]["student"]["backbone"]
    assert report["machine"]["cpu_count"] >= 1


def test_speed_main_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--iters", "0"])
    assert e.value.code != 0 and "--iters must be >= 1" in capsys.readouterr().err


def test_percentiles_nearest_rank():
    samples = [0.001 * v for v in [5, 1, 4, 2, 3, 9, 7, 6, 8, 10]]  # seconds; 1..10 ms
    p = percentiles(samples)
    ms = np.array(sorted(1e3 * v for v in samples))
    for q in (50, 90, 99):
        assert p[f"p{q}"] == pytest.approx(np.percentile(ms, q, method="inverted_cdf"))
    assert p["count"] == 10 and p["max"] == pytest.approx(10) and p["mean"] == pytest.approx(5.5)
    assert percentiles([0.002])["p99"] == pytest.approx(2.0)
    assert percentiles([]) == {"count": 0}


def test_mean_std_and_hash():
    assert mean_std([1.0, 2.0, 4.0]) == pytest.approx((statistics.fmean([1, 2, 4]), statistics.stdev([1, 2, 4])))
    assert mean_std([3.0]) == (3.0, 0.0)
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


def _run(arm: str, seed: int, ap: float) -> dict:
    metrics = {"AP": ap, "AP50": ap + 20, "AP75": ap - 5, "APs": ap - 10, "APm": ap + 5, "APl": None}
    return {"arm": arm, "seed": seed, "metrics": metrics, "seconds_per_iter": 0.5}


def test_quality_reuse_takes_runs_of_the_same_plan_only(tmp_path: Path):
    from dataclasses import asdict, replace

    earlier = replace(FULL, arms=("baseline", "gid"), seeds=(0,))
    path = tmp_path / "quality_earlier.json"
    path.write_text(json.dumps({"plan": asdict(earlier), "runs": [_run("baseline", 0, 5.0), _run("gid", 0, 9.0)]}))
    # Other arms and seeds, same budget: the recorded runs are reusable.
    runs = reusable_runs(replace(FULL, arms=("feature",), seeds=(0, 1)), [path])
    assert sorted(runs) == [("baseline", 0), ("gid", 0)] and runs["gid", 0]["metrics"]["AP"] == 9.0
    # Another student budget: refused, naming the field.
    with pytest.raises(ValueError, match="student_iters"):
        reusable_runs(QUICK, [path])
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a quality result file"):
        reusable_runs(FULL, [tmp_path / "bad.json"])


def test_quality_aggregate_and_verdict():
    runs = [_run("baseline", 0, 20.0), _run("baseline", 1, 22.0), _run("gid", 0, 26.0), _run("gid", 1, 27.0)]
    summary = aggregate(runs)
    assert list(summary) == ["baseline", "gid"]
    assert summary["baseline"]["AP"]["mean"] == pytest.approx(21.0)
    assert summary["baseline"]["AP"]["std"] == pytest.approx(statistics.stdev([20.0, 22.0]))
    assert summary["gid"]["APl"]["mean"] is None  # undefined metrics stay undefined
    teacher = {"metrics": {"AP": 30.0, "AP50": 50.0, "AP75": 25.0, "APs": 20.0, "APm": 35.0, "APl": None}}
    v = verdict(teacher, summary)
    assert v["gid_minus_baseline_AP"] == pytest.approx(26.5 - 21.0)
    assert v["seed_spread_AP"] == pytest.approx(statistics.stdev([20.0, 22.0]))
    assert v["gain_ge_3AP"] and v["gain_gt_2x_spread"]
    assert v["gid_minus_teacher_AP"] == pytest.approx(-3.5) and not v["gid_ge_teacher"]
    table = results_table(teacher, summary)
    assert "21.0 ± 1.4" in table and "n/a" in table and table.count("\n") == 4  # header, rule, teacher, 2 arms


def test_format_table_aligns_columns():
    table = format_table(["a", "long header"], [["x", 1.5], ["yyyy", 0.001]])
    lines = table.splitlines()
    assert len({len(line) for line in lines}) == 1
    assert "0.001" in table and "1.50" in table

