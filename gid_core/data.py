"""COCO-format detection datasets: validation, loading and batching.

A dataset is an annotation JSON (``images``, ``annotations``, ``categories``) plus the folder its
``file_name``s are relative to. :func:`validate_coco_dataset` reads the whole thing once and lists
*every* problem it finds, so a bad upload fails before training starts. Each problem is a
:class:`gid_core.errors.Problem` located in the annotation JSON or the images folder, with a message
such as::

    annotations[12] (id 57): bbox [10, 5, 0, 3] has non-positive width

:class:`CocoDetectionDataset` serves ``(image, target)`` pairs for torchvision detectors:

* Categories, sorted by COCO id, map to contiguous labels ``1..C`` (``categories[L - 1]`` is label
  ``L``); :meth:`CocoDetectionDataset.label_to_category_id` maps back.
* Crowd annotations (``iscrowd=1``) are valid and stay in :attr:`CocoDetectionDataset.coco`, where
  COCOeval treats them as ignore regions, but they are left out of training targets (torchvision's
  detectors have no notion of crowd boxes). Images without annotations are kept as negatives.
* Optional resize: with ``min_size``/``max_size`` the image is resized exactly the way
  torchvision's ``GeneralizedRCNNTransform`` would (``scale = min(min_size / short,
  max_size / long)``), with the output size rounded so that the detector's own transform then sees
  scale 1.0 and does nothing. Resizing in the loader workers keeps the decoded tensors small.
  Boxes are scaled with the image; ``target["orig_size"]`` keeps the original ``(h, w)`` and
  :func:`gid_core.evaluation.evaluate_coco` maps predictions back with :func:`rescale_boxes`.
* Horizontal flip (``train=True`` only) is decided by ``random.Random(aug_seed)`` when the key is
  ``(index, aug_seed)``, so a resumed run replays exactly the same augmentations; a plain integer
  key draws from the process-global ``random`` module (seeded per worker by the DataLoader).

Scale: a COCO-2017-train-sized file (118 k images, 860 k boxes) validates in well under a minute
and 2 GB (``make bench-coco-scale``). ``segmentation`` and ``keypoints`` are dropped while the
JSON is parsed (boxes only). The dataset keeps no Python object per image or box: training targets
live in a few flat numpy arrays (``_CompactRecords``) and COCOeval's ground truth in others
(``_GroundTruth``, built into a pycocotools ``COCO`` only when :attr:`CocoDetectionDataset.coco` is
read), so forked DataLoader workers share the parent's pages instead of copying them as reference
counts change, and spawned ones unpickle a few buffers.

Image files are opened by :func:`open_image_file`, which follows no symbolic link below the images
folder: every file a dataset reads is a regular file inside that folder, at validation and at
every later read (a link swapped in after a service registered the dataset is refused, not read).
"""

from __future__ import annotations

import contextlib
import io
import json
import errno
import math
import os
import random
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import Loc, Problem, ProblemsError

__all__ = [
    "CocoDetectionDataset",
    "DatasetValidationError",
    "MAX_REPORTED_PROBLEMS",
    "label_order",
    "open_image_file",
    "read_resized_rgb",
    "collate_detection",
    "resized_hw",
    "rescale_boxes",
    "validate_coco_dataset",
]

MAX_REPORTED_PROBLEMS = 100
# Boxes may stick out of the image by this many pixels (rounding in third-party exporters).
BOX_TOLERANCE_PX = 1.0

# Where a dataset problem is: in the annotation JSON, in the images folder, or (the note that more
# problems were left out) the dataset as a whole.
ANNOTATIONS_LOC: Loc = ("annotations",)
IMAGES_LOC: Loc = ("images",)
DATASET_LOC: Loc = ()
DATASET_LOCS = (ANNOTATIONS_LOC, IMAGES_LOC, DATASET_LOC)


class DatasetValidationError(ProblemsError):
    """A COCO dataset failed validation; ``problems`` lists every problem found."""

    summary = "invalid COCO dataset"


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


# Exact type tests (JSON gives plain int/float/bool; bool is not a number here): the checks below
# run per box, a million times for a COCO-sized file.
def _is_int(v: Any) -> bool:
    return type(v) is int


