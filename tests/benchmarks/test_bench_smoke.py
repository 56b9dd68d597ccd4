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
from benchmarks.speed import PARTS, SpeedSetting, format_ratio, main, measure, ratio_interval
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
    lo, hi = r["overhead_ratio_interval"]
    assert lo <= hi and r["interval_level"] == 0.9


@pytest.mark.timeout(120)
def test_speed_main_writes_json(tmp_path: Path):
    out = tmp_path / "results"
    assert main(["--batch-size", "1", "--image-size", "64", "--iters", "1", "--warmup", "0", "--no-sweep",
                 "--no-profile", "--num-classes", "2", "--out", str(out), "--data-dir", str(tmp_path / "data"),
                 "--host-memory", "system"]) == 0  # "retain" would change this pytest process's malloc
    report = json.loads((out / "speed.json").read_text())
    assert report["overhead_ratio"] > 0 and report["host_memory"] == "system"
    assert set(report["parts_ms"]) == set(PARTS)
    assert report["models"]["teacher"]["backbone"] != report["models"]["student"]["backbone"]
    assert report["machine"]["cpu_count"] >= 1


def _timings(rng: np.random.Generator, n: int, ratio: float, noise: float) -> dict[str, list[float]]:
    """Interleaved step times whose true overhead ratio is ``ratio``, each with its own relative noise
    (as measured on the shared CPU: a step's time varies by a few percent, unlike its neighbours')."""
    step = lambda mean: list(mean * (1.0 + noise * rng.standard_normal(n)))  # noqa: E731
    return {"student_step": step(0.6), "teacher_forward": step(0.4), "gid_step": step(ratio)}


def test_ratio_interval_is_the_bootstrap_of_the_ratio_of_medians():
    """Against an independent numpy bootstrap with the same draws: whole iterations resampled, the
    5th and 95th percentiles (nearest rank) of median(gid) / (median(student) + median(teacher))."""
    samples = {"student_step": [6.0, 7.0, 5.0, 9.0, 6.5], "teacher_forward": [4.0, 3.0, 5.0, 4.5, 4.0],
               "gid_step": [11.0, 10.5, 12.0, 14.0, 10.0]}
    lo, hi = ratio_interval(samples, resamples=500, seed=3)
    import random
    rng, n = random.Random(3), 5
    arrays = {k: np.array(v) for k, v in samples.items()}
    ratios = []
    for _ in range(500):
        idx = np.array([rng.randrange(n) for _ in range(n)])
        ratios.append(np.median(arrays["gid_step"][idx])
                      / (np.median(arrays["student_step"][idx]) + np.median(arrays["teacher_forward"][idx])))
    ratios = np.sort(ratios)
    assert (lo, hi) == (pytest.approx(ratios[int(0.05 * 499)]), pytest.approx(ratios[int(round(0.95 * 499))]))
    point = statistics.median(samples["gid_step"]) / (
        statistics.median(samples["student_step"]) + statistics.median(samples["teacher_forward"]))
    assert lo <= point <= hi and lo < hi
    assert ratio_interval(samples, resamples=500, seed=3) == (lo, hi)  # deterministic
    assert format_ratio(point, (lo, hi)) == f"{point:.3f} [{lo:.3f}, {hi:.3f}]"


def test_ratio_interval_covers_the_true_ratio_and_narrows_with_more_iterations():
    rng = np.random.default_rng(0)
    widths = {}
    for n in (8, 64):
        hits, width = 0, []
        for _ in range(40):
            lo, hi = ratio_interval(_timings(rng, n, 1.05, 0.04), resamples=400, seed=1)
            hits += lo <= 1.05 <= hi
            width.append(hi - lo)
        assert hits >= 30  # a 90 % interval: 36 of 40 expected
        widths[n] = statistics.median(width)
    assert widths[64] < 0.6 * widths[8]


