"""Deterministic synthetic COCO-format detection datasets for demos, tests and benchmarks.

Objects are the handwritten digits of scikit-learn's ``load_digits`` (8x8 grey sprites that ship
with scikit-learn: nothing is downloaded), one category per digit (``digit_0`` .. ``digit_9``,
COCO ids 1..10). Each sprite is cropped to its ink, upscaled with bicubic interpolation to a
jittered aspect ratio, thresholded into a mask and painted in a bright saturated colour, so the
class is carried by the *shape*, never the colour. Train and val draw from disjoint halves of the
digit samples.

Scene recipe (one independent random stream per image, derived from ``(seed, split, index)``):

* background: a random crop of one of scikit-image's bundled photographs (``skimage.data``;
  shipped inside the package), desaturated, lowered in contrast and darkened so objects stand out;
* clutter: 1-4 distractor shapes (ellipses, rectangles, triangles, lines) in muted colours; they
  are never annotated;
* easier scenes (the demo's): ``photo_background=False`` paints a flat dark grey instead,
  ``clutter=False`` draws no distractors, ``object_scale=(lo, hi)`` draws every object's
  sqrt(box area) / image side from one uniform range instead of the size buckets below;
* objects: ``min_objects..max_objects`` per image, in three size buckets whose box areas, at
  ``image_size=128``, fall in COCO's small (< 32^2), medium and large (> 96^2) ranges (the bucket
  bounds are fractions of the image side, so other sizes scale the same way). The first object of
  image ``i`` is forced into bucket ``i % 3`` so every range is populated; at most one object per
  image is large. Objects are placed largest first and may overlap.
* occlusion rule: a placement is rejected (and retried elsewhere, then smaller) if it would leave
  any earlier object with less than 40 % of its mask visible, i.e. no object is more than 60 %
  covered. Every painted object is therefore annotated, and its box is the tight box of its
  *visible* mask pixels (``bbox`` xywh in pixel-edge coordinates, ``area`` = box area, so COCO's
  size ranges follow the boxes).

Same config ⇒ byte-identical files (PNG via Pillow, no timestamps); the annotation JSON is written
atomically last, after stale files from an earlier run in the same folder are removed.
"""

from __future__ import annotations

import colorsys
import functools
import gzip
import importlib.util
import io
import json
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from gid_core.config import SyntheticDatasetConfig
from gid_core.fileio import atomic_write_bytes

__all__ = [
    "COCO2017_TRAIN", "SIZE_BUCKETS", "coco_category_ids", "load_digit_sprites", "make_coco_scale_dataset",
    "make_synthetic_dataset", "synthetic_categories",
]

# Photographs bundled with scikit-image (in skimage/data/, no download needed).
TEXTURE_SOURCES = (
    "astronaut", "coffee", "chelsea", "rocket", "camera", "brick", "grass", "gravel", "coins", "moon",
)
# sqrt(box area) / image side per size bucket; at 128 px: small 10-28 px, medium 36-72 px,
# large 102-113 px, i.e. areas < 32^2, in (32^2, 96^2) and > 96^2 with margins.
SIZE_BUCKETS = {"small": (0.075, 0.22), "medium": (0.28, 0.56), "large": (0.80, 0.88)}
BUCKET_PROBS = (0.55, 0.35, 0.10)  # small, medium, large (first object of an image is forced)
MIN_VISIBLE = 0.4  # an object keeps at least 40 % of its mask (at most 60 % covered)
MIN_SIDE_PX = 8
_INK_THRESHOLD = 0.45  # upscaled digit intensity (0..1) that counts as object pixel
_SPLITS = {"train": 0, "val": 1}


def synthetic_categories(num_classes: int) -> list[dict]:
    """COCO categories of a synthetic dataset: ids 1..C named ``digit_0`` .. ``digit_{C-1}``."""
    return [{"id": d + 1, "name": f"digit_{d}", "supercategory": "digit"} for d in range(num_classes)]


@functools.lru_cache(maxsize=1)
def _textures() -> tuple[Image.Image, ...]:
    import skimage.data

    out = []
    for name in TEXTURE_SOURCES:
        img = np.asarray(getattr(skimage.data, name)())
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        out.append(Image.fromarray(np.ascontiguousarray(img[:, :, :3]).astype(np.uint8)))
    return tuple(out)


