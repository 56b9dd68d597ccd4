"""COCO dataset validation, loading, resize, flip and batching (gid_core.data)."""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from gid_core.data import (
    ANNOTATIONS_LOC,
    DATASET_LOC,
    IMAGES_LOC,
    MAX_REPORTED_PROBLEMS,
    CocoDetectionDataset,
    DatasetValidationError,
    collate_detection,
    label_order,
    rescale_boxes,
    resized_hw,
    validate_coco_dataset,
)
from gid_core.errors import Problem


def messages(problems: list[Problem]) -> list[str]:
    return [p.message for p in problems]


def _write_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _rgb(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


@pytest.fixture
def valid_dataset(tmp_path: Path) -> tuple[Path, Path, dict]:
    """3 images (one grayscale, one without annotations), non-contiguous category ids, one crowd box."""
    images = tmp_path / "images"
    _write_png(images / "a.png", _rgb(20, 40, 0))  # h=20, w=40
    _write_png(images / "sub" / "b.png", np.full((30, 30), 77, dtype=np.uint8))  # grayscale
    _write_png(images / "c.png", _rgb(16, 16, 1))
    data = {
        "images": [
            {"id": 10, "file_name": "a.png", "width": 40, "height": 20},
            {"id": 20, "file_name": "sub/b.png", "width": 30, "height": 30},
            {"id": 30, "file_name": "c.png", "width": 16, "height": 16},
        ],
        "categories": [{"id": 12, "name": "bird"}, {"id": 3, "name": "dog"}, {"id": 7, "name": "cat"}],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 7, "bbox": [5, 10, 10, 10]},
            {"id": 2, "image_id": 10, "category_id": 12, "bbox": [20, 0, 20, 20]},
            {"id": 3, "image_id": 10, "category_id": 3, "bbox": [0, 0, 4, 4], "iscrowd": 1},
            # 1 px overshoot is tolerated and clipped: xyxy [0, 0, 30, 30]
            {"id": 4, "image_id": 20, "category_id": 3, "bbox": [-1, -0.5, 31, 31]},
        ],
    }
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(data))
    return ann, images, data


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------


def test_valid_dataset_has_no_problems(valid_dataset):
    ann, images, data = valid_dataset
    parsed, problems = validate_coco_dataset(ann, images)
    assert problems == []
    assert parsed == data


