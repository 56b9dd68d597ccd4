"""Does GID pay off? (``make bench-quality``, ``make bench-quality ARGS=--quick``)

On the project's synthetic detection set (fixed seed, disjoint train and val splits):

1. train the teacher (RetinaNet, deeper backbone, wider FPN) once, as cosine cycles from the
   previous cycle's weights (``Plan.teacher_stages``; full: 4000 + 12000 iterations, 62.1 AP); each
   cycle is cached under ``benchmarks/cache/teacher-<hash of dataset + job>`` (the job without its
   distillation settings: a teacher trains without them) so later runs skip it;
2. under one fixed training budget, train the student (RetinaNet, light backbone, narrow FPN)
   (a) alone, (b) with full GID, (c)-(e) with only the feature, only the relation, only the
   response loss, and the two peer methods (f) FitNet imitation of whole FPN maps and (g) the
   response loss on every dense prediction (``DistillConfig.method``), each with several seeds;
3. report COCOeval AP, AP50, AP75, APs/m/l (mean and sample std over seeds) as a table shaped like
   the paper's ablation, and plot val AP against iteration for the baseline and GID students.

Everything goes through the engine (``gid_core.engine.run_job``) exactly as a service job would;
the method is tuned for small images only through documented config fields (anchor sizes, the ROI
level mapping scale), never by looking at the benchmark data.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from gid_core.config import DataConfig, DistillConfig, Hyperparameters, JobConfig, ModelConfig
from gid_core.fileio import write_json_atomic
from gid_core.hooks import EvalHook
from gid_core.jobdir import EXPORT_WEIGHTS
from gid_core.trainer import HookBase

from . import semi_supervised
from .common import (
    CACHE_DIR,
    STUDENT,
    TEACHER,
    RESULTS_DIR,
    cached_synthetic_dataset,
    config_hash,
    format_table,
    machine_info,
    mean_std,
    save_figure_atomic,
    student_model_config,
    teacher_model_config,
)

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
# arm -> (kind, which GID losses are on); "baseline" trains the student alone.
ARMS: dict[str, tuple[str, dict[str, Any]]] = {
    "baseline": ("train", {}),
    "feature": ("distill", {"use_feature": True, "use_relation": False, "use_response": False}),
    "relation": ("distill", {"use_feature": False, "use_relation": True, "use_response": False}),
    "response": ("distill", {"use_feature": False, "use_relation": False, "use_response": True}),
    "gid": ("distill", {"use_feature": True, "use_relation": True, "use_response": True}),
    # ablations of issue #9: losses as raw sums (not scaled to 256 channels / 80 classes), and
    # Faster R-CNN (--arch fasterrcnn) without its second stage
    "gid_raw_losses": ("distill", {"use_feature": True, "use_relation": True, "use_response": True,
                                   "normalize_losses": False}),
    "gid_first_stage": ("distill", {"use_feature": True, "use_relation": True, "use_response": True,
                                    "second_stage": False}),
    # peer methods of issue #12 (DistillConfig.method): same teacher, budget, seeds and loss weights
    "fitnet": ("distill", {"method": "fitnet"}),
    "dense_response": ("distill", {"method": "dense_response"}),
    # GID with the adapter on the FPN maps (adapt, then pool; DistillConfig.adapter_on)
    "gid_maps": ("distill", {"use_feature": True, "use_relation": True, "use_response": True, "adapter_on": "maps"}),
}
DEFAULT_ARMS = ("baseline", "feature", "relation", "response", "gid", "fitnet", "dense_response")
ARM_LABELS = {
    "baseline": "Student (no distillation)",
    "feature": "+ feature only",
    "relation": "+ relation only",
    "response": "+ response only",
    "gid": "GID (all three)",
    "gid_raw_losses": "GID, raw loss sums",
    "gid_first_stage": "GID, RPN only (no 2nd stage)",
    "fitnet": "FitNet (whole FPN maps)",
    "dense_response": "Response on all predictions",
    "gid_maps": "GID, adapter on the maps",
}

log = logging.getLogger("benchmarks.quality")


@dataclass(frozen=True)
class Plan:
    """One benchmark configuration: data, teacher recipe, student budget, arms and seeds."""

    name: str
    arch: str = "retinanet"  # teacher and student; "fasterrcnn" for the second-stage ablation
    # data (the synthetic generator's settings)
    image_size: int = 64
    num_classes: int = 3
    num_train: int = 4000
    num_val: int = 300
    min_objects: int = 1
    max_objects: int = 4
    data_seed: int = 0
    # recipe shared by teacher and students
    batch_size: int = 8
    lr: float = 0.02
    warmup_iters: int = 100
    grad_clip: float | None = 10.0
    # models (benchmarks.common.TEACHER / STUDENT unless overridden)
    teacher_backbone: str = TEACHER["backbone"]
    teacher_fpn: int = TEACHER["fpn_channels"]
    student_backbone: str = STUDENT["backbone"]
    student_fpn: int = STUDENT["fpn_channels"]
    norm: str = "gn"
    # teacher: cosine cycles, each starting from the previous cycle's weights (warm restarts);
    # 4000 iterations end at 24.9 AP, 4000 + 12000 at 62.1 (issue #12's teacher >= 35 AP)
    teacher_stages: tuple[int, ...] = (4000, 12000)
    teacher_eval_points: int = 6  # per stage
    # students
    student_iters: int = 1000
    eval_points: int = 6  # val evaluations during a student run (for the AP-vs-iteration plot)
    seeds: tuple[int, ...] = (0, 1)
    arms: tuple[str, ...] = DEFAULT_ARMS
    distill: dict[str, Any] = field(default_factory=dict)  # DistillConfig overrides

    def teacher_model(self, weights: str | None = None) -> ModelConfig:
        return teacher_model_config(self.num_classes, self.image_size, weights=weights, arch=self.arch,
                                    backbone=self.teacher_backbone, fpn_channels=self.teacher_fpn, norm=self.norm)

    def student_model(self) -> ModelConfig:
        return student_model_config(self.num_classes, self.image_size, arch=self.arch,
                                    backbone=self.student_backbone, fpn_channels=self.student_fpn, norm=self.norm)

    def distill_config(self, **switches: Any) -> DistillConfig:
        # The paper's ROI level rule maps a 224 px box to P4 on ~800 px images; keep the same
        # box-to-image ratio on our small images (a documented DistillConfig field).
        base = {"roi_canonical_scale": 224.0 * self.image_size / 800.0}
        return DistillConfig(**{**base, **self.distill, **switches})


FULL = Plan(name="full")
# the plumbing check: the first teacher stage only (~35 instead of ~130 min when not cached)
QUICK = replace(FULL, name="quick", student_iters=300, eval_points=3, teacher_stages=FULL.teacher_stages[:1])


# ------------------------------------------------------------------------------------ jobs


def dataset_for(plan: Plan) -> dict:
    return cached_synthetic_dataset(
        num_train=plan.num_train, num_val=plan.num_val, image_size=plan.image_size,
        num_classes=plan.num_classes, min_objects=plan.min_objects, max_objects=plan.max_objects,
        seed=plan.data_seed,
    )


def _data_config(data: dict) -> DataConfig:
    return DataConfig(
        train_annotations=data["train_annotations"], train_images=data["train_images"],
        val_annotations=data["val_annotations"], val_images=data["val_images"],
    )


def _hyperparameters(plan: Plan, *, max_iters: int, seed: int, eval_period: int | None, **distill: Any) -> Hyperparameters:
    return Hyperparameters(
        max_iters=max_iters, batch_size=plan.batch_size, lr=plan.lr, warmup_iters=min(plan.warmup_iters, max_iters // 4),
        schedule="cosine", grad_clip=plan.grad_clip, amp=False, num_workers=0, seed=seed,
        log_period=min(50, max_iters), checkpoint_period=max_iters, keep_checkpoints=1,
        eval_period=eval_period, distill=plan.distill_config(**distill),
    )


def teacher_job(plan: Plan, data: dict, iters: int, init_weights: str | None = None) -> JobConfig:
    """One teacher stage: ``iters`` iterations of the shared recipe, from ``init_weights`` if given."""
    model = plan.teacher_model()
    if init_weights is not None:
        model = model.model_copy(update={"weights": init_weights})
    return JobConfig(
        kind="train",
        student=model,
        data=_data_config(data),
        hyperparameters=_hyperparameters(plan, max_iters=iters, seed=0, eval_period=(
            max(1, iters // plan.teacher_eval_points) if plan.teacher_eval_points else None)),
    )


def student_job(plan: Plan, data: dict, arm: str, seed: int, teacher_weights: str | None) -> JobConfig:
    kind, switches = ARMS[arm]
    period = max(1, plan.student_iters // plan.eval_points)
    return JobConfig(
        kind=kind,  # type: ignore[arg-type]
        student=plan.student_model(),
        teacher=plan.teacher_model(teacher_weights) if kind == "distill" else None,
        data=_data_config(data),
        hyperparameters=_hyperparameters(plan, max_iters=plan.student_iters, seed=seed, eval_period=period, **switches),
    )


class EvalCurveHook(HookBase):
    """Collects ``(iteration, metrics)`` each time the engine's ``EvalHook`` has evaluated."""

    def __init__(self) -> None:
        self.points: list[dict[str, Any]] = []
        self._seen: object = None

    def after_step(self) -> None:
        for hook in self.trainer.hooks:
            if isinstance(hook, EvalHook) and hook.latest and hook.latest is not self._seen:
                self._seen = hook.latest  # EvalHook stores a new dict per evaluation
                self.points.append({"iteration": self.trainer.iter, **{k: hook.latest.get(k) for k in METRICS}})


