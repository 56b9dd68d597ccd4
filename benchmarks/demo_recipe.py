"""Finding ``make demo``'s recipe with the engine alone (no service): teacher, baseline and GID
student on one small synthetic task, with wall and CPU time per run.

    python -m benchmarks.demo_recipe --seeds 0 1
    python -m benchmarks.demo_recipe --set student_fpn=32 teacher_stages=[600] --tag fpn32

Every run goes through ``benchmarks.quality`` (the same jobs as ``make bench-quality``; the teacher is
cached by its config hash), so a recipe found here is the service's recipe: ``scripts/demo.py``
takes the same numbers from its ``DemoSizes``. CPU time is ``time.process_time`` of this process
(data loading runs in it: ``num_workers=0``), the figure to compare on a shared machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from . import quality
from .common import BENCH_DIR, RESULTS_DIR, cached_synthetic_dataset, format_table
from gid_core.fileio import write_json_atomic

ROOT = BENCH_DIR.parent


def _demo_sizes() -> Any:
    spec = importlib.util.spec_from_file_location("gid_demo_script", ROOT / "scripts" / "demo.py")
    demo = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look it up there
    spec.loader.exec_module(demo)  # type: ignore[union-attr]
    return demo.SIZES


def demo_scene() -> dict[str, Any]:
    """The demo's scene settings (``SyntheticDatasetConfig`` fields a quality Plan does not carry)."""
    return _demo_sizes().scene()


def demo_data(plan: quality.Plan, scene: dict[str, Any]) -> dict:
    """``quality.dataset_for`` with the demo's scene settings (cached by the whole config)."""
    return cached_synthetic_dataset(
        num_train=plan.num_train, num_val=plan.num_val, image_size=plan.image_size, num_classes=plan.num_classes,
        min_objects=plan.min_objects, max_objects=plan.max_objects, seed=plan.data_seed, **scene,
    )


def demo_plan() -> quality.Plan:
    """scripts/demo.py's recipe (its ``SIZES``, the one home of the demo's numbers) as a quality
    Plan: baseline and GID students, one evaluation at the end; the scene is ``demo_scene()``."""
    s = _demo_sizes()
    return quality.Plan(
        name="demo", image_size=s.image_size, num_classes=s.num_classes, num_train=s.num_train, num_val=s.num_val,
        min_objects=s.min_objects, max_objects=s.max_objects, batch_size=s.batch_size, lr=s.lr,
        warmup_iters=s.warmup_iters, teacher_backbone=s.teacher_backbone, teacher_fpn=s.teacher_fpn,
        student_backbone=s.student_backbone, student_fpn=s.student_fpn, teacher_stages=(s.teacher_iters,),
        teacher_eval_points=4, student_iters=s.student_iters, eval_points=1, seeds=(0,),
        arms=("baseline", "gid"), distill=dict(s.distill),
    )


def _parse_sets(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        parsed = json.loads(value)
        out[key] = tuple(parsed) if isinstance(parsed, list) else parsed
    return out


def _timed(fn, *args: Any) -> tuple[Any, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.demo_recipe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--arms", nargs="+", choices=list(quality.ARMS))
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=JSON", help="override Plan fields")
    parser.add_argument("--scene", nargs="*", default=[], metavar="FIELD=JSON",
                        help="override the demo's scene (object_scale, clutter, photo_background)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--teacher", type=Path, metavar="TEACHER_JSON",
                        help="a cached teacher's teacher.json (its key hashes the distill settings too, so a "
                        "loss-weight variant would otherwise train its own teacher)")
    parser.add_argument("--tag")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides, scene = _parse_sets(args.set), {**demo_scene(), **_parse_sets(args.scene)}
    if args.seeds:
        overrides["seeds"] = tuple(args.seeds)
    if args.arms:
        overrides["arms"] = tuple(args.arms)
    plan = replace(demo_plan(), **overrides)
    tag = args.tag or plan.name
    plan = replace(plan, name=f"recipe-{tag}")
    print(f"plan: {plan}\nscene: {scene}", flush=True)
    (data, wall_d, cpu_d) = _timed(demo_data, plan, scene)
    print(f"data: {data['num_train_annotations']} / {data['num_val_annotations']} objects "
          f"({wall_d:.0f} s wall, {cpu_d:.0f} s CPU)", flush=True)
    if args.teacher:
        teacher, wall_t, cpu_t = json.loads(args.teacher.read_text(encoding="utf-8")), 0.0, 0.0
    else:
        teacher, wall_t, cpu_t = _timed(quality.train_teacher, plan, data)
    print(f"teacher AP {teacher['metrics']['AP']:.1f} curve {[round(p['AP'] or 0, 1) for p in teacher['curve']]} "
          f"({wall_t:.0f} s wall, {cpu_t:.0f} s CPU this call)", flush=True)
    rows, runs = [["teacher", "", f"{teacher['metrics']['AP']:.1f}", f"{teacher['metrics']['AP50']:.1f}",
                   f"{wall_t:.0f}", f"{cpu_t:.0f}"]], []
    for seed in plan.seeds:
        for arm in plan.arms:
            r, wall, cpu = _timed(quality.run_student, plan, data, arm, seed, teacher["weights"])
            r.update(wall_seconds=wall, cpu_seconds=cpu)
            runs.append(r)
            rows.append([arm, seed, f"{r['metrics']['AP']:.1f}", f"{r['metrics']['AP50']:.1f}", f"{wall:.0f}", f"{cpu:.0f}"])
            print(f"  {arm} seed {seed}: AP {r['metrics']['AP']:.1f} ({wall:.0f} s wall, {cpu:.0f} s CPU)", flush=True)
    table = format_table(["run", "seed", "AP", "AP50", "wall s", "CPU s"], rows)
    print("\n" + table, flush=True)
    write_json_atomic(RESULTS_DIR / f"demo_recipe_{tag}.json", {
        "plan": {k: v for k, v in plan.__dict__.items()}, "scene": scene, "teacher": {k: teacher[k] for k in ("metrics", "curve", "seconds")},
        "teacher_wall": wall_t, "teacher_cpu": cpu_t, "runs": runs, "table": table,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