def test_validation_reports_every_problem_kind(tmp_path: Path):
    images = tmp_path / "imgs"
    _write_png(images / "ok.png", _rgb(20, 40, 0))
    _write_png(images / "small.png", _rgb(10, 10, 1))
    (images / "garbage.png").write_bytes(b"definitely not an image")
    box = lambda i, image_id, cat, bbox, **kw: {"id": i, "image_id": image_id, "category_id": cat, "bbox": bbox, **kw}  # noqa: E731
    data = {
        "images": [
            {"id": 1, "file_name": "ok.png", "width": 40, "height": 20},
            {"id": 2, "file_name": "missing.png", "width": 10, "height": 10},
            {"id": 3, "file_name": "garbage.png", "width": 10, "height": 10},
            {"id": 4, "file_name": "small.png", "width": 20, "height": 20},
            {"id": 1, "file_name": "ok.png", "width": 40, "height": 20},
            {"id": 6, "file_name": "../ok.png", "width": 40, "height": 20},
        ],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 1, "name": "c"}],
        "annotations": [
            box(1, 1, 1, [0, 0, 10, 10]),
            box(2, 1, 1, [10, 5, 0, 3]),
            box(3, 1, 1, [10, 5, 3, -1]),
            box(4, 1, 1, [35, 0, 10, 10]),
            box(5, 1, 1, [-1, -1, 41, 21]),  # within the 1 px tolerance
            box(6, 99, 1, [0, 0, 5, 5]),
            box(7, 1, 42, [0, 0, 5, 5]),
            box(1, 1, 2, [0, 0, 5, 5]),
            box(9, 1, 2, [0, 0, 5, 5], iscrowd=1),  # crowd boxes are valid
            box(10, 1, 2, [0, 0, 5]),
            box(11, 1, 2, [0, -3.5, 5, 5]),
        ],
    }
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(data))
    parsed, problems = validate_coco_dataset(ann, images)
    assert parsed == data
    assert problems[1].message.startswith("images[2] (id 3): cannot read image 'garbage.png': ")
    assert messages(problems[:1] + problems[2:]) == [
        f"images[1] (id 2): file 'missing.png' not found in {images}",
        "images[3] (id 4): size in JSON is 20x20 (width x height) but 'small.png' is 10x10",
        "images[4] (id 1): duplicate image id 1 (first at images[0])",
        "images[5] (id 6): file_name '../ok.png' must be a relative path inside the images folder",
        "categories[2] (id 1): duplicate category id 1 (first at categories[0])",
        "annotations[1] (id 2): bbox [10, 5, 0, 3] has non-positive width",
        "annotations[2] (id 3): bbox [10, 5, 3, -1] has non-positive height",
        "annotations[3] (id 4): bbox [35, 0, 10, 10] extends past the right edge of image 1 (40x20) by 5 px",
        "annotations[5] (id 6): image_id 99 is not a declared image",
        "annotations[6] (id 7): category_id 42 is not a declared category",
        "annotations[7] (id 1): duplicate annotation id 1 (first at annotations[0])",
        "annotations[9] (id 10): bbox must be 4 finite numbers [x, y, width, height], got [0, 0, 5]",
        "annotations[10] (id 11): bbox [0, -3.5, 5, 5] extends past the top edge of image 1 (40x20) by 3.5 px",
    ]
    # Problems with the image files are located in the images folder, the rest in the JSON.
    assert [p.loc for p in problems] == [IMAGES_LOC] * 3 + [ANNOTATIONS_LOC] * 11
    assert {p.code for p in problems} == {"invalid_dataset"}
    with pytest.raises(DatasetValidationError) as info:
        CocoDetectionDataset(ann, images)
    assert info.value.problems == problems
    assert isinstance(info.value, ValueError)
    text = str(info.value)
    assert text.startswith(f"invalid COCO dataset {ann}: 14 problem(s)")
    assert "  - annotations[1] (id 2): bbox [10, 5, 0, 3] has non-positive width" in text.splitlines()


def test_field_types_and_duplicate_names(tmp_path: Path):
    images = tmp_path / "imgs"
    _write_png(images / "ok.png", _rgb(8, 8, 0))
    data = {
        "images": [{"id": "x", "file_name": "ok.png", "width": 0, "height": 8}, "junk"],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "a"}, {"id": 3}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "iscrowd": 2, "area": -1},
            {"id": 2, "image_id": [1], "category_id": {"a": 1}, "bbox": "0 0 1 1", "iscrowd": True},
            {"id": True, "category_id": 1, "bbox": [0, 0, float("nan"), 1]},
        ],
    }
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(data))
    assert messages(validate_coco_dataset(ann, images)[1]) == [
        "images[0]: 'id' must be an integer, got \"x\"",
        "images[0]: 'width' must be a positive integer, got 0",
        "images[1]: must be an object, got str",
        "categories[1] (id 2): duplicate category name 'a' (first at categories[0])",
        "categories[2] (id 3): 'name' must be a non-empty string, got null",
        "annotations[0] (id 1): image_id 1 is not a declared image",
        "annotations[0] (id 1): 'iscrowd' must be 0 or 1, got 2",
        "annotations[0] (id 1): 'area' must be a non-negative number, got -1",
        "annotations[1] (id 2): 'image_id' must be an integer, got [1]",
        "annotations[1] (id 2): 'category_id' must be an integer, got {\"a\": 1}",
        "annotations[1] (id 2): bbox must be 4 finite numbers [x, y, width, height], got \"0 0 1 1\"",
        "annotations[1] (id 2): 'iscrowd' must be 0 or 1, got true",
        "annotations[2]: 'id' must be an integer, got true",
        "annotations[2]: missing 'image_id'",
        "annotations[2]: bbox must be 4 finite numbers [x, y, width, height], got [0, 0, NaN, 1]",
    ]