def _is_number(v: Any) -> bool:
    return (type(v) is int or type(v) is float) and math.isfinite(v)


def _label(kind: str, index: int, item: Any) -> str:
    """``annotations[12] (id 57)``: where a problem is, as the user can find it in the file."""
    if isinstance(item, dict) and _is_int(item.get("id")):
        return f"{kind}[{index}] (id {item['id']})"
    return f"{kind}[{index}]"


class _Where:
    """:func:`_label`, formatted only when a message uses it (most items have no problem)."""

    __slots__ = ("kind", "index", "item")

    def __init__(self, kind: str, index: int, item: Any) -> None:
        self.kind, self.index, self.item = kind, index, item

    def __format__(self, spec: str) -> str:
        return format(_label(self.kind, self.index, self.item), spec)

    __str__ = __repr__ = lambda self: _label(self.kind, self.index, self.item)


def _json_problem(message: str) -> Problem:
    return Problem(ANNOTATIONS_LOC, message, "invalid_dataset")


def _image_problem(message: str) -> Problem:
    return Problem(IMAGES_LOC, message, "invalid_dataset")


def _check_int_field(item: dict, key: str, where: str, problems: list[Problem], *, positive=False) -> bool:
    if key not in item:
        problems.append(_json_problem(f"{where}: missing '{key}'"))
        return False
    value = item[key]
    if not _is_int(value) or (positive and value <= 0):
        kind = "a positive integer" if positive else "an integer"
        problems.append(_json_problem(f"{where}: '{key}' must be {kind}, got {json.dumps(value)}"))
        return False
    return True


def _safe_relative(file_name: str) -> bool:
    """True for a relative path that stays inside the images folder (no ``..``, no absolute)."""
    parts = PurePosixPath(file_name.replace("\\", "/")).parts
    return bool(parts) and parts[0] != "/" and ".." not in parts and ":" not in parts[0]


def _check_images(images_list: list, images_dir: Path, problems: list[Problem]) -> dict[int, tuple[int, int]]:
    """Checks ``images``; returns ``{image_id: (width, height)}`` of the usable entries."""
    sizes: dict[int, tuple[int, int]] = {}
    first_index: dict[int, int] = {}
    check_files = images_dir.is_dir()
    if not check_files:
        problems.append(_image_problem(f"images folder {images_dir}: not found or not a directory"))
    for i, img in enumerate(images_list):
        where = _Where("images", i, img)
        if not isinstance(img, dict):
            problems.append(_json_problem(f"{where}: must be an object, got {type(img).__name__}"))
            continue
        ok = _check_int_field(img, "id", where, problems)
        ok &= _check_int_field(img, "width", where, problems, positive=True)
        ok &= _check_int_field(img, "height", where, problems, positive=True)
        file_name = img.get("file_name")
        if not isinstance(file_name, str) or not file_name:
            problems.append(_json_problem(
                f"{where}: 'file_name' must be a non-empty string, got {json.dumps(file_name)}"
            ))
            ok = False
        elif not _safe_relative(file_name):
            problems.append(_json_problem(
                f"{where}: file_name '{file_name}' must be a relative path inside the images folder"
            ))
            ok = False
        if _is_int(img.get("id")):
            if img["id"] in first_index:
                first = first_index[img["id"]]
                problems.append(_json_problem(
                    f"{where}: duplicate image id {img['id']} (first at images[{first}])"
                ))
                continue
            first_index[img["id"]] = i
        if not ok:
            continue
        width, height = img["width"], img["height"]
        sizes[img["id"]] = (width, height)
        if check_files:
            _check_image_file(images_dir, file_name, (width, height), where, problems)
    return sizes


class UnsafeImageFile(OSError):
    """The image path is a symbolic link, lies under one, or is not a regular file."""