def _run(job: JobConfig, output_dir: Path, *, resume: bool) -> tuple[dict[str, Any], list[dict], float]:
    from gid_core.engine import run_job

    curve = EvalCurveHook()
    start = time.perf_counter()
    result = run_job(job, output_dir=output_dir, hooks=[curve], resume=resume)
    seconds = time.perf_counter() - start
    if result["status"] != "completed":
        raise RuntimeError(f"training in {output_dir} ended as {result['status']!r}")
    return result, curve.points, seconds


def teacher_key_fields(job: JobConfig) -> dict[str, Any]:
    """What a teacher stage's cache key hashes: the job without its distillation settings, which a
    train job never reads (a field added to ``DistillConfig`` must not retrain the teachers)."""
    fields = job.model_dump(mode="json")
    del fields["hyperparameters"]["distill"]
    return fields


def _teacher_stage(plan: Plan, data: dict, iters: int, init_weights: str | None, *, retrain: bool) -> dict[str, Any]:
    """One cached teacher stage: ``{"weights", "metrics", "curve", "seconds", "dir"}``."""
    job = teacher_job(plan, data, iters, init_weights)
    key = config_hash({"job": teacher_key_fields(job), "data": {k: data[k] for k in sorted(data) if "num" in k}})
    out = CACHE_DIR / f"teacher-{key}"
    record = out / "teacher.json"
    if retrain and out.exists():
        shutil.rmtree(out)
    if record.is_file():
        cached = json.loads(record.read_text(encoding="utf-8"))
        if Path(cached["weights"]).is_file():
            print(f"teacher stage: cached in {out} (AP {cached['metrics'].get('AP'):.1f})", flush=True)
            return cached
    print(f"teacher stage: training {iters} iterations into {out} ...", flush=True)
    result, curve, seconds = _run(job, out / "run", resume=True)
    metrics = {k: result["metrics"].get(k) for k in METRICS}
    info = {
        "weights": str(Path(result["export_dir"]) / EXPORT_WEIGHTS),
        "metrics": metrics,
        "curve": [p for p in curve if p["iteration"] < iters] + [{"iteration": iters, **metrics}],
        "seconds": seconds,
        "dir": str(out),
        "job": job.model_dump(mode="json"),
    }
    write_json_atomic(record, info)
    print(f"teacher stage: AP {metrics['AP']:.1f} after {iters} iterations ({seconds / 60:.1f} min)", flush=True)
    return info