def test_invalid_json_missing_file_and_top_level(tmp_path: Path):
    images = tmp_path / "imgs"
    images.mkdir()
    ann = tmp_path / "ann.json"
    ann.write_text('{"images": [}')
    invalid = Problem(ANNOTATIONS_LOC, f"{ann}: invalid JSON: Expecting value (line 1, column 13)", "invalid_dataset")
    assert validate_coco_dataset(ann, images) == ({}, [invalid])
    missing = tmp_path / "nope.json"
    not_found = Problem(ANNOTATIONS_LOC, f"{missing}: annotation file not found", "invalid_dataset")
    assert validate_coco_dataset(missing, images) == ({}, [not_found])
    ann.write_text("[1, 2]")
    assert messages(validate_coco_dataset(ann, images)[1]) == [f"{ann}: top level must be a JSON object, got list"]
    ann.write_text(json.dumps({"images": [], "categories": {}}))
    assert messages(validate_coco_dataset(ann, images)[1]) == [
        "missing top-level key 'annotations'",
        "top-level 'categories' must be a list, got dict",
        "images: empty; a dataset needs at least one image",
    ]
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png", "width": 4, "height": 4}], "categories": [], "annotations": []}))
    assert validate_coco_dataset(ann, tmp_path / "no_such_dir")[1] == [
        Problem(IMAGES_LOC, f"images folder {tmp_path / 'no_such_dir'}: not found or not a directory", "invalid_dataset"),
        Problem(ANNOTATIONS_LOC, "categories: empty; at least one category is required", "invalid_dataset"),
    ]


def test_problem_list_is_capped(tmp_path: Path):
    images = tmp_path / "imgs"
    _write_png(images / "ok.png", _rgb(8, 8, 0))
    data = {
        "images": [{"id": 1, "file_name": "ok.png", "width": 8, "height": 8}],
        "categories": [{"id": 1, "name": "a"}],
        "annotations": [{"id": i, "image_id": 1, "category_id": 1, "bbox": [0, 0, 0, 1]} for i in range(150)],
    }
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(data))
    problems = validate_coco_dataset(ann, images)[1]
    assert len(problems) == MAX_REPORTED_PROBLEMS + 1 == 101
    assert problems[0].message == "annotations[0] (id 0): bbox [0, 0, 0, 1] has non-positive width"
    assert problems[99].message == "annotations[99] (id 99): bbox [0, 0, 0, 1] has non-positive width"
    assert problems[-1] == Problem(DATASET_LOC, "... and 50 more problems", "too_many_problems")


def test_label_order_sorts_categories_by_id():
    categories = [{"id": 12, "name": "bird"}, {"id": 3, "name": "dog"}, {"id": 7, "name": "cat"}]
    assert label_order(categories) == [{"id": 3, "name": "dog"}, {"id": 7, "name": "cat"}, {"id": 12, "name": "bird"}]


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------


def test_loads_with_contiguous_labels(valid_dataset):
    ann, images, _ = valid_dataset
    ds = CocoDetectionDataset(ann, images)
    assert len(ds) == 3
    assert ds.image_ids == [10, 20, 30]
    # sorted by COCO id: dog (3) -> 1, cat (7) -> 2, bird (12) -> 3
    assert ds.categories == [{"id": 3, "name": "dog"}, {"id": 7, "name": "cat"}, {"id": 12, "name": "bird"}]
    assert ds.num_classes == 3
    assert ds.category_id_to_label == {3: 1, 7: 2, 12: 3}
    assert [ds.label_to_category_id(label) for label in (1, 2, 3)] == [3, 7, 12]
    assert ds.label_to_category_id(torch.tensor([3, 1, 2])).tolist() == [12, 3, 7]
    with pytest.raises(IndexError):
        ds.label_to_category_id(4)

    image, target = ds[0]
    assert image.dtype == torch.float32 and image.shape == (3, 20, 40)
    expected = torch.from_numpy(_rgb(20, 40, 0)).permute(2, 0, 1).float() / 255.0
    assert torch.equal(image, expected)
    # crowd annotation left out of training targets
    assert target["boxes"].dtype == torch.float32
    assert target["boxes"].tolist() == [[5, 10, 15, 20], [20, 0, 40, 20]]
    assert target["labels"].dtype == torch.int64 and target["labels"].tolist() == [2, 3]
    assert target["image_id"] == 10 and target["orig_size"] == (20, 40)

    gray, target = ds[1]
    assert gray.shape == (3, 30, 30) and torch.allclose(gray, torch.full_like(gray, 77 / 255))
    assert target["boxes"].tolist() == [[0, 0, 30, 30]]  # clipped from the tolerated overshoot

    _, empty = ds[2]  # negatives are kept
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)
    assert ds.image_hw(0) == (20, 40)


