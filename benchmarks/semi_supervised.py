"""Distillation on unlabeled images, on the quality benchmark's bench (issue #12 item 2):
``python -m benchmarks.quality --labeled-fraction 0.1`` (or ``0.25``; ``--quick`` for 300 iterations).

The training annotations are split by image, seeded (``--split-seed``, default 0), into a labeled
part (``fraction`` of the images, with their boxes) and the image-only rest (a COCO listing with
``images`` only, in the same image folder). Under the quality benchmark's student budget, seeds and
cached teacher, three arms:

- ``semi_baseline``: the student trained on the labeled part alone;
- ``semi_gid``: GID on the labeled part alone;
- ``semi_gid_unlabeled``: GID on the labeled part plus the unlabeled rest, which takes
  ``unlabeled_ratio`` of the steps (default: the unlabeled share of the images, capped at 0.5, so
  at least half of the steps still see ground truth; ``--unlabeled-ratio`` overrides it).

The teacher is the benchmark's cached teacher, trained on all the training labels: it stands for
a stronger detector the user already has (a published model), while their own labels cover only
``fraction`` of their images. The same budget for every arm means the unlabeled arm sees fewer
labeled batches than the others: the gain it shows is the unlabeled images' net worth.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from gid_core.config import JobConfig
from gid_core.fileio import sha256_file, write_json_atomic

from .common import CACHE_DIR, config_hash, format_table

UNLABELED_SHARE_CAP = 0.5  # at most half of the steps without ground truth
# arm -> (the quality arm it extends, whether it adds the unlabeled rest)
SEMI_ARMS: dict[str, tuple[str, bool]] = {
    "semi_baseline": ("baseline", False),
    "semi_gid": ("gid", False),
    "semi_gid_unlabeled": ("gid", True),
}
SEMI_LABELS = {
    "semi_baseline": "Student, labeled part only",
    "semi_gid": "GID, labeled part only",
    "semi_gid_unlabeled": "GID + unlabeled rest",
}


def default_unlabeled_ratio(fraction: float, cap: float = UNLABELED_SHARE_CAP) -> float:
    """The unlabeled images' share of the training images, capped at ``cap``."""
    return min(cap, 1.0 - fraction)


def split_annotations(annotations: str | Path, fraction: float, seed: int, out_dir: str | Path) -> dict[str, Any]:
    """Writes ``labeled.json`` (a COCO file: ``fraction`` of the images, drawn by ``seed``, with their
    annotations and every category) and ``unlabeled.json`` (the other images, listed without
    annotations) into ``out_dir``; returns their paths and counts. The same inputs give the same
    files: images are drawn from the ids in sorted order."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"labeled fraction must be in (0, 1), got {fraction}")
    coco = json.loads(Path(annotations).read_text(encoding="utf-8"))
    ids = sorted(img["id"] for img in coco["images"])
    count = min(len(ids) - 1, max(1, round(fraction * len(ids))))  # both parts non-empty
    labeled = set(random.Random(seed).sample(ids, count))
    images_l = [img for img in coco["images"] if img["id"] in labeled]
    images_u = [img for img in coco["images"] if img["id"] not in labeled]
    anns = [a for a in coco.get("annotations", []) if a["image_id"] in labeled]
    out_dir = Path(out_dir)
    paths = {"labeled_annotations": str(out_dir / "labeled.json"), "unlabeled_annotations": str(out_dir / "unlabeled.json")}
    write_json_atomic(paths["labeled_annotations"], {**coco, "images": images_l, "annotations": anns})
    write_json_atomic(paths["unlabeled_annotations"], {"images": images_u})
    return {**paths, "num_labeled_images": len(images_l), "num_labeled_annotations": len(anns),
            "num_unlabeled_images": len(images_u)}


def semi_data(data: dict[str, Any], fraction: float, seed: int, ratio: float | None) -> dict[str, Any]:
    """The quality benchmark's ``data`` with the training labels split (under ``benchmarks/cache``,
    keyed by the annotation file's content, the fraction and the seed) and the unlabeled ratio."""
    key = config_hash({"annotations": sha256_file(data["train_annotations"]), "fraction": fraction, "seed": seed})
    split = split_annotations(data["train_annotations"], fraction, seed, CACHE_DIR / f"split-{key}")
    ratio = default_unlabeled_ratio(fraction) if ratio is None else ratio
    return {**data, **split, "labeled_fraction": fraction, "split_seed": seed, "unlabeled_ratio": ratio}


def semi_job(plan: Any, data: dict[str, Any], arm: str, seed: int, teacher_weights: str | None) -> JobConfig:
    """The quality arm's job (``benchmarks.quality.student_job``) on the labeled part, plus the
    unlabeled rest at ``data["unlabeled_ratio"]`` for ``semi_gid_unlabeled``."""
    from .quality import student_job

    base, unlabeled = SEMI_ARMS[arm]
    job = student_job(plan, {**data, "train_annotations": data["labeled_annotations"]}, base, seed, teacher_weights)
    if not unlabeled:
        return job
    dumped = job.model_dump()
    dumped["data"].update(unlabeled_images=data["train_images"], unlabeled_annotations=data["unlabeled_annotations"])
    dumped["hyperparameters"]["unlabeled_ratio"] = data["unlabeled_ratio"]
    return JobConfig.model_validate(dumped)