@functools.lru_cache(maxsize=1)
def load_digit_sprites() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's ``load_digits``: ``(images (1797, 8, 8) float 0..16, labels (1797,) int)``.

    Reads the CSV that ``load_digits`` reads, straight from the installed package: importing
    ``sklearn`` itself costs seconds (SciPy), the file read costs milliseconds.
    """
    spec = importlib.util.find_spec("sklearn")
    csv = None
    if spec is not None and spec.submodule_search_locations:
        csv = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"
    if csv is None or not csv.is_file():
        from sklearn.datasets import load_digits

        digits = load_digits()
        return digits.images, digits.target.astype(np.int64)
    with gzip.open(csv, "rt") as f:
        data = np.loadtxt(f, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)


@functools.lru_cache(maxsize=2)
def _digit_pool(split: int) -> tuple[tuple[np.ndarray, ...], ...]:
    """Per digit class, the sprites of one split (train: even samples, val: odd), ink-cropped."""
    images, labels = load_digit_sprites()
    pool: list[list[np.ndarray]] = [[] for _ in range(10)]
    seen = [0] * 10
    for image, label in zip(images, labels):
        label = int(label)
        seen[label] += 1
        if (seen[label] - 1) % 2 != split:
            continue
        sprite = image.astype(np.float32) / 16.0
        rows, cols = np.nonzero(sprite >= 0.25)
        pool[label].append(sprite[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1])
    return tuple(tuple(p) for p in pool)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) float32 in [0, 1]: a muted crop of a bundled photograph."""
    textures = _textures()
    src = textures[rng.integers(len(textures))]
    side = int(rng.uniform(0.3, 0.8) * min(src.size))
    x0 = int(rng.integers(0, src.size[0] - side + 1))
    y0 = int(rng.integers(0, src.size[1] - side + 1))
    crop = src.crop((x0, y0, x0 + side, y0 + side)).resize((size, size), Image.BILINEAR)
    bg = np.asarray(crop, dtype=np.float32) / 255.0
    if rng.random() < 0.5:
        bg = bg[:, ::-1]
    gray = bg.mean(axis=2, keepdims=True)
    bg = gray + rng.uniform(0.15, 0.5) * (bg - gray)  # desaturate
    bg = rng.uniform(0.22, 0.42) + rng.uniform(0.35, 0.65) * (bg - bg.mean())  # darken, flatten
    bg = bg + rng.uniform(-0.04, 0.04, size=3).astype(np.float32)  # tint
    return np.clip(bg, 0.0, 1.0).astype(np.float32)


def _colour(rng: np.random.Generator, sat: tuple[float, float], val: tuple[float, float]) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(*sat), rng.uniform(*val)), dtype=np.float32)


