"""What does a GID training step cost? (``make bench-speed``)

In one process, on the same batch, the median wall time of

  (a) ``student_step``     a plain student training step (forward, GT losses, backward, SGD step),
  (b) ``teacher_forward``  the teacher's dense forward under ``no_grad`` (backbone + head, what GID
                           reads; ``teacher_inference`` = full torchvision inference with NMS, shown
                           for reference only),
  (c) ``gid_step``         a full ``GIDDistiller`` step (forward, all losses, backward, SGD step),

and the GID-only parts of (c), each timed by calling the functions the distiller calls on the
tensors it calls them on (student outputs detached into leaves, so a part's time is its own
forward + backward down to the student's dense outputs, without the backbone's backward):

  ``gism``         ``select_general_instances_batched``
  ``roi_feature``  ``GIDDistiller._instance_features`` (ROIAlign of teacher and student FPNs)
                   + adapter + ``feature_loss`` (``--adapter-on maps``: ``_adapted_maps_loss``)
  ``relation``     ``relation_loss_batched`` on the pooled features
  ``response``     GI padding + ``view.positive_mask`` + ``response_loss``

The headline is ``overhead_ratio = t(c) / (t(a) + t(b))``: 1.0 means distillation costs nothing
beyond running the student step and the teacher forward it needs. The three kinds of timing are
interleaved iteration by iteration so that load from other processes hits them alike, and every
ratio comes with a 90 % bootstrap interval over those iterations (``ratio_interval``): on a shared
CPU one step's wall time varies by a few percent, so a ratio meets a target only when its interval
does.

``--compare-previous`` times only the GID step now against the implementations it replaced
(swapped back in from ``tests/gid_core/test_gid_speed_exactness.py``), interleaved.

``--profile`` adds a ``torch.profiler`` table of a few GID steps (top operators by self time, and
the count of ops that synchronise host and device on a GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import random
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gid_core.config import DistillConfig, ModelConfig
from gid_core.data import CocoDetectionDataset, collate_detection
from gid_core.dense import DenseOutputs
from gid_core.distill import GeneralInstances, GIDDistiller, _rows  # _rows: the embeddings the relation loss reads
from gid_core.fileio import write_json_atomic
from gid_core.gism import select_general_instances_batched
from gid_core.hostmem import retain_freed_memory
from gid_core.losses import feature_loss, relation_loss_batched, response_loss
from gid_core.models import build_detector

from .common import (
    RESULTS_DIR,
    cached_synthetic_dataset,
    format_table,
    machine_info,
    median,
    save_figure_atomic,
    student_model_config,
    teacher_model_config,
    timed,
)

PARTS = ("gism", "roi_feature", "relation", "response")
# Ops that force a host-device synchronisation when tensors live on a GPU.
SYNC_OPS = ("aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::is_nonzero")


@dataclass(frozen=True)
class SpeedSetting:
    """Defaults: what the quality benchmark trains (64 px images, 3 classes, batch 8, K = 10)."""

    batch_size: int = 8
    image_size: int = 64
    top_k: int = 10
    num_classes: int = 3
    adapter_on: str = "instances"  # DistillConfig.adapter_on

    def distill_config(self) -> DistillConfig:
        # The quality benchmark's ROI level rule: the paper's 224 px on ~800 px images, scaled.
        return DistillConfig(top_k=self.top_k, roi_canonical_scale=224.0 * self.image_size / 800.0,
                             adapter_on=self.adapter_on)


# ------------------------------------------------------------------------------------ set-up


def load_batch(setting: SpeedSetting, data_dir: Path | None = None) -> tuple[list[Tensor], list[dict]]:
    """``batch_size`` images of the synthetic set at ``image_size`` (generated once, then cached)."""
    kwargs = dict(num_train=setting.batch_size, num_val=1, image_size=setting.image_size,
                  num_classes=setting.num_classes, min_objects=1, max_objects=6, seed=0)
    if data_dir is None:
        info = cached_synthetic_dataset(**kwargs)
    else:
        from gid_core.config import SyntheticDatasetConfig

        from .common import synthetic_dataset

        info = synthetic_dataset(SyntheticDatasetConfig(output_dir=data_dir, **kwargs))
    ds = CocoDetectionDataset(info["train_annotations"], info["train_images"], train=False, validate=False)
    return collate_detection([ds[i] for i in range(setting.batch_size)])


def build_models(
    setting: SpeedSetting,
    *,
    teacher_cfg: ModelConfig | None = None,
    student_cfg: ModelConfig | None = None,
    distill_cfg: DistillConfig | None = None,
    device: torch.device,
    seed: int = 0,
) -> tuple[nn.Module, GIDDistiller]:
    """(teacher for timing (b), distiller holding a copy of it) on ``device``, random weights."""
    teacher_cfg = teacher_cfg or teacher_model_config(setting.num_classes, setting.image_size)
    student_cfg = student_cfg or student_model_config(setting.num_classes, setting.image_size)
    distill_cfg = (distill_cfg or setting.distill_config()).model_copy(update={"top_k": setting.top_k})
    torch.manual_seed(seed)
    teacher = build_detector(teacher_cfg, load_weights=False).to(device).eval()
    student = build_detector(student_cfg).to(device)
    distiller = GIDDistiller(copy.deepcopy(teacher), student, distill_cfg).to(device).train()
    return teacher, distiller


def _sgd(params) -> torch.optim.SGD:
    # A small learning rate: the weights must move (the step is real) but not diverge.
    return torch.optim.SGD([p for p in params if p.requires_grad], lr=1e-4, momentum=0.9, weight_decay=1e-4)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, images, targets) -> None:
    """What ``Trainer.run_step`` does, minus logging: forward, sum, finite check, backward, step."""
    losses = model(images, targets)
    total = sum(losses.values())
    if not torch.isfinite(total):
        raise FloatingPointError(f"non-finite loss in the benchmark step: {float(total)}")
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()


# ------------------------------------------------------------------------------------ parts


def _count(count: Tensor) -> Tensor:
    """The distiller's loss normaliser in one process (no DDP all_reduce to time here)."""
    return count.detach().to(torch.float32)


