"""One report builder for the quality arms and the unlabeled-images protocol (``quality_<tag>.json``)."""

from __future__ import annotations

import json
import time

from benchmarks import quality


def test_report_layout_is_shared_and_json_ready():
    plan = quality.QUICK
    data = {"num_train_images": 40, "num_val_images": 8, "output_dir": "/somewhere", "labeled_fraction": 0.1}
    teacher = {"metrics": {"AP": 1.0}, "seconds": 2.0, "dir": "d", "curve": [], "stages": [], "iters": 10,
               "weights": "w.safetensors"}
    run = {"arm": "gid", "seed": 0, "metrics": {"AP": 3.0}, "curve": [], "seconds": 1.0, "seconds_per_iter": 0.1}
    started = time.perf_counter() - 60
    report = quality.build_report(plan, ["--quick", "--labeled-fraction", "0.1"], data, teacher, [run], {"gid": {}},
                                  {}, "table", started, semi_supervised={"labeled_fraction": 0.1})
    assert report["command"] == "python -m benchmarks.quality --quick --labeled-fraction 0.1"
    assert report["dataset"] == {"num_train_images": 40, "num_val_images": 8}  # counts only, no paths
    assert "weights" not in report["teacher"] and report["teacher"]["iters"] == 10
    assert report["semi_supervised"] == {"labeled_fraction": 0.1} and report["runs"] == [run]
    assert report["plan"]["name"] == plan.name and report["models"]["student"]["arch"] == plan.arch
    assert 0.99 < report["wall_minutes"] < 1.5
    json.dumps(report)  # written with write_json_atomic