def _flat_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) float32: a flat dark grey with a slight tint (``photo_background=False``)."""
    level = rng.uniform(0.22, 0.42) + rng.uniform(-0.04, 0.04, size=3)
    return np.broadcast_to(level.astype(np.float32), (size, size, 3)).copy()


def _draw_distractors(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Muted shapes that are *not* objects (never annotated)."""
    size = image.shape[0]
    canvas = Image.fromarray((image * 255.0 + 0.5).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(1, 5))):
        colour = tuple(int(c * 255) for c in _colour(rng, (0.15, 0.7), (0.3, 0.75)))
        w, h = (rng.uniform(0.08, 0.4, size=2) * size).astype(int) + 2
        x, y = int(rng.integers(-w // 2, size)), int(rng.integers(-h // 2, size))
        kind = int(rng.integers(4))
        if kind == 0:
            draw.ellipse((x, y, x + w, y + h), fill=colour if rng.random() < 0.6 else None, outline=colour)
        elif kind == 1:
            draw.rectangle((x, y, x + w, y + h), fill=colour if rng.random() < 0.6 else None, outline=colour)
        elif kind == 2:
            draw.polygon([(x, y + h), (x + w // 2, y), (x + w, y + h)], fill=colour)
        else:
            draw.line((x, y, x + w, y + h), fill=colour, width=int(rng.integers(1, 4)))
    return np.asarray(canvas, dtype=np.float32) / 255.0


def _plan_objects(
    rng: np.random.Generator, count: int, first_bucket: int, num_classes: int,
    object_scale: tuple[float, float] | None = None,
) -> list[tuple]:
    """``(class, size_fraction, bucket)`` per object, largest first; ``object_scale`` replaces the
    size buckets by one uniform range (the bucket then only picks the aspect jitter)."""
    plans = []
    if object_scale is not None:
        for _ in range(count):
            cls, fraction = int(rng.integers(num_classes)), float(rng.uniform(*object_scale))
            plans.append((cls, fraction, 2 if fraction >= SIZE_BUCKETS["large"][0] else 1))
        return sorted(plans, key=lambda p: -p[1])
    has_large = False
    for k in range(count):
        bucket = first_bucket if k == 0 else int(rng.choice(3, p=BUCKET_PROBS))
        if bucket == 2 and has_large:
            bucket = 1
        has_large |= bucket == 2
        lo, hi = SIZE_BUCKETS[("small", "medium", "large")[bucket]]
        plans.append((int(rng.integers(num_classes)), float(rng.uniform(lo, hi)), bucket))
    return sorted(plans, key=lambda p: -p[1])


def _sprite(rng: np.random.Generator, digit: np.ndarray, side: float, bucket: int, size: int):
    """Upscaled sprite: (alpha (h, w), mask (h, w) bool, rgb (h, w, 3)), cropped to the mask."""
    natural = digit.shape[1] / digit.shape[0]
    jitter = 0.12 if bucket == 2 else 0.3  # large boxes must still fit the image
    aspect = float(np.clip(np.sqrt(natural) * np.exp(rng.uniform(-jitter, jitter)), 0.5, 2.0))
    if bucket == 2:
        aspect = min(max(aspect, 0.8), 1.25)
    # Thresholding the upscaled ink trims ~1 px per edge: ask for 2 px more than the minimum.
    w = int(round(min(max(side * np.sqrt(aspect), MIN_SIDE_PX + 2), size - 2)))
    h = int(round(min(max(side / np.sqrt(aspect), MIN_SIDE_PX + 2), size - 2)))
    upscaled = Image.fromarray(np.ascontiguousarray(digit)).resize((w, h), Image.BICUBIC)  # mode "F"
    ink = np.asarray(upscaled, dtype=np.float32)
    mask = ink >= _INK_THRESHOLD
    rows, cols = np.nonzero(mask)
    if rows.size == 0 or min(np.ptp(rows), np.ptp(cols)) + 1 < MIN_SIDE_PX:
        return None
    crop = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
    ink, mask = ink[crop], mask[crop]
    alpha = np.clip((ink - 0.3) / 0.3, 0.0, 1.0)  # soft edge; alpha >= 0.5 exactly on the mask
    colour = _colour(rng, (0.7, 1.0), (0.85, 1.0))
    rgb = colour * (0.75 + 0.25 * np.clip(ink, 0.0, 1.0))[:, :, None]  # keep the stroke shading
    return alpha, mask, rgb


def _render_image(
    rng: np.random.Generator,
    *,
    image_size: int,
    num_classes: int,
    min_objects: int,
    max_objects: int,
    first_bucket: int,
    digits: tuple[tuple[np.ndarray, ...], ...],
    object_scale: tuple[float, float] | None = None,
    clutter: bool = True,
    photo_background: bool = True,
) -> tuple[np.ndarray, list[tuple[int, list[int]]]]:
    """One scene: ``(uint8 (S, S, 3) image, [(digit class, [x, y, w, h]) ...])``. The defaults of
    the last three draw exactly the random numbers of the original scenes (same files)."""
    size = image_size
    image = _background(rng, size) if photo_background else _flat_background(rng, size)
    if clutter:
        image = _draw_distractors(rng, image)
    owner = np.full((size, size), -1, dtype=np.int32)  # index of the object seen at each pixel
    placed: list[dict] = []  # per object: visible / full mask pixels, paste rect
    classes: list[int] = []
    count = int(rng.integers(min_objects, max_objects + 1))
    plans = _plan_objects(rng, count, first_bucket, num_classes, object_scale)
    # Extra small objects only if crowding made us fall short of min_objects.
    smallest = SIZE_BUCKETS["small"][0] if object_scale is None else object_scale[0]
    extra = [(int(rng.integers(num_classes)), smallest, 0) for _ in range(4 * min_objects)]
    for cls, fraction, bucket in plans + extra:
        if len(classes) >= count:
            break
        pool = digits[cls]
        digit = pool[int(rng.integers(len(pool)))]
        side = fraction * size
        for _ in range(3):  # shrink and retry when the scene is crowded
            sprite = _sprite(rng, digit, side, bucket, size)
            if sprite is not None and _place(rng, sprite, image, owner, placed):
                classes.append(cls)
                break
            side = max(side * 0.7, MIN_SIDE_PX)
    if len(classes) < min_objects:
        raise ValueError(
            f"could not place min_objects={min_objects} objects in a {size}px image without covering "
            f"an object by more than {100 - 100 * MIN_VISIBLE:.0f}%; lower min_objects"
        )
    noise = rng.normal(0.0, 0.012, size=image.shape).astype(np.float32)
    pixels = (np.clip(image + noise, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    objects = []
    for j, cls in enumerate(classes):
        y, x, h, w = placed[j]["rect"]
        seen = owner[y : y + h, x : x + w] == j
        rows, cols = np.flatnonzero(seen.any(axis=1)), np.flatnonzero(seen.any(axis=0))
        x0, y0 = x + int(cols[0]), y + int(rows[0])
        objects.append((cls, [x0, y0, int(cols[-1] - cols[0]) + 1, int(rows[-1] - rows[0]) + 1]))
    return pixels, objects


def _visible_min_side(owner: np.ndarray, rect: tuple[int, int, int, int], j: int) -> int:
    """Shorter side of the tight box of object ``j``'s visible pixels inside its ``rect``."""
    y, x, h, w = rect
    seen = owner[y : y + h, x : x + w] == j
    rows, cols = np.flatnonzero(seen.any(axis=1)), np.flatnonzero(seen.any(axis=0))
    return int(min(rows[-1] - rows[0], cols[-1] - cols[0])) + 1


def _place(rng, sprite, image, owner, placed: list[dict], tries: int = 8) -> bool:
    """Pastes ``sprite`` at the least-overlapping of ``tries`` random spots that keeps every
    earlier object >= MIN_VISIBLE visible with a visible box of at least MIN_SIDE_PX per side.

    Preferring free space keeps sparse scenes clean; crowded scenes still get occlusion.
    """
    alpha, mask, rgb = sprite
    h, w = mask.shape
    size = owner.shape[0]
    new_index = len(placed)
    best = None  # (covered pixels, y, x, lost)
    for _ in range(tries):
        y, x = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
        region = owner[y : y + h, x : x + w]
        under = region[mask]
        under = under[under >= 0]
        if best is not None and under.size >= best[0]:
            continue
        lost = np.bincount(under, minlength=new_index)
        if any(p["visible"] - l < MIN_VISIBLE * p["full"] for p, l in zip(placed, lost)):
            continue
        saved = region.copy()
        region[mask] = new_index
        hit = np.flatnonzero(lost)
        slivers = any(_visible_min_side(owner, placed[j]["rect"], j) < MIN_SIDE_PX for j in hit)
        region[...] = saved
        if slivers:
            continue  # would leave only a sliver of an earlier object
        best = (under.size, y, x, lost)
        if under.size == 0:
            break
    if best is None:
        return False
    _, y, x, lost = best
    owner[y : y + h, x : x + w][mask] = new_index
    for j in np.flatnonzero(lost):
        placed[j]["visible"] -= int(lost[j])
    area = int(mask.sum())
    placed.append({"visible": area, "full": area, "rect": (y, x, h, w)})
    a = alpha[:, :, None]
    image[y : y + h, x : x + w] = image[y : y + h, x : x + w] * (1.0 - a) + rgb * a
    return True


_IMAGE_NAME = re.compile(r"\d{6,}\.png")


def _write_split(cfg: SyntheticDatasetConfig, split: str, count: int) -> dict:
    split_dir = Path(cfg.output_dir) / split
    images_dir = split_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    ann_path = split_dir / "annotations.json"
    # The JSON is the commit point: never leave an old one next to half-regenerated images.
    ann_path.unlink(missing_ok=True)
    digits = _digit_pool(_SPLITS[split])
    images, annotations = [], []
    names = set()
    for i in range(count):
        seq = np.random.SeedSequence(cfg.seed % 2**64, spawn_key=(_SPLITS[split], i))
        pixels, objects = _render_image(
            np.random.default_rng(seq),
            image_size=cfg.image_size,
            num_classes=cfg.num_classes,
            min_objects=cfg.min_objects,
            max_objects=cfg.max_objects,
            first_bucket=i % 3,
            digits=digits,
            object_scale=cfg.object_scale,
            clutter=cfg.clutter,
            photo_background=cfg.photo_background,
        )
        name = f"{i:06d}.png"
        names.add(name)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        (images_dir / name).write_bytes(buf.getvalue())
        images.append({"id": i + 1, "file_name": name, "width": cfg.image_size, "height": cfg.image_size})
        for cls, (x, y, w, h) in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": cls + 1,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    for stale in images_dir.iterdir():
        if _IMAGE_NAME.fullmatch(stale.name) and stale.name not in names:
            stale.unlink()
    data = {
        "info": {"description": "GID synthetic digits", "split": split, "seed": cfg.seed, "version": 1},
        "images": images,
        "annotations": annotations,
        "categories": synthetic_categories(cfg.num_classes),
    }
    atomic_write_bytes(ann_path, json.dumps(data, separators=(",", ":")).encode("utf-8"))
    return {
        "annotations": str(ann_path),
        "images": str(images_dir),
        "num_images": count,
        "num_annotations": len(annotations),
    }


def make_synthetic_dataset(cfg: SyntheticDatasetConfig) -> dict:
    """Writes ``<output_dir>/{train,val}/images/*.png`` and ``<output_dir>/{train,val}/annotations.json``.

    Returns ``{"output_dir", "train_annotations", "train_images", "val_annotations",
    "val_images", "num_train_images", "num_train_annotations", "num_val_images",
    "num_val_annotations", "categories"}`` (paths as strings, JSON-serialisable).
    """
    result: dict = {"output_dir": str(cfg.output_dir)}
    for split, count in (("train", cfg.num_train), ("val", cfg.num_val)):
        info = _write_split(cfg, split, count)
        result[f"{split}_annotations"] = info["annotations"]
        result[f"{split}_images"] = info["images"]
        result[f"num_{split}_images"] = info["num_images"]
        result[f"num_{split}_annotations"] = info["num_annotations"]
    result["categories"] = synthetic_categories(cfg.num_classes)
    return result


# --------------------------------------------------------------------------------------------
# COCO-2017-shaped annotation files (scale tests and benchmarks)
# --------------------------------------------------------------------------------------------

# COCO 2017 train's image, box and empty-image counts (about 1 % of its boxes are crowd regions),
# and the 10 ids of 1..90 that have no category.
COCO2017_TRAIN = {"num_images": 118_287, "num_annotations": 860_001, "num_empty": 1_021, "num_crowd": 8_600}
COCO_MISSING_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)
# Common COCO image sizes (width, height); every image file of one size is the same bytes.
_COCO_SIZES = ((640, 480), (480, 640), (640, 427), (427, 640), (640, 426), (640, 424), (500, 375), (640, 640))


def coco_category_ids() -> list[int]:
    """COCO's 80 category ids: 1..90 without the 10 unused ones."""
    return [i for i in range(1, 91) if i not in COCO_MISSING_IDS]


def _annotation_chunk(rng, ids, image_ids, sizes, cat_ids, crowd, polygon_points) -> str:
    """One chunk of annotations as JSON text (the objects only, comma separated)."""
    w_img, h_img = sizes[:, 0], sizes[:, 1]
    bw = np.minimum(np.round(rng.lognormal(3.6, 1.0, len(ids)), 2) + 1.0, w_img - 1.0)
    bh = np.minimum(np.round(rng.lognormal(3.6, 1.0, len(ids)), 2) + 1.0, h_img - 1.0)
    x = np.round(rng.random(len(ids)) * (w_img - bw), 2)
    y = np.round(rng.random(len(ids)) * (h_img - bh), 2)
    parts = []
    for k in range(len(ids)):
        xk, yk, wk, hk = float(x[k]), float(y[k]), float(bw[k]), float(bh[k])
        if crowd[k]:  # crowd regions carry RLE, as in COCO
            seg = {"counts": [int(v) for v in rng.integers(1, 400, 8)], "size": [int(h_img[k]), int(w_img[k])]}
        else:  # a polygon inside the box, of COCO's typical length
            n = max(3, int(rng.poisson(polygon_points)))
            pts = np.round(rng.random((n, 2)) * (wk, hk) + (xk, yk), 2)
            seg = [pts.ravel().tolist()] if polygon_points else []
        parts.append(json.dumps({
            "segmentation": seg, "area": round(wk * hk * 0.6, 4), "iscrowd": int(crowd[k]),
            "image_id": int(image_ids[k]), "bbox": [xk, yk, wk, hk], "category_id": int(cat_ids[k]),
            "id": int(ids[k]),
        }, separators=(",", ":")))
    return ",".join(parts)


def make_coco_scale_dataset(
    out_dir: str | Path,
    *,
    num_images: int = COCO2017_TRAIN["num_images"],
    num_annotations: int = COCO2017_TRAIN["num_annotations"],
    num_empty: int = COCO2017_TRAIN["num_empty"],
    num_crowd: int = COCO2017_TRAIN["num_crowd"],
    polygon_points: int = 12,
    write_images: bool = True,
    seed: int = 0,
) -> dict:
    """Writes a COCO-2017-shaped detection dataset: ``<out_dir>/annotations.json`` and, with
    ``write_images``, one small flat JPEG per image under ``<out_dir>/images/`` (the declared size,
    so header checks pass; identical bytes per size, so 118 k files take seconds).

    The defaults are COCO 2017 train's counts: 118,287 images (1,021 without boxes, sparse shuffled
    ids), 860,001 boxes in random image order (some crowd, with RLE), the 80 categories with
    COCO's gapped ids, polygons of ``polygon_points`` points on average (0: empty segmentation).
    Returns the paths, the counts and the category ids (JSON-serialisable).
    """
    if not 0 <= num_empty < num_images or num_annotations < num_images - num_empty or num_crowd > num_annotations:
        raise ValueError("need 0 <= num_empty < num_images, a box for every non-empty image, num_crowd <= num_annotations")
    out = Path(out_dir)
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    image_ids = rng.choice(np.arange(1, max(600_000, 5 * num_images)), num_images, replace=False)
    size_index = rng.integers(0, len(_COCO_SIZES), num_images)
    sizes = np.asarray(_COCO_SIZES, dtype=np.float64)[size_index]
    # Every non-empty image gets one box, the rest land at random; then shuffle the file order.
    owners = np.concatenate([np.arange(num_empty, num_images), rng.integers(num_empty, num_images, num_annotations - (num_images - num_empty))])
    owners = rng.permutation(owners)
    cats = np.asarray(coco_category_ids())[rng.integers(0, 80, num_annotations)]
    crowd = np.zeros(num_annotations, dtype=bool)
    crowd[rng.choice(num_annotations, num_crowd, replace=False)] = True
    ann_ids = np.arange(1, num_annotations + 1) + 900_000  # ids beyond the image ids, as in COCO
    chunks = []
    for start in range(0, num_annotations, 50_000):
        sl = slice(start, start + 50_000)
        chunks.append(_annotation_chunk(rng, ann_ids[sl], image_ids[owners[sl]], sizes[owners[sl]], cats[sl],
                                        crowd[sl], polygon_points))
    images = [
        {"license": 1, "file_name": f"{int(i):012d}.jpg", "coco_url": f"http://images.cocodataset.org/train2017/{int(i):012d}.jpg",
         "height": int(_COCO_SIZES[s][1]), "width": int(_COCO_SIZES[s][0]), "date_captured": "2013-11-14 17:02:52",
         "flickr_url": "", "id": int(i)}
        for i, s in zip(image_ids, size_index)
    ]
    images_json = json.dumps([images[i] for i in rng.permutation(num_images)], separators=(",", ":"))
    categories = [{"supercategory": "thing", "id": c, "name": f"category_{c}"} for c in coco_category_ids()]
    head = json.dumps({"info": {"description": "COCO-2017-shaped synthetic boxes", "version": "1.0"},
                       "licenses": [{"url": "", "id": 1, "name": "synthetic"}]}, separators=(",", ":"))[:-1]
    text = f'{head},"images":{images_json},"annotations":[{",".join(chunks)}],"categories":{json.dumps(categories)}}}'
    ann_path = out / "annotations.json"
    atomic_write_bytes(ann_path, text.encode("utf-8"))
    if write_images:
        _write_flat_jpegs(images_dir, images)
    return {
        "annotations": str(ann_path), "images": str(images_dir), "num_images": num_images,
        "num_annotations": num_annotations, "num_empty": num_empty, "num_crowd": num_crowd,
        "category_ids": coco_category_ids(),
    }


def _write_flat_jpegs(images_dir: Path, images: list[dict]) -> None:
    encoded: dict[tuple[int, int], bytes] = {}
    for img in images:
        wh = (img["width"], img["height"])
        if wh not in encoded:
            buf = io.BytesIO()
            Image.new("RGB", wh, (114, 114, 114)).save(buf, format="JPEG", quality=50)
            encoded[wh] = buf.getvalue()
        fd = os.open(images_dir / img["file_name"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, encoded[wh])
        finally:
            os.close(fd)