INTERVAL_LEVEL = 0.9  # of the overhead ratio's bootstrap interval


def ratio_interval(samples: dict[str, list[float]], gid_key: str = "gid_step", *, level: float = INTERVAL_LEVEL,
                   resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval of the overhead ratio median(gid) / (median(student_step) + median(teacher_forward)).

    The timings of one iteration were measured back to back, under the same load from other
    processes, so a resample draws whole iterations (with replacement), never single timings. On a
    shared machine a step's wall time varies by a few percent from one iteration to the next; the
    interval says which ratios that spread leaves possible, so a target is met only when the
    interval's upper end is below it. Deterministic for a given ``seed``."""
    keys = ("student_step", "teacher_forward", gid_key)
    n = len(samples[gid_key])
    if n == 0 or any(len(samples[k]) != n for k in keys):
        raise ValueError(f"ratio_interval: {keys} need the same number (>= 1) of samples")
    rng = random.Random(seed)
    ratios = []
    for _ in range(resamples):
        picks = [rng.randrange(n) for _ in range(n)]
        a, b, c = ([samples[k][i] for i in picks] for k in keys)
        ratios.append(median(c) / (median(a) + median(b)))
    ratios.sort()
    tail = (1.0 - level) / 2
    return ratios[int(tail * (resamples - 1))], ratios[int(round((1.0 - tail) * (resamples - 1)))]


def format_ratio(ratio: float, interval: tuple[float, float]) -> str:
    return f"{ratio:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"


def _leaf_outputs(out: DenseOutputs) -> DenseOutputs:
    """Student outputs cut from the backbone graph: a part's backward stops at them."""
    leaf = lambda t: t.detach().requires_grad_(True)  # noqa: E731
    return DenseOutputs(
        features=[leaf(f) for f in out.features],
        probs=out.probs.detach(),
        boxes=out.boxes.detach(),
        logits=leaf(out.logits),
        reg=leaf(out.reg),
    )


def time_parts(distiller: GIDDistiller, images: list[Tensor], targets: list[dict], device: torch.device) -> dict[str, float]:
    """Seconds of each GID part on this batch, calling what ``GIDDistiller._distill_losses`` calls."""
    cfg = distiller.config
    with torch.no_grad():
        image_list, _ = distiller.student.transform(images, targets)
        t_out = distiller.view(distiller.teacher, image_list, distiller._anchors)
        s_out = _leaf_outputs(distiller.view(distiller.student, image_list, distiller._anchors))
    times: dict[str, float] = {}

    def gism():
        return select_general_instances_batched(
            t_out.probs, t_out.boxes, s_out.probs, s_out.boxes, top_k=cfg.top_k, nms_iou=cfg.nms_iou,
            pre_nms_top_n=cfg.pre_nms_top_n, min_size=distiller.gi_min_box_size,
        )

    times["gism"], gis = timed(gism, device)
    n = len(gis)
    boxes = torch.cat([b for b, _ in gis])  # (K, 4)
    counts = torch.tensor([b.shape[0] for b, _ in gis], device=boxes.device)  # (N,)
    image_index = torch.repeat_interleave(torch.arange(n, device=boxes.device), counts)  # (K,)

    def roi_feature():
        levels = distiller._instance_levels(t_out, boxes, image_list)
        t_inst, s_inst = distiller._instance_features(t_out, s_out, boxes, image_index, *levels)
        if cfg.adapter_on == "maps":
            gi = GeneralInstances(boxes, boxes.new_zeros(boxes.shape[0]), counts, image_index)
            loss = distiller._adapted_maps_loss(t_out, s_out, gi, levels, _count(counts.sum()), None)
        else:
            loss = feature_loss(t_inst, distiller.adapter(s_inst), normalizer=_count(counts.sum()))
        (cfg.weight_feature * loss).backward()
        return t_inst, s_inst

    times["roi_feature"], (t_inst, s_inst) = timed(roi_feature, device)
    s_inst = s_inst.detach().requires_grad_(True)

    def relation():
        loss = cfg.weight_relation * relation_loss_batched(
            _rows(t_inst), _rows(s_inst), image_index, n, normalizer=_count((counts >= 2).sum())
        )
        loss.backward()

    times["relation"], _ = timed(relation, device)

    def response():
        # The distiller's response block, line for line.
        kmax = max(cfg.top_k, 1)
        padded = boxes.new_zeros((n, kmax, 4))
        valid = torch.zeros((n, kmax), dtype=torch.bool, device=boxes.device)
        slot = torch.arange(boxes.shape[0], device=boxes.device) - torch.repeat_interleave(
            torch.cumsum(counts, 0) - counts, counts
        )
        padded[image_index, slot] = boxes
        valid[image_index, slot] = True
        num_per_level = [f.shape[-2] * f.shape[-1] for f in s_out.features]
        num_per_level = [c * (s_out.reg.shape[1] // sum(num_per_level)) for c in num_per_level]
        anchors = torch.stack(distiller._anchors(image_list, s_out.features))
        mask = distiller.view.positive_mask(distiller.student, padded, valid, anchors, num_per_level)
        cls, reg = response_loss(
            t_out.logits, s_out.logits, t_out.reg, s_out.reg, mask, normalizer=_count(mask.sum())
        )
        (cfg.weight_response_cls * cls + cfg.weight_response_reg * reg).backward()

    times["response"], _ = timed(response, device)
    distiller.zero_grad(set_to_none=True)
    return times


# ------------------------------------------------------------------------------------ measure


def measure(
    setting: SpeedSetting,
    *,
    iters: int = 10,
    warmup: int = 2,
    device: torch.device | str = "cpu",
    teacher_cfg: ModelConfig | None = None,
    student_cfg: ModelConfig | None = None,
    distill_cfg: DistillConfig | None = None,
    data_dir: Path | None = None,
    teacher_inference: bool = True,
) -> dict[str, Any]:
    """Median seconds of (a), (b), (c) and the GID parts on one batch; ``overhead_ratio``."""
    device = torch.device(device)
    images, targets = load_batch(setting, data_dir)
    images = [im.to(device) for im in images]
    targets = [{k: v.to(device) if isinstance(v, Tensor) else v for k, v in t.items()} for t in targets]
    teacher, distiller = build_models(
        setting, teacher_cfg=teacher_cfg, student_cfg=student_cfg, distill_cfg=distill_cfg, device=device
    )
    # (a) and (c) train separate copies of the same initial student, so neither sees weights the
    # other has moved, and each keeps its own optimizer state.
    student = copy.deepcopy(distiller.student).train()
    opt_student, opt_gid = _sgd(student.parameters()), _sgd(distiller.parameters())

    def teacher_forward():
        with torch.no_grad():
            image_list, _ = distiller.student.transform(images)
            distiller.view(teacher, image_list, distiller._anchors)

    def teacher_full():
        with torch.no_grad():
            teacher(images)

    samples: dict[str, list[float]] = {k: [] for k in ("student_step", "teacher_forward", "gid_step", *PARTS)}
    if teacher_inference:
        samples["teacher_inference"] = []
    for i in range(warmup + iters):
        t_a, _ = timed(lambda: train_step(student, opt_student, images, targets), device)
        t_b, _ = timed(teacher_forward, device)
        t_c, _ = timed(lambda: train_step(distiller, opt_gid, images, targets), device)
        parts = time_parts(distiller, images, targets, device)
        t_full = timed(teacher_full, device)[0] if teacher_inference else None
        if i < warmup:
            continue
        samples["student_step"].append(t_a)
        samples["teacher_forward"].append(t_b)
        samples["gid_step"].append(t_c)
        for k in PARTS:
            samples[k].append(parts[k])
        if t_full is not None:
            samples["teacher_inference"].append(t_full)

    times = {k: median(v) for k, v in samples.items()}
    floor = times["student_step"] + times["teacher_forward"]
    parts = {k: times[k] for k in PARTS}
    result = {
        "setting": asdict(setting),
        "iters": iters,
        "warmup": warmup,
        "device": str(device),
        "times_ms": {k: 1e3 * v for k, v in times.items() if k not in PARTS},
        "parts_ms": {k: 1e3 * v for k, v in parts.items()},
        "overhead_ms": 1e3 * (times["gid_step"] - floor),
        "parts_sum_ms": 1e3 * sum(parts.values()),
        "overhead_ratio": times["gid_step"] / floor,
        "overhead_ratio_interval": ratio_interval(samples),
        "interval_level": INTERVAL_LEVEL,
        "samples_ms": {k: [round(1e3 * x, 3) for x in v] for k, v in samples.items()},
        "gi_per_image": float(distiller.last_stats.get("gi_per_image", torch.tensor(float("nan")))),
    }
    if teacher_inference:
        result["overhead_ratio_vs_full_inference"] = times["gid_step"] / (
            times["student_step"] + times["teacher_inference"]
        )
    return result


def compare_gid_steps(setting: SpeedSetting, *, against: str = "previous", iters: int = 6, warmup: int = 1,
                      device: torch.device | str = "cpu", data_dir: Path | None = None) -> dict[str, Any]:
    """The GID step of ``setting`` ("now") against another GID step on the same models and batch,
    interleaved step by step with the student step and the teacher forward, so that load from other
    processes hits them alike; which GID variant runs first alternates. ``against``: "previous", the
    implementations the current code replaced swapped back in (kept, with their exactness checks, in
    ``tests/gid_core/test_gid_speed_exactness.py``), or "maps", the same step with
    ``adapter_on="maps"``. Medians and the load average around the run."""
    import os

    if against not in ("previous", "maps"):
        raise ValueError(f"against must be 'previous' or 'maps', not {against!r}")
    if against == "previous":  # test code (and pytest): not on a GPU machine's minimal install
        from tests.gid_core.test_gid_speed_exactness import previous_implementations

    device = torch.device(device)
    images, targets = load_batch(setting, data_dir)
    images = [im.to(device) for im in images]
    targets = [{k: v.to(device) if isinstance(v, Tensor) else v for k, v in t.items()} for t in targets]
    teacher, distiller = build_models(setting, device=device)
    other, student = copy.deepcopy(distiller), copy.deepcopy(distiller.student).train()
    if against == "maps":
        other.config = other.config.model_copy(update={"adapter_on": "maps"})
    opts = {"now": _sgd(distiller.parameters()), against: _sgd(other.parameters())}
    opt_student = _sgd(student.parameters())

    def teacher_forward():
        with torch.no_grad():
            image_list, _ = distiller.student.transform(images)
            distiller.view(teacher, image_list, distiller._anchors)

    def gid(name: str) -> float:
        model = distiller if name == "now" else other
        with previous_implementations() if name == "previous" else contextlib.nullcontext():
            return timed(lambda: train_step(model, opts[name], images, targets), device)[0]

    keys = ("student_step", "teacher_forward", "gid_step", f"gid_step_{against}")
    samples: dict[str, list[float]] = {k: [] for k in keys}
    load_before = os.getloadavg()[0]
    for i in range(warmup + iters):
        t_a, _ = timed(lambda: train_step(student, opt_student, images, targets), device)
        t_b, _ = timed(teacher_forward, device)
        order = ("now", against) if i % 2 == 0 else (against, "now")
        t_gid = {name: gid(name) for name in order}
        if i >= warmup:
            for key, value in (("student_step", t_a), ("teacher_forward", t_b), ("gid_step", t_gid["now"]),
                               (f"gid_step_{against}", t_gid[against])):
                samples[key].append(value)
    times = {k: median(v) for k, v in samples.items()}
    floor = times["student_step"] + times["teacher_forward"]
    return {
        "setting": asdict(setting), "against": against, "iters": iters,
        "adapter_on": {"now": distiller.config.adapter_on, against: other.config.adapter_on}, "warmup": warmup, "device": str(device),
        "load_average_1min": [load_before, os.getloadavg()[0]],
        "times_ms": {k: 1e3 * v for k, v in times.items()},
        "overhead_ratio": times["gid_step"] / floor,
        f"overhead_ratio_{against}": times[f"gid_step_{against}"] / floor,
        "overhead_ratio_interval": ratio_interval(samples),
        f"overhead_ratio_{against}_interval": ratio_interval(samples, f"gid_step_{against}"),
        "interval_level": INTERVAL_LEVEL,
        "samples_ms": {k: [round(1e3 * x, 3) for x in v] for k, v in samples.items()},
    }


def _sync_counts(averages, steps: int) -> dict[str, float]:
    return {e.key: e.count / steps for e in averages if e.key in SYNC_OPS}


def profile_gid_step(setting: SpeedSetting, *, steps: int = 3, device: torch.device | str = "cpu", top: int = 20,
                     data_dir: Path | None = None) -> dict[str, Any]:
    """torch.profiler over ``steps`` GID steps (top ops by self time) and the ops that would
    synchronise host and device on a GPU, per step, for the GID step and the plain student step."""
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(device)
    images, targets = load_batch(setting, data_dir)
    images = [im.to(device) for im in images]
    targets = [{k: v.to(device) if isinstance(v, Tensor) else v for k, v in t.items()} for t in targets]
    _, distiller = build_models(setting, device=device)
    student = copy.deepcopy(distiller.student)
    opt, opt_student = _sgd(distiller.parameters()), _sgd(student.parameters())
    train_step(distiller, opt, images, targets)  # warm-up outside the traces
    train_step(student, opt_student, images, targets)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof_student:
        for _ in range(steps):
            train_step(student, opt_student, images, targets)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            train_step(distiller, opt, images, targets)
    averages = prof.key_averages()
    total_self = sum(e.self_cpu_time_total for e in averages) or 1.0
    rows = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {
        "steps": steps,
        "top_ops": [
            {
                "op": e.key,
                "calls_per_step": e.count / steps,
                "self_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
                "self_percent": 100.0 * e.self_cpu_time_total / total_self,
            }
            for e in rows
        ],
        "sync_ops_per_step": {"gid_step": _sync_counts(averages, steps),
                              "student_step": _sync_counts(prof_student.key_averages(), steps)},
        "table": averages.table(sort_by="self_cpu_time_total", row_limit=top),
    }


# ------------------------------------------------------------------------------------ report


def scaling_settings(base: SpeedSetting, batches: Sequence[int], sizes: Sequence[int], ks: Sequence[int]) -> list[tuple[str, int, SpeedSetting]]:
    out = [("batch_size", b, replace(base, batch_size=b)) for b in batches]
    out += [("image_size", s, replace(base, image_size=s)) for s in sizes]
    out += [("top_k", k, replace(base, top_k=k)) for k in ks]
    return out


def summary_table(rows: Sequence[tuple[str, dict[str, Any]]]) -> str:
    headers = ["setting", "student step", "teacher fwd", "GID step", *PARTS, "parts sum", "overhead",
               f"ratio [{INTERVAL_LEVEL:.0%} interval]"]
    body = []
    for label, r in rows:
        t, p = r["times_ms"], r["parts_ms"]
        body.append([label, t["student_step"], t["teacher_forward"], t["gid_step"], *(p[k] for k in PARTS),
                     r["parts_sum_ms"], r["overhead_ms"], format_ratio(r["overhead_ratio"], r["overhead_ratio_interval"])])
    return format_table(headers, body)


def plot_scaling(scaling: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_names = ["batch_size", "image_size", "top_k"]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), sharex="col")
    for col, name in enumerate(axes_names):
        rows = sorted((r for r in scaling if r["axis"] == name), key=lambda r: r["value"])
        if not rows:
            continue
        xs = [r["value"] for r in rows]
        ax = axes[0, col]
        for part in PARTS:
            ax.plot(xs, [r["parts_ms"][part] for r in rows], marker="o", label=part)
        ax.plot(xs, [r["overhead_ms"] for r in rows], marker="s", color="k", ls="--", label="c - (a + b)")
        ax.set_ylabel("ms per step")
        ax.set_title(f"GID parts vs {name}")
        ax.grid(alpha=0.3)
        ax = axes[1, col]
        ax.plot(xs, [r["overhead_ratio"] for r in rows], marker="o", color="C3")
        ax.axhline(1.05, color="grey", ls=":", label="target 1.05")
        ax.axhline(1.0, color="k", lw=0.5)
        ax.set_xlabel(name)
        ax.set_ylabel("t(c) / (t(a) + t(b))")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    axes[1, 0].legend(fontsize=8)
    fig.suptitle("GID step overhead (median wall time)")
    save_figure_atomic(fig, path)
    plt.close(fig)


def add_setting_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``SpeedSetting`` fields as options."""
    defaults = SpeedSetting()
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--image-size", type=int, default=defaults.image_size)
    parser.add_argument("--top-k", type=int, default=defaults.top_k)
    parser.add_argument("--num-classes", type=int, default=defaults.num_classes)
    parser.add_argument("--adapter-on", choices=["instances", "maps"], default=defaults.adapter_on,
                        help="DistillConfig.adapter_on: the feature loss's adapter on pooled patches or on the maps")


def setting_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> SpeedSetting:
    for name in ("batch_size", "image_size", "top_k", "num_classes"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return SpeedSetting(args.batch_size, args.image_size, args.top_k, args.num_classes, args.adapter_on)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__.split("\n")[0])
    add_setting_arguments(parser)
    parser.add_argument("--iters", type=int, default=15, help="timed iterations of the base setting")
    parser.add_argument("--sweep-iters", type=int, default=6, help="timed iterations per scaling point")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="*", default=[2, 4, 8, 16])
    parser.add_argument("--sizes", type=int, nargs="*", default=[64, 96, 128, 192])  # base is 64
    parser.add_argument("--ks", type=int, nargs="*", default=[5, 10, 20, 40])
    parser.add_argument("--no-sweep", action="store_true", help="only the base setting")
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--compare-previous", action="store_true", help="only: the GID step now vs with the "
                        "implementations it replaced (tests/gid_core/test_gid_speed_exactness.py), interleaved, "
                        "on the base setting; --iters timed steps")
    parser.add_argument("--compare-adapter", action="store_true", help="only: the GID step with the feature loss's "
                        "adapter on pooled patches vs on the maps (DistillConfig.adapter_on), interleaved, on the "
                        "base setting; --iters timed steps")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--host-memory", choices=["retain", "system"], default="retain", help="on the CPU: "
                        "'retain' keeps freed memory for reuse as the engine's training processes do "
                        "(gid_core.hostmem); 'system': glibc's default, which hands large freed blocks back")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--data-dir", type=Path, default=None, help="where to generate the input images "
                        "(default: benchmarks/cache, reused between runs)")
    args = parser.parse_args(argv)
    for name in ("iters", "sweep_iters"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    base = setting_from_args(parser, args)
    if args.compare_previous and args.compare_adapter:
        parser.error("--compare-previous and --compare-adapter are separate runs: give one")
    if args.compare_adapter and base.adapter_on != "instances":
        parser.error("--compare-adapter compares adapter_on=instances (the setting) with maps: drop --adapter-on")
    host_memory = "system"
    if torch.device(args.device).type == "cpu" and args.host_memory == "retain" and retain_freed_memory():
        host_memory = "retain"
    print(f"machine: {machine_info()}, host memory: {host_memory}", flush=True)
    if args.compare_previous or args.compare_adapter:
        against = "previous" if args.compare_previous else "maps"
        r = compare_gid_steps(base, against=against, iters=args.iters, warmup=args.warmup, device=args.device,
                              data_dir=args.data_dir)
        t, now = r["times_ms"], "now" if against == "previous" else base.adapter_on
        print(format_table(
            ["setting", "student step", "teacher fwd", f"GID step {against}", f"GID step {now}",
             f"ratio {against}", f"ratio {now}", "load avg"],
            [[f"batch {base.batch_size}, {base.image_size} px, K {base.top_k}", t["student_step"],
              t["teacher_forward"], t[f"gid_step_{against}"], t["gid_step"],
              format_ratio(r[f"overhead_ratio_{against}"], r[f"overhead_ratio_{against}_interval"]),
              format_ratio(r["overhead_ratio"], r["overhead_ratio_interval"]), "%.1f-%.1f" % tuple(r["load_average_1min"])]],
        ), flush=True)
        print(f"ratio [bootstrap {INTERVAL_LEVEL:.0%} interval over the {args.iters} interleaved iterations]", flush=True)
        kind = "" if against == "previous" else "_adapter"
        name = f"speed_compare{kind}_b{base.batch_size}_s{base.image_size}_k{base.top_k}.json"
        args.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.out / name, {"machine": machine_info(), "host_memory": host_memory, **r})
        print(f"wrote {args.out / name}")
        return 0
    print(f"base setting: {base}  ({args.iters} timed iterations)", flush=True)
    result = measure(base, iters=args.iters, warmup=args.warmup, device=args.device, data_dir=args.data_dir)
    rows = [("base", result)]
    print(summary_table(rows), flush=True)

    scaling = []
    if not args.no_sweep:
        for axis, value, setting in scaling_settings(base, args.batches, args.sizes, args.ks):
            r = measure(setting, iters=args.sweep_iters, warmup=1, device=args.device, teacher_inference=False,
                        data_dir=args.data_dir and args.data_dir / f"{axis}-{value}")
            scaling.append({"axis": axis, "value": value, **r})
            rows.append((f"{axis}={value}", r))
            print(f"  {axis}={value}: ratio {r['overhead_ratio']:.3f}", flush=True)
    report: dict[str, Any] = {
        "machine": machine_info(),
        "host_memory": host_memory,
        "command": "python -m benchmarks.speed " + " ".join(sys.argv[1:] if argv is None else argv),
        "models": {
            "teacher": teacher_model_config(base.num_classes, base.image_size).model_dump(mode="json"),
            "student": student_model_config(base.num_classes, base.image_size).model_dump(mode="json"),
            "distill": base.distill_config().model_dump(mode="json"),
        },
        **result,
        "scaling": scaling,
    }
    if args.profile:
        prof = profile_gid_step(base, device=args.device, data_dir=args.data_dir)
        report["profile"] = {k: v for k, v in prof.items() if k != "table"}
        print("\ntorch.profiler, GID step (self time per op):\n" + prof["table"], flush=True)
        print(f"host-device sync ops per step: {prof['sync_ops_per_step']}", flush=True)
    print("\n" + summary_table(rows), flush=True)
    print(f"\noverhead_ratio t(c) / (t(a) + t(b)) = {format_ratio(result['overhead_ratio'], result['overhead_ratio_interval'])}"
          f"  ({INTERVAL_LEVEL:.0%} bootstrap interval; issue #12 targets: <= 1.10 here, <= 1.03 at 192 px, <= 1.25 at K 40)")
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "speed.json", report)
    if scaling:
        plot_scaling(scaling, args.out / "speed_scaling.png")
    print(f"wrote {args.out / 'speed.json'}" + (f" and {args.out / 'speed_scaling.png'}" if scaling else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