def test_ratio_interval_refuses_uneven_samples():
    with pytest.raises(ValueError, match="same number"):
        ratio_interval({"student_step": [1.0, 2.0], "teacher_forward": [1.0], "gid_step": [2.0, 3.0]})
    with pytest.raises(ValueError, match="same number"):
        ratio_interval({"student_step": [], "teacher_forward": [], "gid_step": []})


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
    distill = earlier.distill_config().model_dump(mode="json")
    recorded = [_run("baseline", 0, 5.0), _run("gid", 0, 9.0)]
    path.write_text(json.dumps({"plan": asdict(earlier), "models": {"distill": distill}, "runs": recorded}))
    # Other arms and seeds, same budget: the recorded runs are reusable.
    runs = reusable_runs(replace(FULL, arms=("feature",), seeds=(0, 1)), [path])
    assert sorted(runs) == [("baseline", 0), ("gid", 0)] and runs["gid", 0]["metrics"]["AP"] == 9.0
    # Another student budget: refused, naming the field.
    with pytest.raises(ValueError, match="student_iters"):
        reusable_runs(QUICK, [path])
    # Another teacher (its first stage only): refused too, so no table mixes students of two teachers.
    with pytest.raises(ValueError, match="teacher_stages"):
        reusable_runs(replace(FULL, teacher_stages=FULL.teacher_stages[:1]), [path])
    # Recorded before the loss normalisation existed (raw sums): refused, not mixed into a new table.
    raw = {k: v for k, v in distill.items() if k != "normalize_losses"}
    (tmp_path / "raw.json").write_text(json.dumps({"plan": asdict(earlier), "models": {"distill": raw}, "runs": recorded}))
    with pytest.raises(ValueError, match="normalize_losses"):
        reusable_runs(FULL, [tmp_path / "raw.json"])
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



def test_quality_second_stage_and_normalisation_arms(capsys):
    """Issue #9 ablations: the arms switch exactly one DistillConfig field; gid_first_stage needs Faster R-CNN."""
    from dataclasses import replace

    from benchmarks.quality import DEFAULT_ARMS, main, student_job

    data = {k: Path("/nonexistent") / k for k in ("train_annotations", "train_images", "val_annotations", "val_images")}
    plan = replace(QUICK, arch="fasterrcnn")
    arms = ("gid", "gid_first_stage", "gid_raw_losses")
    jobs = {arm: student_job(plan, data, arm, 0, "teacher.safetensors") for arm in arms}
    assert jobs["gid"].student.arch == jobs["gid"].teacher.arch == "fasterrcnn"
    distill = {arm: job.hyperparameters.distill.model_dump() for arm, job in jobs.items()}
    assert distill["gid"]["second_stage"] and distill["gid"]["normalize_losses"]
    assert {k for k in distill["gid"] if distill["gid"][k] != distill["gid_first_stage"][k]} == {"second_stage"}
    assert {k for k in distill["gid"] if distill["gid"][k] != distill["gid_raw_losses"][k]} == {"normalize_losses"}
    assert "gid_first_stage" not in DEFAULT_ARMS and QUICK.arch == "retinanet"
    with pytest.raises(SystemExit):
        main(["--arms", "gid", "gid_first_stage"])
    assert "--arch fasterrcnn" in capsys.readouterr().err


