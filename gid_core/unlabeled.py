"""Distillation on unlabeled images (issue #12): GISM needs no ground truth, so neither do the GID losses.

An unlabeled image set is a folder of images, optionally listed by a COCO file whose ``images`` are
read and whose annotations and categories (if any) are ignored. :func:`validate_unlabeled_images`
lists every problem, like ``gid_core.data.validate_coco_dataset``; each image is opened by
``open_image_file`` (no symbolic link below the folder is followed, at validation and in training).

:class:`MixedLoader` interleaves two ``ResumableLoader`` streams: step ``s`` (counted from the start
of training) takes an unlabeled batch when ``floor((s + 1) * r) > floor(s * r)`` for the ratio
``r``, so exactly ``floor(n * r)`` of the first ``n`` steps are unlabeled, evenly spread. The
choice depends on the step alone, so every DDP rank makes the same one, and the loader's state
(both streams' positions and the step) resumes the mix exactly. An unlabeled batch is yielded as
``(images, None)``: ``GIDDistiller`` then computes the GID losses only, no ground-truth loss.
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from .data import (
    IMAGES_LOC,
    DatasetValidationError,
    _check_images,
    _json_problem,
    _read_json,
    _cap,
    open_image_file,
    read_resized_rgb,
)
from .errors import Problem
from .sampler import ResumableLoader

__all__ = ["IMAGE_SUFFIXES", "UnlabeledImageDataset", "MixedLoader", "is_unlabeled_step", "validate_unlabeled_images"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def is_unlabeled_step(step: int, ratio: float) -> bool:
    """Whether training step ``step`` (0-based) takes an unlabeled batch at ``ratio``."""
    return math.floor((step + 1) * ratio) > math.floor(step * ratio)


def _folder_files(images_dir: Path) -> list[str]:
    """Image files below ``images_dir`` (relative POSIX names, sorted); symbolic links are skipped."""
    found = []
    for root, dirs, files in os.walk(images_dir, followlinks=False):
        dirs.sort()
        rel = PurePosixPath(Path(root).relative_to(images_dir).as_posix())
        for name in sorted(files):
            if name.lower().endswith(IMAGE_SUFFIXES) and stat.S_ISREG(os.lstat(Path(root) / name).st_mode):
                found.append(str(rel / name) if str(rel) != "." else name)
    return found


def _folder_records(images_dir: Path, problems: list[Problem]) -> list[tuple[str, int, int]]:
    records = []
    for name in _folder_files(images_dir):
        try:
            with open_image_file(images_dir, name) as f, Image.open(f) as im:
                w, h = im.size
        except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as e:
            problems.append(Problem(IMAGES_LOC, f"cannot read image '{name}': {e}", "invalid_dataset"))
            continue
        records.append((name, h, w))
    return records


def validate_unlabeled_images(
    images: str | Path, annotations: str | Path | None = None
) -> tuple[list[tuple[str, int, int]], list[Problem]]:
    """``([(file_name, height, width), ...], problems)`` of an unlabeled image set: the images a
    COCO file lists (checked as ``validate_coco_dataset`` checks them), or every image file in the
    folder. Problems are located at ``("images",)`` or ``("annotations",)``."""
    images = Path(images)
    problems: list[Problem] = []
    if not images.is_dir():
        return [], [Problem(IMAGES_LOC, f"images folder {images}: not found or not a directory", "invalid_dataset")]
    if annotations is None:
        records = _folder_records(images, problems)
        if not records and not problems:
            problems.append(Problem(IMAGES_LOC, f"images folder {images}: no image files "
                                    f"({', '.join(IMAGE_SUFFIXES)})", "invalid_dataset"))
        return records, _cap(problems)
    data = _read_json(Path(annotations), problems)
    if data is not None and not (isinstance(data, dict) and isinstance(data.get("images"), list)):
        problems.append(_json_problem("top level must be a JSON object with an 'images' list"))
    if problems:
        return [], problems
    if not data["images"]:
        problems.append(_json_problem("images: empty; a dataset needs at least one image"))
    sizes = _check_images(data["images"], images, problems)
    records = [(img["file_name"], img["height"], img["width"]) for img in data["images"]
               if isinstance(img, dict) and img.get("id") in sizes]
    return records, _cap(problems)


class UnlabeledImageDataset(torch.utils.data.Dataset):
    """``ds[i]`` or ``ds[(i, aug_seed)]`` -> ``(image float CHW in [0, 1], {})``: resized like the
    student's input (``min_size``/``max_size``), flipped (``train``) as ``CocoDetectionDataset``."""

    def __init__(self, images: str | Path, annotations: str | Path | None = None, *, train: bool = True,
                 flip_prob: float = 0.5, min_size: int | None = None, max_size: int | None = None) -> None:
        self.images_dir = Path(images)
        records, problems = validate_unlabeled_images(images, annotations)
        if problems:
            raise DatasetValidationError(problems, annotations or images)
        self.file_names = [name for name, _, _ in records]
        self.hw = [(h, w) for _, h, w in records]
        self.train, self.flip_prob = train, float(flip_prob)
        self.min_size, self.max_size = min_size, max_size

    def __len__(self) -> int:
        return len(self.file_names)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, dict]:
        import random

        index, aug_seed = (key[0], key[1]) if isinstance(key, tuple) else (key, None)
        name = self.file_names[int(index)]
        try:
            pixels = read_resized_rgb(self.images_dir, name, self.hw[int(index)], self.min_size, self.max_size)
        except OSError as e:
            raise OSError(f"cannot decode unlabeled image {name}: {e}") from e
        if self.train and self.flip_prob > 0.0:
            draw = random.random() if aug_seed is None else random.Random(aug_seed).random()
            if draw < self.flip_prob:
                pixels = pixels[:, ::-1]
        image = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div_(255.0)
        return image, {}


class MixedLoader:
    """Labeled and unlabeled batches interleaved at ``ratio`` (see the module docstring); an
    endless, resumable stream like ``ResumableLoader``."""

    def __init__(self, labeled: ResumableLoader, unlabeled: ResumableLoader, ratio: float) -> None:
        self.labeled, self.unlabeled, self.ratio = labeled, unlabeled, float(ratio)
        self.step = 0  # batches consumed since the start of training

    @property
    def epoch(self) -> int:  # the trainer's epoch: passes over the labeled set
        return self.labeled.epoch

    @property
    def batch_size(self) -> int:
        return self.labeled.batch_size

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        unlabeled = is_unlabeled_step(self.step, self.ratio)
        if unlabeled:
            images, _ = next(self.unlabeled)
            batch = (images, None)
        else:
            batch = next(self.labeled)
        self.step += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"labeled": self.labeled.state_dict(), "unlabeled": self.unlabeled.state_dict(), "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "labeled" not in state:
            raise ValueError("the checkpoint was written without unlabeled images: resume it without them")
        self.labeled.load_state_dict(state["labeled"])
        self.unlabeled.load_state_dict(state["unlabeled"])
        self.step = int(state["step"])

    def close(self) -> None:
        self.labeled.close()
        self.unlabeled.close()