def open_image_file(images_dir: str | Path, file_name: str) -> BinaryIO:
    """Open ``images_dir / file_name`` for reading, following no symbolic link below ``images_dir``.

    Each folder and the file itself is opened relative to its parent with ``O_NOFOLLOW``, so no
    link (at any depth, whatever it points to, and however recently swapped in) is followed.
    Raises ``UnsafeImageFile`` for a link or a non-regular file (the same error whether or not a
    link's target exists), ``FileNotFoundError`` when the file is missing.
    """
    parts = PurePosixPath(file_name).parts
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # NONBLOCK: a FIFO never hangs us
    dir_fd = os.open(images_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts[:-1]:
            next_fd = _open_below(part, flags | os.O_DIRECTORY, dir_fd)
            os.close(dir_fd)
            dir_fd = next_fd
        fd = _open_below(parts[-1], flags, dir_fd)
    finally:
        os.close(dir_fd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafeImageFile(errno.EINVAL, "not a regular file")
    return os.fdopen(fd, "rb")


def _open_below(name: str, flags: int, dir_fd: int) -> int:
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except OSError as e:
        # O_NOFOLLOW refuses a link as ELOOP, or as ENOTDIR where a folder was expected.
        if e.errno in (errno.ELOOP, errno.ENOTDIR) and stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode):
            raise UnsafeImageFile(errno.ELOOP, "symbolic link") from None
        if e.errno == errno.ENOTDIR:
            raise FileNotFoundError(errno.ENOENT, "no such file") from None
        raise


def _check_image_file(
    images_dir: Path, file_name: str, wh: tuple[int, int], where: str, problems: list[Problem]
) -> None:
    try:
        # Image.open reads only the header: cheap even for big JPEGs.
        with open_image_file(images_dir, file_name) as f, Image.open(f) as im:
            actual = im.size
    except FileNotFoundError:
        path = images_dir / file_name
        problems.append(_image_problem(f"{where}: file '{file_name}' not found in {path.parent}"))
        return
    except UnsafeImageFile:
        # One text for every case: the answer must not tell whether or where a link points.
        problems.append(Problem(IMAGES_LOC, (
            f"{where}: '{file_name}' is a symbolic link, lies under one, or is not a regular file: "
            f"image files must be regular files inside the images folder (links are not followed)"
        ), "unsafe_image_file"))
        return
    except UnidentifiedImageError:
        problems.append(_image_problem(f"{where}: cannot read image '{file_name}': not a known image format"))
        return
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        problems.append(_image_problem(f"{where}: cannot read image '{file_name}': {e}"))
        return
    if actual != wh:
        problems.append(_image_problem(
            f"{where}: size in JSON is {wh[0]}x{wh[1]} (width x height) "
            f"but '{file_name}' is {actual[0]}x{actual[1]}"
        ))


def _check_categories(categories: list, problems: list[Problem]) -> set[int]:
    ids: dict[int, int] = {}
    names: dict[str, int] = {}
    if not categories:
        problems.append(_json_problem("categories: empty; at least one category is required"))
    for i, cat in enumerate(categories):
        where = _label("categories", i, cat)
        if not isinstance(cat, dict):
            problems.append(_json_problem(f"{where}: must be an object, got {type(cat).__name__}"))
            continue
        if _check_int_field(cat, "id", where, problems):
            if cat["id"] in ids:
                first = ids[cat["id"]]
                problems.append(_json_problem(
                    f"{where}: duplicate category id {cat['id']} (first at categories[{first}])"
                ))
            else:
                ids[cat["id"]] = i
        name = cat.get("name")
        if not isinstance(name, str) or not name:
            problems.append(_json_problem(
                f"{where}: 'name' must be a non-empty string, got {json.dumps(name)}"
            ))
        elif name in names:
            # Per-category metrics are keyed by name, so names must be unique.
            problems.append(_json_problem(
                f"{where}: duplicate category name '{name}' (first at categories[{names[name]}])"
            ))
        else:
            names[name] = i
    return set(ids)


def _check_bbox(
    bbox: Any, wh: tuple[int, int] | None, image_id: Any, where: str, problems: list[Problem]
) -> None:
    if not (type(bbox) is list and len(bbox) == 4 and all(map(_is_number, bbox))):
        problems.append(_json_problem(
            f"{where}: bbox must be 4 finite numbers [x, y, width, height], got {json.dumps(bbox)}"
        ))
        return
    x, y, w, h = bbox
    tol = BOX_TOLERANCE_PX
    if w > 0 and h > 0 and (wh is None or (
        x >= -tol and y >= -tol and x + w - wh[0] <= tol and y + h - wh[1] <= tol
    )):
        return  # the common case: no message to build
    text = json.dumps(bbox)
    if w <= 0:
        problems.append(_json_problem(f"{where}: bbox {text} has non-positive width"))
    if h <= 0:
        problems.append(_json_problem(f"{where}: bbox {text} has non-positive height"))
    if wh is None:
        return
    width, height = wh
    overshoot = {
        "left": -x,
        "top": -y,
        "right": x + w - width,
        "bottom": y + h - height,
    }
    for edge, by in overshoot.items():
        if by > tol:
            problems.append(_json_problem(
                f"{where}: bbox {text} extends past the {edge} edge of image {image_id} "
                f"({width}x{height}) by {by:g} px"
            ))


def _check_annotations(
    annotations: list,
    sizes: dict[int, tuple[int, int]],
    image_ids: set[int] | None,
    cat_ids: set[int] | None,
    problems: list[Problem],
) -> None:
    """``image_ids``/``cat_ids`` None: that top-level list is unusable (already reported)."""
    first_index: dict[int, int] = {}
    for i, ann in enumerate(annotations):
        where = _Where("annotations", i, ann)
        if not isinstance(ann, dict):
            problems.append(_json_problem(f"{where}: must be an object, got {type(ann).__name__}"))
            continue
        if _check_int_field(ann, "id", where, problems):
            if ann["id"] in first_index:
                first = first_index[ann["id"]]
                problems.append(_json_problem(
                    f"{where}: duplicate annotation id {ann['id']} (first at annotations[{first}])"
                ))
            else:
                first_index[ann["id"]] = i
        image_id = ann.get("image_id")
        if _check_int_field(ann, "image_id", where, problems):
            if image_ids is not None and image_id not in image_ids:
                problems.append(_json_problem(f"{where}: image_id {image_id} is not a declared image"))
        category_id = ann.get("category_id")
        if _check_int_field(ann, "category_id", where, problems):
            if cat_ids is not None and category_id not in cat_ids:
                problems.append(_json_problem(
                    f"{where}: category_id {category_id} is not a declared category"
                ))
        if "bbox" not in ann:
            problems.append(_json_problem(f"{where}: missing 'bbox'"))
        else:
            wh = sizes.get(image_id) if _is_int(image_id) else None
            _check_bbox(ann["bbox"], wh, image_id, where, problems)
        if "iscrowd" in ann and not (_is_int(ann["iscrowd"]) and ann["iscrowd"] in (0, 1)):
            problems.append(_json_problem(
                f"{where}: 'iscrowd' must be 0 or 1, got {json.dumps(ann['iscrowd'])}"
            ))
        if "area" in ann and not (_is_number(ann["area"]) and ann["area"] >= 0):
            problems.append(_json_problem(
                f"{where}: 'area' must be a non-negative number, got {json.dumps(ann['area'])}"
            ))


def _cap(problems: list[Problem], limit: int = MAX_REPORTED_PROBLEMS) -> list[Problem]:
    if len(problems) <= limit:
        return problems
    more = Problem(DATASET_LOC, f"... and {len(problems) - limit} more problems", "too_many_problems")
    return problems[:limit] + [more]


# Masks and keypoints are never read (the service trains boxes): dropped while parsing, they never
# cost memory. COCO 2017 train's polygons would take most of 2 GB as Python lists.
_UNREAD_KEYS = ("segmentation", "keypoints")


def _drop_unread_keys(obj: dict) -> dict:
    for key in _UNREAD_KEYS:
        obj.pop(key, None)
    return obj


def _read_json(path: Path, problems: list[Problem]) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        problems.append(_json_problem(f"{path}: annotation file not found"))
        return None
    except (OSError, UnicodeDecodeError) as e:
        problems.append(_json_problem(f"{path}: cannot read annotation file: {e}"))
        return None
    try:
        return json.loads(text, object_hook=_drop_unread_keys)
    except json.JSONDecodeError as e:
        problems.append(_json_problem(f"{path}: invalid JSON: {e.msg} (line {e.lineno}, column {e.colno})"))
        return None
    except RecursionError:
        problems.append(_json_problem(f"{path}: invalid JSON: nested too deeply"))
        return None


def validate_coco_dataset(annotations: str | Path, images: str | Path) -> tuple[dict, list[Problem]]:
    """Parses a COCO detection dataset and checks it; returns ``(parsed dict, problems)``.

    ``problems`` is empty for a usable dataset; each one's ``loc`` is :data:`ANNOTATIONS_LOC` (the
    JSON) or :data:`IMAGES_LOC` (the image files). Every check runs (nothing stops at the first
    error); the list is capped at :data:`MAX_REPORTED_PROBLEMS` problems plus a final
    ``"... and N more problems"`` at :data:`DATASET_LOC`. The parsed dict is ``{}`` when the JSON
    itself is unusable. Image files are checked by header only (existence, readability, size),
    never decoded.
    """
    annotations, images = Path(annotations), Path(images)
    problems: list[Problem] = []
    data = _read_json(annotations, problems)
    if data is None:
        return {}, problems
    if not isinstance(data, dict):
        problems.append(_json_problem(
            f"{annotations}: top level must be a JSON object, got {type(data).__name__}"
        ))
        return {}, problems
    lists: dict[str, list] = {}
    for key in ("images", "annotations", "categories"):
        if key not in data:
            problems.append(_json_problem(f"missing top-level key '{key}'"))
        elif not isinstance(data[key], list):
            problems.append(_json_problem(
                f"top-level '{key}' must be a list, got {type(data[key]).__name__}"
            ))
        else:
            lists[key] = data[key]
    if "images" in lists and not lists["images"]:
        problems.append(_json_problem("images: empty; a dataset needs at least one image"))
    sizes = _check_images(lists.get("images", []), images, problems) if "images" in lists else {}
    cat_ids = _check_categories(lists["categories"], problems) if "categories" in lists else None
    if "annotations" in lists:
        image_ids = None
        if "images" in lists:
            image_ids = {
                img["id"] for img in lists["images"] if isinstance(img, dict) and _is_int(img.get("id"))
            }
        _check_annotations(lists["annotations"], sizes, image_ids, cat_ids, problems)
    return data, _cap(problems)


def label_order(categories: list[dict]) -> list[dict]:
    """A validated dataset's categories in label order (sorted by COCO id: label ``L`` is entry
    ``L - 1``) as ``{"id", "name"}``."""
    return [{"id": int(c["id"]), "name": str(c["name"])} for c in sorted(categories, key=lambda c: c["id"])]


# --------------------------------------------------------------------------------------------
# Geometry helpers
# --------------------------------------------------------------------------------------------


def resized_hw(height: int, width: int, min_size: int | None, max_size: int | None) -> tuple[int, int]:
    """Output ``(h, w)`` of the detector-style resize.

    ``scale = min(min_size / short, max_size / long)`` as in torchvision's
    ``GeneralizedRCNNTransform``; only ``max_size`` caps the long side (no upscaling); neither
    keeps the size. Sides are *rounded* (torchvision floors), which makes the constraining side
    exactly ``min_size`` or ``max_size`` so that the detector's own resize computes scale 1.0.
    """
    candidates = []
    if min_size is not None:
        candidates.append(min_size / min(height, width))
    if max_size is not None:
        candidates.append(max_size / max(height, width))
        if min_size is None:
            candidates.append(1.0)
    if not candidates:
        return height, width
    scale = min(candidates)
    return max(1, round(height * scale)), max(1, round(width * scale))


def rescale_boxes(boxes: torch.Tensor, from_hw: Sequence[int], to_hw: Sequence[int]) -> torch.Tensor:
    """Maps xyxy ``boxes`` (n, 4) from an image of size ``from_hw`` to one of size ``to_hw``."""
    ratio_h = float(to_hw[0]) / float(from_hw[0])
    ratio_w = float(to_hw[1]) / float(from_hw[1])
    scale = torch.tensor([ratio_w, ratio_h, ratio_w, ratio_h], dtype=boxes.dtype, device=boxes.device)
    return boxes * scale


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------


def _concat_offsets(counts: np.ndarray) -> np.ndarray:
    """``[0, c0, c0 + c1, ...]``: row ``i``'s items are ``values[offsets[i]:offsets[i + 1]]``."""
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return offsets


@dataclass(frozen=True)
class _CompactRecords:
    """Everything training reads per image, in a few flat numpy arrays.

    No Python object per image or box: a forked DataLoader worker that reads an item touches no
    reference count, so the pages it shares with the parent stay shared (a list of 118 k dicts or
    arrays would be copied into every worker, page by page, as it is read), and a spawned worker
    unpickles a handful of buffers.
    """

    image_ids: np.ndarray  # (N,) int64 COCO ids, in the JSON's order
    hw: np.ndarray  # (N, 2) int64 original (height, width)
    names: np.ndarray  # uint8: every file_name, UTF-8, back to back
    name_offsets: np.ndarray  # (N + 1,) int64
    boxes: np.ndarray  # (M, 4) float32 xyxy in original pixels, grouped by image, file order within
    labels: np.ndarray  # (M,) int64 in 1..C
    box_offsets: np.ndarray  # (N + 1,) int64

    @classmethod
    def build(cls, data: dict, category_to_label: dict[int, int]) -> "_CompactRecords":
        images = data["images"]
        image_ids = np.fromiter((img["id"] for img in images), np.int64, len(images))
        hw = np.array([(img["height"], img["width"]) for img in images], dtype=np.int64).reshape(-1, 2)
        encoded = [img["file_name"].encode("utf-8") for img in images]
        names = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
        name_offsets = _concat_offsets(np.fromiter(map(len, encoded), np.int64, len(encoded)))
        # Crowd regions are ignore regions for COCOeval only: no training target.
        anns = [a for a in data["annotations"] if not a.get("iscrowd", 0)]
        owner = _image_index(image_ids, np.fromiter((a["image_id"] for a in anns), np.int64, len(anns)))
        labels = np.fromiter((category_to_label[a["category_id"]] for a in anns), np.int64, len(anns))
        xywh = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        # Validation allows 1 px overshoot: clip, then drop what collapses to nothing.
        h, w = hw[owner.clip(0), 0], hw[owner.clip(0), 1]
        x1, y1 = np.minimum(np.maximum(xywh[:, 0], 0.0), w), np.minimum(np.maximum(xywh[:, 1], 0.0), h)
        x2 = np.minimum(np.maximum(xywh[:, 0] + xywh[:, 2], 0.0), w)
        y2 = np.minimum(np.maximum(xywh[:, 1] + xywh[:, 3], 0.0), h)
        keep = (owner >= 0) & (x2 > x1) & (y2 > y1)
        order = np.argsort(owner[keep], kind="stable")  # by image; file order within an image
        boxes = np.stack([x1, y1, x2, y2], axis=1)[keep][order].astype(np.float32)
        counts = np.bincount(owner[keep], minlength=len(images))
        return cls(image_ids, hw, names, name_offsets, boxes, labels[keep][order], _concat_offsets(counts))

    def __len__(self) -> int:
        return len(self.image_ids)

    def file_name(self, index: int) -> str:
        start, end = self.name_offsets[index], self.name_offsets[index + 1]
        return self.names[start:end].tobytes().decode("utf-8")

    def boxes_of(self, index: int) -> np.ndarray:
        return self.boxes[self.box_offsets[index]:self.box_offsets[index + 1]].copy()

    def labels_of(self, index: int) -> np.ndarray:
        return self.labels[self.box_offsets[index]:self.box_offsets[index + 1]].copy()


def _image_index(image_ids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Position in ``image_ids`` of each id in ``wanted``; -1 where absent (unvalidated data)."""
    order = np.argsort(image_ids, kind="stable")
    sorted_ids = image_ids[order]
    pos = np.searchsorted(sorted_ids, wanted).clip(max=max(len(sorted_ids) - 1, 0))
    found = (sorted_ids[pos] == wanted) if len(sorted_ids) else np.zeros(len(wanted), dtype=bool)
    return np.where(found, order[pos] if len(order) else 0, -1)


@dataclass(frozen=True)
class _GroundTruth:
    """Every annotation (crowd included) as COCOeval needs it, in arrays; ``to_coco`` builds the
    pycocotools object on demand (evaluation only)."""

    ann_ids: np.ndarray  # (A,) int64
    image_ids: np.ndarray  # (A,) int64
    category_ids: np.ndarray  # (A,) int64
    bbox: np.ndarray  # (A, 4) float64 xywh, as in the JSON
    area: np.ndarray  # (A,) float64; the box area where the JSON has none
    iscrowd: np.ndarray  # (A,) uint8

    @classmethod
    def build(cls, data: dict) -> "_GroundTruth":
        anns = data["annotations"]
        n = len(anns)
        bbox = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        area = np.fromiter((a.get("area", math.nan) for a in anns), np.float64, n)
        missing = np.isnan(area)
        area[missing] = bbox[missing, 2] * bbox[missing, 3]
        return cls(
            ann_ids=np.fromiter((a["id"] for a in anns), np.int64, n),
            image_ids=np.fromiter((a["image_id"] for a in anns), np.int64, n),
            category_ids=np.fromiter((a["category_id"] for a in anns), np.int64, n),
            bbox=bbox, area=area, iscrowd=np.fromiter((a.get("iscrowd", 0) for a in anns), np.uint8, n),
        )

    def to_coco(self, records: _CompactRecords, categories: list[dict]):
        from pycocotools.coco import COCO

        images = [
            {"id": int(i), "height": int(h), "width": int(w), "file_name": records.file_name(k)}
            for k, (i, (h, w)) in enumerate(zip(records.image_ids, records.hw))
        ]
        anns = [
            {"id": int(i), "image_id": int(im), "category_id": int(c), "bbox": b, "area": float(a), "iscrowd": int(z)}
            for i, im, c, b, a, z in zip(self.ann_ids, self.image_ids, self.category_ids, self.bbox.tolist(),
                                        self.area, self.iscrowd)
        ]
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns, "categories": [dict(c) for c in categories]}
        with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints
            gt.createIndex()
        return gt


class CocoDetectionDataset(torch.utils.data.Dataset):
    """A COCO detection dataset for torchvision detectors (see the module docstring).

    ``ds[i]`` or ``ds[(i, aug_seed)]`` returns ``(image, target)``:
    image float32 (3, H, W) RGB in [0, 1]; target ``{"boxes": float32 (n, 4) xyxy,
    "labels": int64 (n,) in 1..C, "image_id": int (COCO id), "orig_size": (h, w)}``.
    """

    def __init__(
        self,
        annotations: str | Path,
        images: str | Path,
        *,
        train: bool = False,
        flip_prob: float = 0.5,
        min_size: int | None = None,
        max_size: int | None = None,
        validate: bool = True,
    ) -> None:
        self.annotations_path = Path(annotations)
        self.images_dir = Path(images)
        self.train = train
        self.flip_prob = float(flip_prob)
        self.min_size = min_size
        self.max_size = max_size
        if validate:
            data, problems = validate_coco_dataset(self.annotations_path, self.images_dir)
            if problems:
                raise DatasetValidationError(problems, self.annotations_path)
        else:
            data = json.loads(self.annotations_path.read_text(encoding="utf-8"), object_hook=_drop_unread_keys)
        self._coco = None

        self.categories: list[dict] = label_order(data["categories"])
        self.category_id_to_label: dict[int, int] = {c["id"]: i + 1 for i, c in enumerate(self.categories)}
        # index = label; index 0 (background) maps to -1.
        self._label_to_cat = torch.tensor([-1] + [c["id"] for c in self.categories], dtype=torch.int64)
        self._records = _CompactRecords.build(data, self.category_id_to_label)
        # The ground truth for COCOeval (crowd regions included), kept in the building process only.
        self._gt: _GroundTruth | None = _GroundTruth.build(data)
        del data  # the parsed JSON goes now: forked loader workers must not inherit its objects

    # -- metadata ------------------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        """Number of foreground categories C (detectors are built with C + 1 classes)."""
        return len(self.categories)

    def label_to_category_id(self, label: int | torch.Tensor) -> int | torch.Tensor:
        """Contiguous label(s) 1..C back to COCO category id(s); a tensor maps element-wise."""
        if isinstance(label, torch.Tensor):
            return self._label_to_cat.to(label.device)[label.long()]
        if not 1 <= int(label) <= self.num_classes:
            raise IndexError(f"label {label} outside 1..{self.num_classes}")
        return int(self._label_to_cat[int(label)])

    @property
    def image_ids(self) -> list[int]:
        """COCO image ids in dataset order (a new list: the dataset keeps them in an array)."""
        return self._records.image_ids.tolist()

    def image_hw(self, index: int) -> tuple[int, int]:
        """Original ``(height, width)`` of image ``index`` (from the JSON; no decoding)."""
        h, w = self._records.hw[index]
        return int(h), int(w)

    @property
    def coco(self):
        """A pycocotools ``COCO`` ground truth (built lazily, for evaluation) with every box,
        crowd regions included (``iscrowd`` kept: COCOeval ignores detections matched to them).

        Missing ``area`` defaults to the box area and missing ``iscrowd`` to 0, as COCOeval needs
        both. Only available in the process that built the dataset (not in pickled copies).
        """
        if self._coco is None:
            if self._gt is None:
                raise RuntimeError("CocoDetectionDataset.coco is not available in a pickled copy")
            self._coco = self._gt.to_coco(self._records, self.categories)
        return self._coco

    def __getstate__(self) -> dict:
        # DataLoader workers (spawn) need the training records only, not the evaluation ground truth.
        state = self.__dict__.copy()
        state["_gt"] = None
        state["_coco"] = None
        return state

    # -- items ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._records)

    def _should_flip(self, aug_seed: int | None) -> bool:
        if not self.train or self.flip_prob <= 0.0:
            return False
        draw = random.random() if aug_seed is None else random.Random(aug_seed).random()
        return draw < self.flip_prob

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, dict]:
        index, aug_seed = (key[0], key[1]) if isinstance(key, tuple) else (key, None)
        index = int(index)
        records = self._records
        h, w = self.image_hw(index)
        path = records.file_name(index)
        try:
            pixels = read_resized_rgb(self.images_dir, path, (h, w), self.min_size, self.max_size)
        except OSError as e:
            raise OSError(f"cannot decode image {path} (image id {records.image_ids[index]}): {e}") from e
        new_h, new_w = pixels.shape[:2]

        boxes = torch.from_numpy(records.boxes_of(index))  # (n, 4) xyxy, a copy
        if (new_h, new_w) != (h, w):
            boxes = rescale_boxes(boxes, (h, w), (new_h, new_w))
        if self._should_flip(aug_seed):
            pixels = pixels[:, ::-1]
            boxes = torch.stack([new_w - boxes[:, 2], boxes[:, 1], new_w - boxes[:, 0], boxes[:, 3]], dim=1)
        image = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float().div_(255.0)
        target = {
            "boxes": boxes.reshape(-1, 4),
            "labels": torch.from_numpy(records.labels_of(index)),
            "image_id": int(records.image_ids[index]),
            "orig_size": (h, w),
        }
        return image, target


def read_resized_rgb(
    images_dir: str | Path, file_name: str, hw: tuple[int, int], min_size: int | None, max_size: int | None
) -> np.ndarray:
    """The image ``file_name`` (original size ``hw``) as uint8 (H, W, 3) RGB, resized by
    :func:`resized_hw`; opened by :func:`open_image_file` (no symbolic link followed)."""
    with open_image_file(images_dir, file_name) as f, Image.open(f) as im:
        im = im.convert("RGB")
        new_h, new_w = resized_hw(hw[0], hw[1], min_size, max_size)
        if (new_h, new_w) != im.size[::-1]:
            im = im.resize((new_w, new_h), Image.BILINEAR)
        return np.array(im, dtype=np.uint8)


def collate_detection(batch: Sequence[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """Keeps images as a list (detectors batch images of different sizes themselves)."""
    images = [image for image, _ in batch]
    targets = [target for _, target in batch]
    return images, targets
