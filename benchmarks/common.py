"""Shared pieces of the benchmarks: the teacher/student pair, cached synthetic data, result files.

The teacher and student below are the pair every benchmark uses, so the speed numbers describe the
same models the quality benchmark trains. Both are torchvision RetinaNets with GroupNorm (it trains
from scratch at small batch) and anchors sized for small images; the teacher has the deeper
backbone and the wider FPN.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from gid_core.config import ModelConfig, SyntheticDatasetConfig
from gid_core.fileio import atomic_write, write_json_atomic

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
CACHE_DIR = BENCH_DIR / "cache"  # git-ignored: datasets and cached teachers

# Anchor base sizes P3..P7 for 64-160 px images (torchvision's 32..512 suit 800 px COCO images).
SMALL_IMAGE_ANCHORS = [8, 16, 32, 64, 128]


TEACHER = {"backbone": "resnet34", "fpn_channels": 128}  # deeper backbone, wider FPN
STUDENT = {"backbone": "resnet18", "fpn_channels": 32}  # light backbone, narrow FPN


def detector_config(num_classes: int, image_size: int, *, backbone: str, fpn_channels: int, norm: str = "gn",
                    weights: str | None = None, arch: str = "retinanet") -> ModelConfig:
    """A RetinaNet (or ``arch``; GroupNorm in backbone and head by default) with small-image anchors,
    at ``image_size``."""
    return ModelConfig(
        arch=arch, backbone=backbone, num_classes=num_classes, fpn_channels=fpn_channels, norm=norm,
        min_size=image_size, max_size=image_size, anchor_sizes=SMALL_IMAGE_ANCHORS, weights=weights,
    )


def teacher_model_config(num_classes: int, image_size: int, *, weights: str | None = None, **overrides: Any) -> ModelConfig:
    """The big detector (``TEACHER``: ResNet-34, 128-channel FPN unless overridden)."""
    return detector_config(num_classes, image_size, **{**TEACHER, **overrides}, weights=weights)


def student_model_config(num_classes: int, image_size: int, **overrides: Any) -> ModelConfig:
    """The light detector (``STUDENT``: ResNet-18, 32-channel FPN unless overridden)."""
    return detector_config(num_classes, image_size, **{**STUDENT, **overrides})


# ------------------------------------------------------------------------------------ files


def config_hash(obj: Any, length: int = 12) -> str:
    """Stable short hash of a JSON-able value or pydantic model (sorted keys, no whitespace)."""
    if hasattr(obj, "model_dump"):
        obj = obj.model_dump(mode="json")
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:length]


def save_figure_atomic(fig: Any, path: Path) -> None:
    """``fig.savefig`` through a temp file and rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: fig.savefig(f, format=path.suffix.lstrip("."), dpi=110, bbox_inches="tight"))


def synthetic_dataset(cfg: SyntheticDatasetConfig) -> dict:
    """``make_synthetic_dataset`` unless the same config was generated before into the same folder
    (a ``dataset.json`` written after the generator returns marks a complete dataset)."""
    from gid_core.synthetic import make_synthetic_dataset

    marker = Path(cfg.output_dir) / "dataset.json"
    want = cfg.model_dump(mode="json")
    if marker.is_file():
        saved = json.loads(marker.read_text(encoding="utf-8"))
        if saved.get("config") == want:
            return saved["info"]
    info = make_synthetic_dataset(cfg)
    write_json_atomic(marker, {"config": want, "info": info})
    return info


def cached_synthetic_dataset(**kwargs: Any) -> dict:
    """A synthetic dataset under ``benchmarks/cache/data-<hash of its settings>``."""
    probe = SyntheticDatasetConfig(output_dir=Path("."), **kwargs)
    key = config_hash({k: v for k, v in probe.model_dump(mode="json").items() if k != "output_dir"})
    return synthetic_dataset(SyntheticDatasetConfig(output_dir=CACHE_DIR / f"data-{key}", **kwargs))


# ------------------------------------------------------------------------------------ timing


def sync(device: torch.device) -> None:
    """Wait for queued device work, so a wall-clock interval covers it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """(seconds, result) of one call, with the device synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = [float(v) for v in values]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


# ------------------------------------------------------------------------------------ report


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-markdown table (also readable on a terminal)."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e-2 and v != 0 else f"{v:.2f}"
        return str(v)

    body = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "| " + " | ".join("-" * w for w in widths) + " |"
    return "\n".join([line(headers), sep, *(line(r) for r in body)])