def test_quality_peer_method_arms():
    """Issue #12: the peer arms differ from GID only in ``distill.method`` (same teacher, budget, seeds)."""
    from benchmarks.quality import ARM_LABELS, DEFAULT_ARMS, aggregate, results_table, student_job

    data = {k: Path("/nonexistent") / k for k in ("train_annotations", "train_images", "val_annotations", "val_images")}
    jobs = {arm: student_job(QUICK, data, arm, 1, "teacher.safetensors") for arm in ("gid", "fitnet", "dense_response")}
    gid = jobs["gid"].model_dump()
    for arm in ("fitnet", "dense_response"):
        assert arm in DEFAULT_ARMS and arm in ARM_LABELS
        assert jobs[arm].hyperparameters.distill.method == arm
        peer = jobs[arm].model_dump()
        peer["hyperparameters"]["distill"]["method"] = "gid"
        assert peer == gid  # nothing else differs: same teacher, student, data, schedule, seed and weights
    metrics = {k: 10.0 for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")}
    runs = [{"arm": arm, "seed": seed, "metrics": metrics, "seconds_per_iter": 0.5} for arm in ("gid", "fitnet")
            for seed in (0, 1)]
    table = results_table({"metrics": metrics}, aggregate(runs))
    assert ARM_LABELS["fitnet"] in table


def test_quality_gid_maps_arm_and_teacher_key_ignore_distill_settings():
    """The ``gid_maps`` arm differs from GID only in ``adapter_on``; a teacher stage's cache key leaves
    the distillation settings out (a train job never reads them), so adding a ``DistillConfig`` field
    keeps the cached teachers, while anything the teacher trains on still changes the key."""
    from dataclasses import replace

    from benchmarks.quality import ARM_LABELS, student_job, teacher_job, teacher_key_fields

    data = {k: Path("/nonexistent") / k for k in ("train_annotations", "train_images", "val_annotations", "val_images")}
    gid, maps = (student_job(QUICK, data, arm, 1, "t.safetensors").model_dump() for arm in ("gid", "gid_maps"))
    assert maps["hyperparameters"]["distill"]["adapter_on"] == "maps" and "gid_maps" in ARM_LABELS
    maps["hyperparameters"]["distill"]["adapter_on"] = "instances"
    assert maps == gid
    key = lambda plan, iters=100: config_hash(teacher_key_fields(teacher_job(plan, data, iters)))  # noqa: E731
    assert key(FULL) == key(replace(FULL, distill={"adapter_on": "maps", "top_k": 40}))
    assert key(FULL) != key(FULL, 200) and key(FULL) != key(replace(FULL, lr=0.01))


@pytest.mark.timeout(120)
def test_speed_measure_tiny_with_the_adapter_on_the_maps(tmp_path: Path):
    setting = SpeedSetting(batch_size=2, image_size=64, top_k=4, num_classes=2, adapter_on="maps")
    r = measure(setting, iters=1, warmup=0, teacher_cfg=_tiny("resnet18", 64), student_cfg=_tiny("resnet18", 32),
                data_dir=tmp_path / "data", teacher_inference=False)
    assert r["overhead_ratio"] > 0 and r["parts_ms"]["roi_feature"] > 0


# ---------------------------------------------------------------- unlabeled images (issue #12 item 2)


def _coco(num_images: int) -> dict:
    images = [{"id": 10 + i, "file_name": f"{i}.png", "width": 64, "height": 64} for i in range(num_images)]
    anns = [{"id": i + 1, "image_id": 10 + i // 2, "bbox": [1, 1, 8, 8], "area": 64, "category_id": 1, "iscrowd": 0}
            for i in range(2 * num_images)]
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}]}


def test_semi_split_is_seeded_disjoint_and_image_only(tmp_path: Path):
    from benchmarks.semi_supervised import split_annotations

    (tmp_path / "train.json").write_text(json.dumps(_coco(20)))
    a = split_annotations(tmp_path / "train.json", 0.25, 0, tmp_path / "a")
    b = split_annotations(tmp_path / "train.json", 0.25, 0, tmp_path / "b")
    c = split_annotations(tmp_path / "train.json", 0.25, 1, tmp_path / "c")
    labeled = json.loads(Path(a["labeled_annotations"]).read_text())
    listing = json.loads(Path(a["unlabeled_annotations"]).read_text())
    assert (a["num_labeled_images"], a["num_unlabeled_images"], a["num_labeled_annotations"]) == (5, 15, 10)
    ids_l, ids_u = {i["id"] for i in labeled["images"]}, {i["id"] for i in listing["images"]}
    assert not ids_l & ids_u and ids_l | ids_u == set(range(10, 30))
    assert {x["image_id"] for x in labeled["annotations"]} == ids_l and labeled["categories"] == _coco(1)["categories"]
    assert set(listing) == {"images"}  # image-only: no annotations, no categories
    assert Path(b["labeled_annotations"]).read_text() == Path(a["labeled_annotations"]).read_text()  # seeded
    assert {i["id"] for i in json.loads(Path(c["labeled_annotations"]).read_text())["images"]} != ids_l
    # both parts stay non-empty at the extremes
    assert split_annotations(tmp_path / "train.json", 0.01, 0, tmp_path / "d")["num_labeled_images"] == 1
    assert split_annotations(tmp_path / "train.json", 0.99, 0, tmp_path / "e")["num_unlabeled_images"] == 1