def train_teacher(plan: Plan, data: dict, *, retrain: bool = False) -> dict[str, Any]:
    """The cached teacher after all ``plan.teacher_stages``: ``{"weights", "metrics", "curve",
    "seconds", "dir", "stages"}``. A stage trains only on a cache miss (an interrupted stage
    resumes from its last checkpoint); the curve's iterations count from the first stage."""
    weights, done, curve, seconds, stages = None, 0, [], 0.0, []
    for iters in plan.teacher_stages:
        stage = _teacher_stage(plan, data, iters, weights, retrain=retrain)
        curve += [{**p, "iteration": done + p["iteration"]} for p in stage["curve"]]
        weights, done, seconds = stage["weights"], done + iters, seconds + stage["seconds"]
        stages.append({"iters": iters, "metrics": stage["metrics"], "seconds": stage["seconds"], "dir": stage["dir"]})
    return {"weights": weights, "metrics": stages[-1]["metrics"], "curve": curve, "seconds": seconds,
            "dir": stages[-1]["dir"], "stages": stages, "iters": done}


def run_student(plan: Plan, data: dict, arm: str, seed: int, teacher_weights: str, threads: int | None = None,
                job_fn: Callable[..., JobConfig] | None = None) -> dict[str, Any]:
    """One student training through the engine; ``threads`` sets torch's intra-op threads (for
    runs in worker processes); ``job_fn`` builds the job instead of ``student_job`` (same
    arguments; a top-level function: it is pickled to worker processes)."""
    if threads is not None:
        torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    job = (job_fn or student_job)(plan, data, arm, seed, teacher_weights)
    out = CACHE_DIR / "runs" / plan.name / f"{arm}-seed{seed}"
    if out.exists():
        shutil.rmtree(out)  # a benchmark run always trains afresh
    result, curve, seconds = _run(job, out, resume=False)
    metrics = {k: result["metrics"].get(k) for k in METRICS}
    curve = [p for p in curve if p["iteration"] < plan.student_iters] + [{"iteration": plan.student_iters, **metrics}]
    return {"arm": arm, "seed": seed, "metrics": metrics, "curve": curve, "seconds": seconds,
            "seconds_per_iter": seconds / plan.student_iters}