def test_coco_ground_truth_keeps_crowd_and_fills_defaults(valid_dataset):
    ann, images, _ = valid_dataset
    ds = CocoDetectionDataset(ann, images)
    coco = ds.coco
    assert coco is ds.coco  # built once
    assert sorted(coco.getImgIds()) == [10, 20, 30]
    crowd = coco.anns[3]
    assert crowd["iscrowd"] == 1
    assert coco.anns[1]["area"] == 100.0 and coco.anns[1]["iscrowd"] == 0
    # the dataset's own dict is not modified
    assert "area" not in json.loads(ann.read_text())["annotations"][0]


def test_flip_is_deterministic_per_aug_seed(valid_dataset):
    ann, images, _ = valid_dataset
    ds = CocoDetectionDataset(ann, images, train=True, flip_prob=0.5)
    seeds = range(40)
    flips = [random.Random(s).random() < 0.5 for s in seeds]
    assert any(flips) and not all(flips)
    plain, _ = CocoDetectionDataset(ann, images)[0]
    for seed, flip in zip(seeds, flips):
        image, target = ds[(0, seed)]
        again, target_again = ds[(0, seed)]
        assert torch.equal(image, again) and torch.equal(target["boxes"], target_again["boxes"])
        if flip:
            # width 40: [5, 10, 15, 20] -> [25, 10, 35, 20]; [20, 0, 40, 20] -> [0, 0, 20, 20]
            assert target["boxes"].tolist() == [[25, 10, 35, 20], [0, 0, 20, 20]]
            assert torch.equal(image, plain.flip(-1))
        else:
            assert target["boxes"].tolist() == [[5, 10, 15, 20], [20, 0, 40, 20]]
            assert torch.equal(image, plain)
        assert target["labels"].tolist() == [2, 3]


def test_flip_only_in_training_and_follows_flip_prob(valid_dataset):
    ann, images, _ = valid_dataset
    never = CocoDetectionDataset(ann, images, train=False, flip_prob=1.0)
    always = CocoDetectionDataset(ann, images, train=True, flip_prob=1.0)
    off = CocoDetectionDataset(ann, images, train=True, flip_prob=0.0)
    for key in (0, (0, 1), (0, 2)):
        assert never[key][1]["boxes"].tolist() == [[5, 10, 15, 20], [20, 0, 40, 20]]
        assert off[key][1]["boxes"].tolist() == [[5, 10, 15, 20], [20, 0, 40, 20]]
        assert always[key][1]["boxes"].tolist() == [[25, 10, 35, 20], [0, 0, 20, 20]]
    # plain int keys draw from the global random module
    half = CocoDetectionDataset(ann, images, train=True, flip_prob=0.5)
    random.seed(0)
    draws = [half[0][1]["boxes"][0, 0].item() == 25 for _ in range(40)]
    random.seed(0)
    assert draws == [random.random() < 0.5 for _ in range(40)]


def test_resize_scales_image_and_boxes(valid_dataset):
    ann, images, _ = valid_dataset
    # 20x40 image: scale = min(30 / 20, 50 / 40) = 1.25 -> 25x50
    ds = CocoDetectionDataset(ann, images, min_size=30, max_size=50)
    image, target = ds[0]
    assert image.shape == (3, 25, 50)
    assert target["boxes"].tolist() == [[6.25, 12.5, 18.75, 25.0], [25.0, 0.0, 50.0, 25.0]]
    assert target["orig_size"] == (20, 40)
    # min_size binds: scale = min(30 / 20, 100 / 40) = 1.5 -> 30x60, then flip in the resized frame
    ds = CocoDetectionDataset(ann, images, min_size=30, max_size=100, train=True, flip_prob=1.0)
    image, target = ds[(0, 0)]
    assert image.shape == (3, 30, 60)
    # unflipped [7.5, 15, 22.5, 30], [30, 0, 60, 30]
    assert target["boxes"].tolist() == [[37.5, 15.0, 52.5, 30.0], [0.0, 0.0, 30.0, 30.0]]