def test_semi_arms_differ_only_in_labels_and_unlabeled_images():
    from benchmarks.quality import student_job
    from benchmarks.semi_supervised import SEMI_ARMS, default_unlabeled_ratio, semi_job

    assert default_unlabeled_ratio(0.1) == 0.5 and default_unlabeled_ratio(0.75) == pytest.approx(0.25)
    data = {k: Path("/nonexistent") / k for k in ("train_annotations", "train_images", "val_annotations", "val_images",
                                                   "labeled_annotations", "unlabeled_annotations")}
    data["unlabeled_ratio"] = 0.5
    jobs = {arm: semi_job(QUICK, data, arm, 1, "teacher.safetensors") for arm in SEMI_ARMS}
    assert jobs["semi_baseline"].kind == "train" and jobs["semi_gid"].kind == jobs["semi_gid_unlabeled"].kind == "distill"
    for arm, job in jobs.items():
        assert job.data.train_annotations == data["labeled_annotations"]
        assert (job.data.unlabeled_images is not None) == (arm == "semi_gid_unlabeled")
    mixed = jobs["semi_gid_unlabeled"]
    assert mixed.data.unlabeled_images == data["train_images"]
    assert mixed.data.unlabeled_annotations == data["unlabeled_annotations"]
    assert mixed.hyperparameters.unlabeled_ratio == 0.5
    # GID on labels only is the quality arm on the labeled part: same teacher, budget, seed
    assert jobs["semi_gid"] == student_job(QUICK, {**data, "train_annotations": data["labeled_annotations"]},
                                           "gid", 1, "teacher.safetensors")


def test_semi_table_verdict_and_options(capsys):
    from benchmarks.quality import aggregate, main
    from benchmarks.semi_supervised import SEMI_ARMS, SEMI_LABELS, semi_table, semi_verdict

    aps = {"semi_baseline": (10.0, 12.0), "semi_gid": (14.0, 14.0), "semi_gid_unlabeled": (18.0, 19.0)}
    runs = [_run(arm, seed, ap) for arm, values in aps.items() for seed, ap in enumerate(values)]
    summary = aggregate(runs, arms=SEMI_ARMS)
    assert list(summary) == list(SEMI_ARMS)
    data = {"labeled_fraction": 0.1, "num_labeled_images": 400, "num_unlabeled_images": 3600, "unlabeled_ratio": 0.5}
    table = semi_table({"metrics": {"AP": 30.0}}, summary, data)
    assert table.count("\n") == 5 and all(label in table for label in SEMI_LABELS.values())  # header, rule, teacher, 3 arms
    assert "10% (400 images)" in table and "3600 images, 50% of steps" in table and "11.0 ± 1.4" in table
    v = semi_verdict(summary)
    assert v["unlabeled_minus_labeled_only_AP"] == pytest.approx(4.5) and v["gid_minus_baseline_AP"] == pytest.approx(3.0)
    assert v["seed_spread_AP"] == pytest.approx(statistics.stdev([10.0, 12.0])) and v["unlabeled_gain_gt_2x_spread"]
    for argv, message in ((["--labeled-fraction", "1"], "--labeled-fraction must be in (0, 1)"),
                          (["--labeled-fraction", "0.1", "--arms", "gid"], "drop --arms"),
                          (["--labeled-fraction", "0.1", "--unlabeled-ratio", "1"], "--unlabeled-ratio")):
        with pytest.raises(SystemExit):
            main(argv)
        assert message in capsys.readouterr().err