def run_students(plan: Plan, data: dict, teacher_weights: str, *, workers: int,
                 reuse: dict[tuple[str, int], dict[str, Any]] | None = None,
                 job_fn: Callable[..., JobConfig] | None = None) -> list[dict[str, Any]]:
    """Every (seed, arm) run, ``workers`` at a time in spawned processes (each with an equal share
    of the cores), or in this process when ``workers`` is 1; runs found in ``reuse`` are taken
    from there instead. Results in (seed, arm) order."""
    reuse = reuse or {}
    order = [(arm, seed) for seed in plan.seeds for arm in plan.arms]
    tasks = [t for t in order if t not in reuse]

    def report(r: dict[str, Any]) -> None:
        m = r["metrics"]
        print(f"  {r['arm']:>9} seed {r['seed']}: AP {m['AP']:.1f}  AP50 {m['AP50']:.1f}  "
              f"({r['seconds']:.0f} s, {r['seconds_per_iter']:.2f} s/iter)", flush=True)

    done = {t: reuse[t] for t in order if t in reuse}
    for r in done.values():
        print(f"  (from an earlier run) {r['arm']} seed {r['seed']}", flush=True)
        report(r)
    if workers <= 1 or len(tasks) <= 1:
        for arm, seed in tasks:
            done[arm, seed] = run_student(plan, data, arm, seed, teacher_weights, None, job_fn)
            report(done[arm, seed])
        return [done[t] for t in order]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(run_student, plan, data, arm, seed, teacher_weights, threads, job_fn): (arm, seed)
                   for arm, seed in tasks}
        for future in as_completed(futures):
            r = future.result()
            done[futures[future]] = r
            report(r)
    return [done[t] for t in order]