@pytest.mark.parametrize(
    "hw,min_size,max_size",
    [((20, 40), 30, 50), ((20, 40), 30, 100), ((37, 53), 64, 96), ((480, 640), 128, 1333), ((333, 100), 50, 120), ((99, 101), 100, 100)],
)
def test_resize_makes_the_detector_transform_a_no_op(hw, min_size, max_size):
    h, w = resized_hw(*hw, min_size, max_size)
    scale = min(min_size / min(hw), max_size / max(hw))
    assert abs(h - hw[0] * scale) <= 0.5 and abs(w - hw[1] * scale) <= 0.5
    transform = GeneralizedRCNNTransform(min_size, max_size, [0.0] * 3, [1.0] * 3).eval()
    image = torch.rand(3, h, w, generator=torch.Generator().manual_seed(0))
    batch, _ = transform([image])
    assert batch.image_sizes == [(h, w)]
    assert torch.allclose(batch.tensors[0, :, :h, :w], image, atol=1e-6)


def test_resized_hw_edge_cases():
    assert resized_hw(20, 40, None, None) == (20, 40)
    assert resized_hw(20, 40, 10, None) == (10, 20)
    assert resized_hw(20, 40, None, 80) == (20, 40)  # max_size alone only caps
    assert resized_hw(20, 40, None, 20) == (10, 20)


def test_rescale_boxes():
    boxes = torch.tensor([[10.0, 20.0, 30.0, 40.0]])
    assert rescale_boxes(boxes, (50, 100), (100, 50)).tolist() == [[5.0, 40.0, 15.0, 80.0]]
    assert rescale_boxes(torch.zeros(0, 4), (1, 1), (2, 2)).shape == (0, 4)


def test_collate_and_dataloader(valid_dataset):
    ann, images, _ = valid_dataset
    ds = CocoDetectionDataset(ann, images)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate_detection)
    batches = list(loader)
    assert len(batches) == 2
    imgs, targets = batches[0]
    assert isinstance(imgs, list) and isinstance(targets, list)
    assert [im.shape for im in imgs] == [(3, 20, 40), (3, 30, 30)]
    assert [t["image_id"] for t in targets] == [10, 20]


def test_pickled_copy_serves_items_without_the_json(valid_dataset):
    ann, images, _ = valid_dataset
    ds = CocoDetectionDataset(ann, images, min_size=30, max_size=50)
    copy = pickle.loads(pickle.dumps(ds))
    a, ta = ds[0]
    b, tb = copy[0]
    assert torch.equal(a, b) and torch.equal(ta["boxes"], tb["boxes"])
    with pytest.raises(RuntimeError, match="pickled copy"):
        copy.coco


def test_validate_false_skips_checks(tmp_path: Path):
    images = tmp_path / "imgs"
    _write_png(images / "a.png", _rgb(8, 8, 0))
    data = {
        "images": [{"id": 1, "file_name": "a.png", "width": 8, "height": 8}],
        "categories": [{"id": 1, "name": "a"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 4, 4]}, {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2]}],
    }
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(data))
    with pytest.raises(DatasetValidationError):
        CocoDetectionDataset(ann, images)
    ds = CocoDetectionDataset(ann, images, validate=False)
    assert ds[0][1]["boxes"].tolist() == [[2, 2, 6, 6], [0, 0, 2, 2]]


def test_decode_error_names_the_file(valid_dataset):
    ann, images, _ = valid_dataset
    ds = CocoDetectionDataset(ann, images)
    (images / "c.png").write_bytes(b"broken after validation")
    with pytest.raises(OSError, match=r"c\.png \(image id 30\)"):
        ds[2]
