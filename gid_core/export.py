"""Exporting a trained student: ``model.safetensors`` + ``metadata.json``, written atomically.

``model.safetensors`` is the student's torchvision ``state_dict`` and nothing else (no teacher, no
distillation adapter), so it loads into the constructor ``build_detector`` calls — a stock
torchvision class — with ``strict=True``. ``metadata.json`` records how to rebuild it::

    {"format": "gid-export/1", "model": <ModelConfig, weights=None>,
     "torchvision_class": "torchvision.models.detection.RetinaNet", "num_classes_torchvision": C + 1,
     "categories": [{"id", "name"}, ...], "training_config": {...}, "metrics": {...},
     "sha256": <of model.safetensors>}

Both files are written into a temporary folder beside ``out_dir`` (each fsynced), which is then
renamed to ``out_dir``: readers see the old export or the new one, never a mix.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import ModelConfig
from .fileio import current_umask, fsync_path, sha256_file
from .jobdir import EXPORT_METADATA, EXPORT_WEIGHTS

FORMAT = "gid-export/1"


def _torchvision_class(model: nn.Module) -> str:
    import torchvision.models.detection as tv_detection

    name = type(model).__name__
    if getattr(tv_detection, name, None) is type(model):
        return f"torchvision.models.detection.{name}"
    return f"{type(model).__module__}.{type(model).__qualname__}"


def export_student(
    student: nn.Module,
    model_cfg: ModelConfig,
    out_dir: str | os.PathLike[str],
    *,
    categories: Sequence[Mapping[str, Any]],
    training_config: Mapping[str, Any],
    metrics: Mapping[str, Any],
) -> Path:
    """Writes the export folder ``out_dir`` (replacing an existing one) and returns it."""
    from safetensors.torch import save_file

    if len(categories) != model_cfg.num_classes:
        raise ValueError(
            f"{len(categories)} categories for a model with num_classes={model_cfg.num_classes}"
        )
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Own contiguous CPU copies: safetensors refuses tensors that share storage.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in student.state_dict().items()}
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        tmp.chmod(0o777 & ~current_umask())  # mkdtemp's 0700 would hide the export from readers
        weights = tmp / EXPORT_WEIGHTS
        save_file(tensors, str(weights), metadata={"format": FORMAT})
        weights.chmod(0o666 & ~current_umask())
        fsync_path(weights)
        metadata = {
            "format": FORMAT,
            "model": model_cfg.model_copy(update={"weights": None}).model_dump(mode="json"),
            "torchvision_class": _torchvision_class(student),
            "num_classes_torchvision": model_cfg.num_classes + 1,
            "categories": [{"id": int(c["id"]), "name": str(c["name"])} for c in categories],
            "training_config": dict(training_config),
            "metrics": dict(metrics),
            "sha256": sha256_file(weights),
        }
        with open(tmp / EXPORT_METADATA, "w", encoding="utf-8") as f:
            json.dump(metadata, f, indent=2, sort_keys=True, default=str)
            f.flush()
            os.fsync(f.fileno())
        fsync_path(tmp)
        _swap_in(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _swap_in(new: Path, target: Path) -> None:
    """Renames ``new`` to ``target``; an existing ``target`` is moved aside first, then removed."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
        os.replace(target, old / target.name)
    os.replace(new, target)
    fsync_path(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_metadata(out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(out_dir) / EXPORT_METADATA
    if not path.is_file():
        raise FileNotFoundError(f"not an export folder (no {EXPORT_METADATA}): {out_dir}")
    metadata = json.loads(path.read_text(encoding="utf-8"))
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path}: unsupported export format {metadata.get('format')!r}")
    return metadata


def load_export(
    out_dir: str | os.PathLike[str], *, device: torch.device | str = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """The exported detector (eval mode, on ``device``) and its metadata; the weights' sha256 is
    checked and the state_dict loaded strictly."""
    from safetensors.torch import load_file

    from .models import build_detector

    out_dir = Path(out_dir)
    metadata = read_metadata(out_dir)
    weights = out_dir / EXPORT_WEIGHTS
    digest = sha256_file(weights)
    if digest != metadata["sha256"]:
        raise ValueError(f"{weights}: sha256 {digest} does not match metadata {metadata['sha256']}")
    cfg = ModelConfig(**metadata["model"])
    model = build_detector(cfg, load_weights=False)
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model.to(device).eval(), metadata