def reusable_runs(plan: Plan, paths: Sequence[Path]) -> dict[tuple[str, int], dict[str, Any]]:
    """Student runs recorded in earlier result files of the same plan (arms, seeds and the plan's
    name aside); a file of another plan is an error, not a silent mix of budgets."""
    mine = _comparable(asdict(plan))
    runs: dict[tuple[str, int], dict[str, Any]] = {}
    for path in paths:
        try:
            report = json.loads(Path(path).read_text())
            theirs, recorded = _comparable(report["plan"]), report["runs"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a quality result file ({e})") from None
        if theirs != mine:
            diff = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
            raise ValueError(f"{path}: recorded under another plan (differs in {', '.join(diff)})")
        changed = _distill_differences(plan.distill_config().model_dump(mode="json"),
                                       report.get("models", {}).get("distill", {}))
        if changed:
            raise ValueError(f"{path}: recorded with other distillation settings ({', '.join(changed)})")
        for r in recorded:
            runs[r["arm"], r["seed"]] = r
    return runs


def _distill_differences(mine: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    """Distill settings recorded differently. A setting a file lacks was added later and had its
    old behaviour then: every setting's default keeps the old computation, except the loss
    normalisation, which is on by default and did not exist (raw sums) before."""
    theirs = {"normalize_losses": False, **theirs}
    return sorted(k for k in theirs if k in mine and mine[k] != theirs[k])


def _comparable(plan: dict[str, Any]) -> dict[str, Any]:
    # Through JSON, so tuples and lists compare equal. A field a file lacks was added later (arch):
    # the run had its default.
    plan = {"arch": Plan.arch, **plan}
    return {k: v for k, v in json.loads(json.dumps(plan)).items() if k not in ("name", "arms", "seeds")}


# ------------------------------------------------------------------------------------ report


def aggregate(runs: Sequence[dict[str, Any]], arms: Iterable[str] = ARMS) -> dict[str, dict[str, Any]]:
    """Per arm of ``arms`` (in that order): mean / std / values of every metric over seeds (None
    values are skipped)."""
    out: dict[str, dict[str, Any]] = {}
    for arm in arms:
        rows = [r for r in runs if r["arm"] == arm]
        if not rows:
            continue
        entry: dict[str, Any] = {"seeds": [r["seed"] for r in rows]}
        for k in METRICS:
            values = [r["metrics"][k] for r in rows if r["metrics"].get(k) is not None]
            mean, std = mean_std(values)
            entry[k] = {"mean": mean if values else None, "std": std if values else None, "values": values}
        entry["seconds_per_iter"] = mean_std([r["seconds_per_iter"] for r in rows])[0]
        out[arm] = entry
    return out


def _pm(entry: dict[str, Any] | None) -> str:
    if not entry or entry.get("mean") is None:
        return "n/a"
    return f"{entry['mean']:.1f} ± {entry['std']:.1f}" if entry.get("std") else f"{entry['mean']:.1f}"


def results_table(teacher: dict[str, Any], summary: dict[str, dict[str, Any]]) -> str:
    """The paper's ablation layout: which losses are on, then COCO metrics (mean ± std over seeds)."""
    headers = ["Model", "Feature", "Relation", "Response", *METRICS]
    rows = [["Teacher", "", "", "", *(f"{teacher['metrics'][k]:.1f}" if teacher["metrics"].get(k) is not None else "n/a" for k in METRICS)]]
    for arm, entry in summary.items():
        _, sw = ARMS[arm]
        marks = ["✓" if sw.get(f"use_{x}") else "" for x in ("feature", "relation", "response")]
        rows.append([ARM_LABELS[arm], *marks, *(_pm(entry[k]) for k in METRICS)])
    return format_table(headers, rows)


def verdict(teacher: dict[str, Any], summary: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The targets (not asserts): GID >= baseline + 3 AP with a gain > 2x the seed spread, and
    GID >= teacher AP."""
    if "gid" not in summary or "baseline" not in summary:
        return {}
    gid, base = summary["gid"]["AP"], summary["baseline"]["AP"]
    gain = gid["mean"] - base["mean"]
    spread = max(gid["std"] or 0.0, base["std"] or 0.0)
    return {
        "gid_minus_baseline_AP": gain,
        "seed_spread_AP": spread,
        "gain_ge_3AP": gain >= 3.0,
        "gain_gt_2x_spread": gain > 2.0 * spread,
        "gid_minus_teacher_AP": gid["mean"] - teacher["metrics"]["AP"],
        "gid_ge_teacher": gid["mean"] >= teacher["metrics"]["AP"],
    }


def plot_curves(runs: Sequence[dict[str, Any]], teacher: dict[str, Any], path: Path, title: str) -> None:
    """Left: val AP against student iteration (mean over seeds, min-max band for baseline and
    GID). Right: the teacher's own val AP against its iterations (its stages in sequence)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_t) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    for arm, colour in (("baseline", "C0"), ("gid", "C3"), ("feature", "C1"), ("relation", "C2"), ("response", "C4")):
        curves = [r["curve"] for r in runs if r["arm"] == arm]
        if not curves:
            continue
        iters = [p["iteration"] for p in curves[0]]
        values = [[c[i]["AP"] or 0.0 for c in curves if i < len(c)] for i in range(len(iters))]
        mean = [sum(v) / len(v) for v in values]
        main = arm in ("baseline", "gid")
        ax.plot(iters, mean, marker="o" if main else ".", color=colour, lw=2 if main else 1,
                alpha=1.0 if main else 0.7, label=f"{ARM_LABELS[arm]} (mean of {len(curves)} seeds)")
        if main and len(curves) > 1:
            ax.fill_between(iters, [min(v) for v in values], [max(v) for v in values], color=colour, alpha=0.15)
    if teacher["metrics"].get("AP") is not None:
        ax.axhline(teacher["metrics"]["AP"], color="k", ls="--", lw=1, label="teacher (final)")
    ax.set_xlabel("student iteration")
    ax.set_ylabel("val AP (COCOeval, %)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    points = teacher.get("curve") or []
    ax_t.plot([p["iteration"] for p in points], [p["AP"] or 0.0 for p in points], marker="o", color="k")
    done = 0
    for stage in teacher.get("stages", [])[:-1]:
        done += stage["iters"]
        ax_t.axvline(done, color="grey", ls=":", lw=1)
    ax_t.set_xlabel("teacher iteration (dotted: warm restart)")
    ax_t.set_ylabel("val AP (%)")
    ax_t.set_title("teacher (cached)")
    ax_t.grid(alpha=0.3)
    save_figure_atomic(fig, path)
    plt.close(fig)


# ------------------------------------------------------------------------------------ main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"short student budget ({QUICK.student_iters} iterations)")
    parser.add_argument("--seeds", type=int, nargs="+", help="student seeds (default: 0 1)")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS),
                        help=f"arms to run (default: {' '.join(DEFAULT_ARMS)})")
    parser.add_argument("--arch", choices=["retinanet", "fasterrcnn"], default="retinanet",
                        help="teacher and student detector (fasterrcnn: compare arms gid and gid_first_stage)")
    parser.add_argument("--student-iters", type=int)
    parser.add_argument("--teacher-stages", type=int, nargs="+", help="teacher cosine cycles (iterations each)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="student runs trained at the same time, each in its own process (default: 2)")
    parser.add_argument("--retrain-teacher", action="store_true", help="ignore the cached teacher")
    parser.add_argument("--reuse", type=Path, nargs="+", default=[], metavar="RESULT_JSON",
                        help="take (arm, seed) runs from these earlier result files of the same plan")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--tag", help="result file name suffix (default: the plan name)")
    semi_supervised.add_arguments(parser)  # --labeled-fraction: the unlabeled-images protocol
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")

    plan = QUICK if args.quick else FULL
    overrides: dict[str, Any] = {}
    if args.seeds:
        overrides["seeds"] = tuple(args.seeds)
    if args.arms:
        overrides["arms"] = tuple(a for a in ARMS if a in args.arms)
    if args.student_iters is not None:
        if args.student_iters < 1:
            parser.error("--student-iters must be >= 1")
        overrides["student_iters"] = args.student_iters
    if args.teacher_stages is not None:
        if any(v < 1 for v in args.teacher_stages):
            parser.error("--teacher-stages must be >= 1 each")
        overrides["teacher_stages"] = tuple(args.teacher_stages)
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    if args.arch != "retinanet":
        overrides["arch"] = args.arch
    elif args.arms and "gid_first_stage" in args.arms:
        parser.error("gid_first_stage ablates Faster R-CNN's second stage: add --arch fasterrcnn")
    plan = replace(plan, **overrides)
    if args.labeled_fraction is not None:
        semi_supervised.check_arguments(parser, args)
        return semi_supervised.run(plan, args, list(sys.argv[1:] if argv is None else argv))
    try:
        reuse = reusable_runs(plan, args.reuse)
    except ValueError as e:
        parser.error(str(e))
    tag = args.tag or plan.name
    start = time.perf_counter()
    print(f"plan: {plan}", flush=True)
    data = dataset_for(plan)
    print(f"data: {data['num_train_images']} train / {data['num_val_images']} val images "
          f"({data['num_train_annotations']} / {data['num_val_annotations']} objects) in {data['output_dir']}", flush=True)
    teacher = train_teacher(plan, data, retrain=args.retrain_teacher)
    print(f"teacher AP {teacher['metrics']['AP']:.1f} ({teacher['seconds'] / 60:.1f} min to train)", flush=True)

    runs = run_students(plan, data, teacher["weights"], workers=args.workers, reuse=reuse)
    summary = aggregate(runs)
    table = results_table(teacher, summary)
    targets = verdict(teacher, summary)
    print("\n" + table + "\n", flush=True)
    if targets:
        print(f"GID - baseline: {targets['gid_minus_baseline_AP']:+.1f} AP (seed spread {targets['seed_spread_AP']:.1f}); "
              f"GID - teacher: {targets['gid_minus_teacher_AP']:+.1f} AP", flush=True)

    report = build_report(plan, list(sys.argv[1:] if argv is None else argv), data, teacher, runs, summary,
                          targets, table, start, reused_from=[str(p) for p in args.reuse])
    write_json_atomic(args.out / f"quality_{tag}.json", report)
    plot_curves(runs, teacher, args.out / f"quality_{tag}_curve.png",
                f"val AP vs iteration ({plan.name}: {plan.student_iters} iters, seeds {list(plan.seeds)})")
    print(f"wrote {args.out / f'quality_{tag}.json'} and {args.out / f'quality_{tag}_curve.png'} "
          f"({report['wall_minutes']:.1f} min)", flush=True)
    return 0


def build_report(plan: Plan, argv: Sequence[str], data: dict, teacher: dict[str, Any], runs: list[dict[str, Any]],
                 summary: dict, targets: dict, table: str, started: float, **extra: Any) -> dict[str, Any]:
    """The result file's content (``quality_<tag>.json``), for the quality arms and the
    unlabeled-images protocol alike; ``extra`` keys go in after the runs."""
    return {
        "plan": asdict(plan),
        "command": "python -m benchmarks.quality " + " ".join(argv),
        "machine": machine_info(),
        "dataset": {k: v for k, v in data.items() if k.startswith("num_")},
        "teacher": {k: teacher.get(k) for k in ("metrics", "seconds", "dir", "curve", "stages", "iters")},
        "models": {
            "teacher": plan.teacher_model().model_dump(mode="json"),
            "student": plan.student_model().model_dump(mode="json"),
            "distill": plan.distill_config().model_dump(mode="json"),
        },
        "runs": runs,
        **extra,
        "summary": summary,
        "targets": targets,
        "table": table,
        "wall_minutes": (time.perf_counter() - started) / 60,
    }


if __name__ == "__main__":
    sys.exit(main())