# ------------------------------------------------------------------------------------ report


def semi_table(teacher: dict[str, Any], summary: dict[str, dict[str, Any]], data: dict[str, Any]) -> str:
    """The quality table's metrics (mean ± std over seeds), with what each arm trains on."""
    from .quality import METRICS, _pm

    labels = f"{data['labeled_fraction']:.0%} ({data['num_labeled_images']} images)"
    rest = f"{data['num_unlabeled_images']} images, {data['unlabeled_ratio']:.0%} of steps"
    rows = [["Teacher", "all", "", *(f"{teacher['metrics'][k]:.1f}" if teacher["metrics"].get(k) is not None
                                      else "n/a" for k in METRICS)]]
    for arm, entry in summary.items():
        rows.append([SEMI_LABELS[arm], labels, rest if SEMI_ARMS[arm][1] else "", *(_pm(entry[k]) for k in METRICS)])
    return format_table(["Model", "Labels", "Unlabeled", *METRICS], rows)


def semi_verdict(summary: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What the unlabeled images add over GID on the labeled part, and GID over the baseline (AP)."""
    if not all(arm in summary for arm in SEMI_ARMS):
        return {}
    ap = {arm: summary[arm]["AP"] for arm in SEMI_ARMS}
    spread = max(e["std"] or 0.0 for e in ap.values())
    gain = ap["semi_gid_unlabeled"]["mean"] - ap["semi_gid"]["mean"]
    return {
        "unlabeled_minus_labeled_only_AP": gain,
        "gid_minus_baseline_AP": ap["semi_gid"]["mean"] - ap["semi_baseline"]["mean"],
        "unlabeled_minus_baseline_AP": ap["semi_gid_unlabeled"]["mean"] - ap["semi_baseline"]["mean"],
        "seed_spread_AP": spread,
        "unlabeled_gain_gt_2x_spread": gain > 2.0 * spread,
    }


def run(plan: Any, args: argparse.Namespace, argv: Sequence[str]) -> int:
    """``benchmarks.quality.main`` with ``--labeled-fraction``: the three arms above, the same
    result file layout (``quality_<tag>.json``) as the quality arms."""
    from . import quality

    fraction = args.labeled_fraction
    plan = replace(plan, name=f"{plan.name}-labeled{round(fraction * 100)}", arms=tuple(SEMI_ARMS))
    tag = args.tag or plan.name
    start = time.perf_counter()
    print(f"plan: {plan}", flush=True)
    base = quality.dataset_for(plan)
    data = semi_data(base, fraction, args.split_seed, args.unlabeled_ratio)
    print(f"split (seed {args.split_seed}): {data['num_labeled_images']} labeled images "
          f"({data['num_labeled_annotations']} objects), {data['num_unlabeled_images']} unlabeled; "
          f"unlabeled ratio {data['unlabeled_ratio']:.2f}", flush=True)
    teacher = quality.train_teacher(plan, base, retrain=args.retrain_teacher)  # the quality arms' teacher
    print(f"teacher AP {teacher['metrics']['AP']:.1f} (trained on all labels)", flush=True)

    runs = quality.run_students(plan, data, teacher["weights"], workers=args.workers, job_fn=semi_job)
    summary = quality.aggregate(runs, arms=SEMI_ARMS)
    table = semi_table(teacher, summary, data)
    targets = semi_verdict(summary)
    print("\n" + table + "\n", flush=True)
    if targets:
        print(f"unlabeled rest: {targets['unlabeled_minus_labeled_only_AP']:+.1f} AP over GID on the labeled part "
              f"(seed spread {targets['seed_spread_AP']:.1f})", flush=True)
    semi = {k: data[k] for k in ("labeled_fraction", "split_seed", "unlabeled_ratio",
                                 "labeled_annotations", "unlabeled_annotations")}
    report = quality.build_report(plan, argv, data, teacher, runs, summary, targets, table, start, semi_supervised=semi)
    write_json_atomic(args.out / f"quality_{tag}.json", report)
    print(f"wrote {args.out / f'quality_{tag}.json'} ({report['wall_minutes']:.1f} min)", flush=True)
    return 0


# ------------------------------------------------------------------------------------ options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("unlabeled images (issue #12; see benchmarks.semi_supervised)")
    group.add_argument("--labeled-fraction", type=float, metavar="F",
                       help="keep labels on F of the training images (e.g. 0.1, 0.25), the rest image-only, "
                            "and run the arms " + ", ".join(SEMI_ARMS))
    group.add_argument("--split-seed", type=int, default=0, help="seed of the labeled/unlabeled split (default: 0)")
    group.add_argument("--unlabeled-ratio", type=float, metavar="R",
                       help=f"fraction of steps on unlabeled batches (default: 1 - F, at most {UNLABELED_SHARE_CAP})")


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``parser.error`` for options that do not fit the protocol."""
    if not 0.0 < args.labeled_fraction < 1.0:
        parser.error("--labeled-fraction must be in (0, 1)")
    if args.unlabeled_ratio is not None and not 0.0 < args.unlabeled_ratio < 1.0:
        parser.error("--unlabeled-ratio must be in (0, 1)")
    if args.arms:
        parser.error(f"--labeled-fraction runs its own arms ({', '.join(SEMI_ARMS)}): drop --arms")
    if args.reuse:
        parser.error("--reuse is not supported with --labeled-fraction")
