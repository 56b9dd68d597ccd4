"""GPU check (``make gpu-check``): does the engine run right, and how fast, on a CUDA card?

On a CUDA machine, with random weights and the synthetic digits (nothing downloaded):

1. ``distill_job``: a short distillation job through ``gid_core.engine.run_job`` (RetinaNet
   ResNet-50 teacher -> ResNet-18 student at 512 px, AMP on): status, train images/s over the
   steps after the first few, peak GPU memory.
2. ``amp_parity``: the distiller's losses on one fixed batch in fp32 and under autocast (float16
   on CUDA, bfloat16 on CPU), and their relative differences.
3. ``overhead``: the GID overhead ratio of ``benchmarks.speed`` (GID step / (student step +
   teacher forward)) at 512 and 800 px.
4. ``item5``: issue #12 item 5's three settings of the CPU speed benchmark (batch 8, 64 px, K 10;
   192 px; K 40; its R34 / R18 models), each as ``benchmarks.speed.compare_gid_steps`` measures it
   (``adapter_on`` instances and maps, interleaved, 40 iterations, 90 % bootstrap intervals), and
   whether each target (1.10, 1.03, 1.25) is met: the interval's upper end at or under it.

Everything goes to ``benchmarks/results/gpu.json`` with the card's name. Without CUDA it says so
and exits 0 having run and written nothing. ``--device cpu --tiny`` (hidden; the test suite's)
runs the same code on tiny models and images.
"""

from __future__ import annotations

import argparse
import copy
import platform
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

RESULTS_FILE = Path(__file__).resolve().parent / "results" / "gpu.json"
NUM_CLASSES = 10


@dataclass(frozen=True)
class Plan:
    image_size: int
    overhead_sizes: tuple[int, ...]
    batch_size: int
    iters: int  # distill job steps; images/s counts the steps after the first `warmup`
    warmup: int
    num_images: int
    teacher: dict
    student: dict
    timing_iters: int
    num_workers: int
    parity_rtol: float  # on the total loss; a lower precision gets a looser bound
    item5_batch_size: int
    item5_iters: int


FULL = Plan(512, (512, 800), 8, 60, 10, 64, {"backbone": "resnet50"}, {"backbone": "resnet18"}, 10, 4, 0.05, 8, 40)
TINY = Plan(64, (64, 96), 2, 4, 1, 4, {"backbone": "resnet18", "fpn_channels": 64},
            {"backbone": "resnet18", "fpn_channels": 32}, 1, 0, 0.25, 1, 2)
# issue #12 item 5: the overhead ratio's target at each setting (changes from the base setting)
ITEM5_TARGETS = {"base": ({}, 1.10), "image_size=192": ({"image_size": 192}, 1.03), "top_k=40": ({"top_k": 40}, 1.25)}


def model_config(plan: Plan, which: str, image_size: int):
    from gid_core.config import ModelConfig

    extra = plan.teacher if which == "teacher" else plan.student
    anchors = None if image_size >= 512 else [8, 16, 32, 64, 128]  # torchvision's suit >= 512 px
    return ModelConfig(arch="retinanet", num_classes=NUM_CLASSES, min_size=image_size, max_size=image_size,
                       anchor_sizes=anchors, **extra)


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated since the last reset (CUDA), or this process's peak RSS (CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def synthetic_data(plan: Plan, image_size: int, root: Path) -> dict:
    from gid_core.config import SyntheticDatasetConfig
    from gid_core.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(SyntheticDatasetConfig(
        output_dir=root / f"data_{image_size}", num_train=plan.num_images, num_val=1, image_size=image_size,
        num_classes=NUM_CLASSES, min_objects=1, max_objects=6, seed=0,
    ))


