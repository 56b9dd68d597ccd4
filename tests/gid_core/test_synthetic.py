"""The deterministic synthetic COCO generator (gid_core.synthetic)."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from gid_core.config import SyntheticDatasetConfig
from gid_core.data import CocoDetectionDataset, validate_coco_dataset
from gid_core.synthetic import MIN_SIDE_PX, load_digit_sprites, make_synthetic_dataset


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> tuple[SyntheticDatasetConfig, dict]:
    cfg = SyntheticDatasetConfig(
        output_dir=tmp_path_factory.mktemp("syn") / "ds", num_train=64, num_val=16, image_size=128, num_classes=10, seed=3
    )
    return cfg, make_synthetic_dataset(cfg)


def test_layout_and_counts(generated):
    cfg, result = generated
    root = Path(cfg.output_dir)
    assert result["train_annotations"] == str(root / "train" / "annotations.json")
    assert result["train_images"] == str(root / "train" / "images")
    assert result["val_annotations"] == str(root / "val" / "annotations.json")
    assert result["val_images"] == str(root / "val" / "images")
    for split, count in (("train", 64), ("val", 16)):
        data = json.loads(Path(result[f"{split}_annotations"]).read_text())
        assert result[f"num_{split}_images"] == len(data["images"]) == count
        assert result[f"num_{split}_annotations"] == len(data["annotations"])
        assert sorted(p.name for p in Path(result[f"{split}_images"]).iterdir()) == sorted(
            im["file_name"] for im in data["images"]
        )
        assert not list((root / split).glob(".*tmp"))  # no leftover temp files
    json.dumps(result)  # JSON-serialisable


def test_categories_and_objects(generated):
    cfg, result = generated
    data = json.loads(Path(result["train_annotations"]).read_text())
    assert data["categories"] == result["categories"]
    assert [c["name"] for c in data["categories"]] == [f"digit_{d}" for d in range(10)]
    assert [c["id"] for c in data["categories"]] == list(range(1, 11))
    per_image = Counter(a["image_id"] for a in data["annotations"])
    counts = [per_image.get(im["id"], 0) for im in data["images"]]
    assert min(counts) >= cfg.min_objects and max(counts) <= cfg.max_objects
    assert len(set(counts)) > 3  # a spread of object counts
    used = Counter(a["category_id"] for a in data["annotations"])
    assert set(used) == set(range(1, 11))
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        assert x >= 0 and y >= 0 and x + w <= 128 and y + h <= 128
        assert min(w, h) >= MIN_SIDE_PX
        assert a["area"] == w * h and a["iscrowd"] == 0
    areas = np.array([a["area"] for a in data["annotations"]])
    # COCO ranges: small < 32^2 <= medium <= 96^2 < large; all populated in 64 images
    assert (areas < 32**2).sum() >= 10
    assert ((areas >= 32**2) & (areas <= 96**2)).sum() >= 10
    assert (areas > 96**2).sum() >= 10


def test_passes_validation_and_loads(generated):
    _, result = generated
    for split in ("train", "val"):
        _, problems = validate_coco_dataset(result[f"{split}_annotations"], result[f"{split}_images"])
        assert problems == []
    ds = CocoDetectionDataset(result["val_annotations"], result["val_images"])
    image, target = ds[0]
    assert image.shape == (3, 128, 128)
    assert target["labels"].min() >= 1 and target["labels"].max() <= 10


def test_objects_stand_out_from_the_background(generated):
    """Learnability: pixels inside object boxes are far more saturated than the background."""
    _, result = generated
    data = json.loads(Path(result["val_annotations"]).read_text())
    inside, outside = [], []
    for im in data["images"]:
        hsv = np.asarray(Image.open(Path(result["val_images"]) / im["file_name"]).convert("HSV"), dtype=np.float32)
        covered = np.zeros(hsv.shape[:2], dtype=bool)
        for a in data["annotations"]:
            if a["image_id"] == im["id"]:
                x, y, w, h = a["bbox"]
                covered[y : y + h, x : x + w] = True
        inside.append(np.percentile(hsv[covered][:, 1], 75) if covered.any() else np.nan)
        outside.append(np.percentile(hsv[~covered][:, 1], 75) if (~covered).any() else np.nan)
    assert np.nanmedian(inside) > np.nanmedian(outside) + 60


def test_same_seed_is_byte_identical_and_other_seeds_differ(generated, tmp_path: Path):
    cfg, _ = generated
    again = cfg.model_copy(update={"output_dir": tmp_path / "again"})
    make_synthetic_dataset(again)
    assert _files(Path(cfg.output_dir)) == _files(tmp_path / "again")

    other = cfg.model_copy(update={"output_dir": tmp_path / "other", "seed": 4, "num_train": 4, "num_val": 2})
    make_synthetic_dataset(other)
    first, second = _files(Path(cfg.output_dir)), _files(tmp_path / "other")
    for name in ("train/images/000000.png", "train/images/000003.png", "val/images/000001.png"):
        assert first[name] != second[name]
    # train and val use different streams
    assert first["train/images/000000.png"] != first["val/images/000000.png"]
    # image i does not depend on how many images are generated
    assert Image.open(tmp_path / "again" / "train/images/000002.png").tobytes() == Image.open(
        Path(cfg.output_dir) / "train/images/000002.png"
    ).tobytes()


def test_regenerating_into_the_same_folder_removes_stale_images(tmp_path: Path):
    cfg = SyntheticDatasetConfig(output_dir=tmp_path, num_train=6, num_val=2, image_size=64, seed=1)
    make_synthetic_dataset(cfg)
    result = make_synthetic_dataset(cfg.model_copy(update={"num_train": 3, "seed": 2}))
    assert sorted(p.name for p in (tmp_path / "train" / "images").iterdir()) == ["000000.png", "000001.png", "000002.png"]
    assert validate_coco_dataset(result["train_annotations"], result["train_images"])[1] == []
    assert json.loads((tmp_path / "train" / "annotations.json").read_text())["info"]["seed"] == 2


def test_object_count_range_and_small_images(tmp_path: Path):
    cfg = SyntheticDatasetConfig(output_dir=tmp_path, num_train=30, num_val=1, image_size=64, num_classes=8, min_objects=2, max_objects=4)
    result = make_synthetic_dataset(cfg)
    data = json.loads(Path(result["train_annotations"]).read_text())
    per_image = Counter(a["image_id"] for a in data["annotations"])
    assert sorted(set(per_image[im["id"]] for im in data["images"])) == [2, 3, 4]
    assert {a["category_id"] for a in data["annotations"]} <= set(range(1, 9))
    assert validate_coco_dataset(result["train_annotations"], result["train_images"])[1] == []


def test_zero_objects_allowed(tmp_path: Path):
    cfg = SyntheticDatasetConfig(output_dir=tmp_path, num_train=3, num_val=1, image_size=32, min_objects=0, max_objects=1)
    result = make_synthetic_dataset(cfg)
    assert result["num_train_annotations"] <= 3
    assert validate_coco_dataset(result["train_annotations"], result["train_images"])[1] == []


def test_impossible_crowding_is_a_clear_error(tmp_path: Path):
    cfg = SyntheticDatasetConfig(output_dir=tmp_path, num_train=1, num_val=1, image_size=32, min_objects=60, max_objects=60)
    with pytest.raises(ValueError, match="could not place min_objects=60 objects in a 32px image"):
        make_synthetic_dataset(cfg)
    assert not (tmp_path / "train" / "annotations.json").exists()


def test_digit_sprites_match_scikit_learn():
    from sklearn.datasets import load_digits

    images, labels = load_digit_sprites()
    digits = load_digits()
    assert np.array_equal(images, digits.images) and np.array_equal(labels, digits.target)


# ----------------------------------------------------------------------- easier scenes (issue #12)
# Digest of the decoded pixels and the annotation JSON of a small dataset, taken with the generator
# before the scene fields existed: their defaults must keep every existing dataset (and the
# benchmark caches keyed on the config) as it was.
_ORIGINAL_DIGEST = "b7c6f4ad1d58c487f0f64f5249fc9b5685ead3845c4d8423a2e0f7910188f743"


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.suffix == ".png":
            h.update(p.name.encode())
            h.update(Image.open(p).tobytes())
        elif p.name == "annotations.json":
            h.update(p.read_bytes())
    return h.hexdigest()


def test_scene_defaults_reproduce_the_original_datasets_and_config_dump(tmp_path: Path):
    cfg = SyntheticDatasetConfig(output_dir=tmp_path, num_train=6, num_val=3, image_size=64, num_classes=10,
                                 max_objects=6, seed=5)
    make_synthetic_dataset(cfg)
    assert _digest(tmp_path) == _ORIGINAL_DIGEST
    # The dump (the cache key) has the original fields only while the scene fields are defaults.
    original = {"output_dir", "num_train", "num_val", "image_size", "num_classes", "min_objects", "max_objects", "seed"}
    assert set(cfg.model_dump(mode="json")) == original
    easier = cfg.model_copy(update={"clutter": False, "object_scale": (0.3, 0.6)})
    assert set(easier.model_dump(mode="json")) == original | {"clutter", "object_scale"}
    assert SyntheticDatasetConfig.model_validate(easier.model_dump(mode="json")) == easier


def _scene_stats(cfg: SyntheticDatasetConfig) -> tuple[np.ndarray, float]:
    """(sqrt(box area) / image side per object, the largest per-image std of the pixels outside boxes)."""
    result = make_synthetic_dataset(cfg)
    data = json.loads(Path(result["train_annotations"]).read_text())
    scales = np.array([np.sqrt(a["area"]) / cfg.image_size for a in data["annotations"]])
    stds = []
    for im in data["images"]:
        pixels = np.asarray(Image.open(Path(result["train_images"]) / im["file_name"]), dtype=np.float32)
        covered = np.zeros(pixels.shape[:2], dtype=bool)
        for a in data["annotations"]:
            if a["image_id"] == im["id"]:
                x, y, w, h = a["bbox"]
                covered[y : y + h, x : x + w] = True
        stds.append(float(pixels[~covered].std(axis=0).max()))
    assert validate_coco_dataset(result["train_annotations"], result["train_images"])[1] == []
    return scales, max(stds)


def test_scene_fields_do_what_they_say(tmp_path: Path):
    base = SyntheticDatasetConfig(output_dir=tmp_path, num_train=20, num_val=1, image_size=64, num_classes=2,
                                  min_objects=1, max_objects=2, seed=1)
    scales, _ = _scene_stats(base)
    assert scales.min() < 0.2 and scales.max() > 0.7  # the size buckets: small to large
    scales, background_std = _scene_stats(base.model_copy(update={"object_scale": (0.3, 0.6)}))
    # Visible boxes: thresholding trims ~1 px per edge and occlusion may shrink them a little.
    assert 0.25 <= scales.min() and scales.max() <= 0.6
    assert background_std > 20  # photographs and clutter
    _, background_std = _scene_stats(base.model_copy(update={"photo_background": False}))
    assert background_std > 20  # clutter on a flat background
    _, background_std = _scene_stats(base.model_copy(update={"photo_background": False, "clutter": False}))
    assert background_std < 5  # flat: only the pixel noise (std 3) outside the objects


@pytest.mark.parametrize("scale", [(0.6, 0.3), (0.01, 0.3), (0.3, 0.95)])
def test_object_scale_must_be_an_ordered_range(tmp_path: Path, scale):
    with pytest.raises(ValidationError, match="object_scale"):
        SyntheticDatasetConfig(output_dir=tmp_path, object_scale=scale)