def distill_job(plan: Plan, data: dict, device: torch.device, work: Path) -> dict[str, Any]:
    """A short AMP distillation job through the engine; images/s after ``plan.warmup`` steps."""
    from gid_core.config import DataConfig, Hyperparameters, JobConfig
    from gid_core.engine import run_job
    from gid_core.trainer import HookBase

    class StepClock(HookBase):
        def __init__(self) -> None:
            self.times: list[float] = []

        def after_step(self) -> None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.times.append(time.perf_counter())

    from gid_core.models import build_detector, save_state_dict_file

    # A random teacher, saved like a trained one (a distillation job takes its teacher from a file).
    teacher_cfg = model_config(plan, "teacher", plan.image_size)
    teacher_file = work / "teacher.safetensors"
    save_state_dict_file(build_detector(teacher_cfg, load_weights=False).state_dict(), teacher_file)
    job = JobConfig(
        kind="distill", student=model_config(plan, "student", plan.image_size),
        teacher=teacher_cfg.model_copy(update={"weights": str(teacher_file)}),
        data=DataConfig(train_annotations=data["train_annotations"], train_images=data["train_images"]),
        hyperparameters=Hyperparameters(
            max_iters=plan.iters, batch_size=plan.batch_size, amp=True, num_workers=plan.num_workers, lr=0.002,
            warmup_iters=min(10, plan.iters), checkpoint_period=plan.iters, log_period=max(1, plan.iters // 4),
        ),
    )
    clock = StepClock()
    _reset_peak(device)
    start = time.perf_counter()
    result = run_job(job, output_dir=work / "job", hooks=[clock], resume=False, rank=0, world_size=1)
    timed = clock.times[plan.warmup:]
    steps = len(timed) - 1
    return {
        "status": result["status"],
        "iterations": result["iterations"],
        "batch_size": plan.batch_size,
        "image_size": plan.image_size,
        "amp": True,
        "train_images_per_s": plan.batch_size * steps / (timed[-1] - timed[0]) if steps > 0 else None,
        "peak_memory_mb": peak_memory_mb(device),
        "wall_s": time.perf_counter() - start,
    }


def amp_parity(plan: Plan, data: dict, device: torch.device) -> dict[str, Any]:
    """The distiller's weighted losses on one fixed batch, fp32 against autocast."""
    from gid_core.data import CocoDetectionDataset, collate_detection
    from benchmarks.speed import SpeedSetting, build_models

    ds = CocoDetectionDataset(data["train_annotations"], data["train_images"], train=False)
    images, targets = collate_detection([ds[i] for i in range(plan.batch_size)])
    images = [im.to(device) for im in images]
    targets = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in t.items()} for t in targets]
    setting = SpeedSetting(batch_size=plan.batch_size, image_size=plan.image_size, num_classes=NUM_CLASSES)
    _, distiller = build_models(setting, teacher_cfg=model_config(plan, "teacher", plan.image_size),
                                student_cfg=model_config(plan, "student", plan.image_size), device=device)
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    with torch.no_grad():
        fp32 = {k: float(v) for k, v in copy.deepcopy(distiller)(images, targets).items()}
        with torch.autocast(device.type, dtype=dtype):
            amp = {k: float(v) for k, v in copy.deepcopy(distiller)(images, targets).items()}
    fp32["total"], amp["total"] = sum(fp32.values()), sum(amp.values())
    rel = {k: abs(amp[k] - fp32[k]) / max(abs(fp32[k]), 1e-6) for k in fp32}
    return {"autocast_dtype": str(dtype).removeprefix("torch."), "fp32": fp32, "amp": amp, "rel_diff": rel,
            "rtol": plan.parity_rtol, "ok": rel["total"] <= plan.parity_rtol}


def overhead(plan: Plan, image_size: int, device: torch.device, data_dir: Path) -> dict[str, Any]:
    """``benchmarks.speed.measure`` at ``image_size`` (fp32 steps, batch ``plan.batch_size``)."""
    from benchmarks.speed import SpeedSetting, measure

    _reset_peak(device)
    r = measure(SpeedSetting(batch_size=plan.batch_size, image_size=image_size, num_classes=NUM_CLASSES),
                iters=plan.timing_iters, warmup=1, device=device, teacher_cfg=model_config(plan, "teacher", image_size),
                student_cfg=model_config(plan, "student", image_size), data_dir=data_dir / f"speed_{image_size}",
                teacher_inference=False)
    return {"overhead_ratio": r["overhead_ratio"], "overhead_ratio_interval": r["overhead_ratio_interval"],
            "times_ms": r["times_ms"], "parts_ms": r["parts_ms"], "peak_memory_mb": peak_memory_mb(device)}


def item5(plan: Plan, device: torch.device, data_dir: Path) -> dict[str, Any]:
    """Issue #12 item 5's settings, both adapter modes interleaved (``compare_gid_steps``)."""
    from dataclasses import replace

    from benchmarks.speed import SpeedSetting, compare_gid_steps

    base = SpeedSetting(batch_size=plan.item5_batch_size)
    out = {}
    for name, (change, target) in ITEM5_TARGETS.items():
        r = compare_gid_steps(replace(base, **change), against="maps", iters=plan.item5_iters, warmup=2, device=device,
                              data_dir=data_dir / f"item5_{name}")
        modes = {"instances": ("overhead_ratio", "overhead_ratio_interval"),
                 "maps": ("overhead_ratio_maps", "overhead_ratio_maps_interval")}
        out[name] = {
            "target": target, "setting": r["setting"], "times_ms": r["times_ms"],
            **{mode: {"overhead_ratio": r[ratio], "overhead_ratio_interval": r[interval],
                      "met": r[interval][1] <= target} for mode, (ratio, interval) in modes.items()},
        }
    return out


def describe(device: torch.device) -> dict[str, Any]:
    info = {"device": str(device), "torch": torch.__version__, "python": platform.python_version()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, memory_gb=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    capability=f"{props.major}.{props.minor}")
    else:
        info["name"] = platform.processor() or "cpu"
    return info


def run(plan: Plan, device: torch.device, work: Path) -> dict[str, Any]:
    data = synthetic_data(plan, plan.image_size, work)
    report: dict[str, Any] = {"machine": describe(device), "tiny": plan is TINY}
    report["distill_job"] = distill_job(plan, data, device, work)
    report["amp_parity"] = amp_parity(plan, data, device)
    report["overhead"] = {str(size): overhead(plan, size, device, work) for size in plan.overhead_sizes}
    report["item5"] = item5(plan, device, work)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS_FILE, help="JSON file to write")
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu-check: no CUDA device on this machine; nothing run, nothing written")
        return 0
    device = torch.device(args.device)
    plan = TINY if args.tiny else FULL
    with tempfile.TemporaryDirectory(prefix="gid-gpu-check-") as work:
        report = run(plan, device, Path(work))
    from benchmarks.speed import format_ratio
    from gid_core.fileio import write_json_atomic

    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, report)
    job, parity = report["distill_job"], report["amp_parity"]
    print(f"gpu-check on {report['machine']['name']}: job {job['status']}, {job['train_images_per_s'] or 0:.1f} "
          f"train images/s, peak {job['peak_memory_mb']:.0f} MB; AMP parity rel diff "
          f"{parity['rel_diff']['total']:.2e} ({'ok' if parity['ok'] else 'NOT ok'}); overhead "
          + ", ".join(f"{size} px {format_ratio(r['overhead_ratio'], r['overhead_ratio_interval'])}"
                      for size, r in report["overhead"].items()))
    for name, r in report["item5"].items():
        print(f"issue #12 item 5, {name} (target {r['target']}): " + ", ".join(
            f"{mode} {format_ratio(r[mode]['overhead_ratio'], r[mode]['overhead_ratio_interval'])} "
            f"{'met' if r[mode]['met'] else 'not met'}" for mode in ("instances", "maps")))
    print(f"wrote {args.out}")
    return 0 if job["status"] == "completed" and parity["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
