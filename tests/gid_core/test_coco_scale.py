"""COCO-2017-shaped datasets at a small scale: validation, compact storage, crowd regions, gapped
category ids and images without boxes. The full 118 k-image run is ``make bench-coco-scale``."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from gid_core.data import CocoDetectionDataset, validate_coco_dataset
from gid_core.evaluation import coco_bbox_metrics
from gid_core.synthetic import COCO_MISSING_IDS, coco_category_ids, make_coco_scale_dataset
from service.datasets import validate_dataset

NUM_IMAGES, NUM_BOXES, NUM_EMPTY, NUM_CROWD = 600, 4_400, 20, 60


@pytest.fixture(scope="module")
def coco_like(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("coco_scale")
    info = make_coco_scale_dataset(out, num_images=NUM_IMAGES, num_annotations=NUM_BOXES, num_empty=NUM_EMPTY,
                                   num_crowd=NUM_CROWD, seed=3)
    info["data"] = json.loads(Path(info["annotations"]).read_text())
    info["dataset"] = CocoDetectionDataset(info["annotations"], info["images"], train=False)
    return info


def test_generated_file_is_coco_shaped(coco_like):
    data = coco_like["data"]
    assert len(data["images"]) == NUM_IMAGES and len(data["annotations"]) == NUM_BOXES
    assert [c["id"] for c in data["categories"]] == coco_category_ids()
    assert len(coco_category_ids()) == 80 and not set(COCO_MISSING_IDS) & set(coco_category_ids())
    with_boxes = {a["image_id"] for a in data["annotations"]}
    assert NUM_IMAGES - len(with_boxes) == NUM_EMPTY
    assert sum(a["iscrowd"] for a in data["annotations"]) == NUM_CROWD
    assert all(a["segmentation"] for a in data["annotations"])  # masks present, as in COCO
    ids = [img["id"] for img in data["images"]]
    assert ids != sorted(ids)  # shuffled, sparse ids


def test_registration_validates_and_counts(coco_like):
    parsed, problems = validate_coco_dataset(coco_like["annotations"], coco_like["images"])
    assert problems == []
    assert all("segmentation" not in a for a in parsed["annotations"])  # never held in memory
    summary = validate_dataset(Path(coco_like["annotations"]), Path(coco_like["images"]))
    assert (summary.num_images, summary.num_annotations) == (NUM_IMAGES, NUM_BOXES)
    assert summary.categories == [f"category_{c}" for c in coco_category_ids()]


def _expected_targets(data: dict, ds: CocoDetectionDataset) -> dict[int, list]:
    """Non-crowd boxes (xyxy) and labels per image id, in file order: an independent computation."""
    per_image: dict[int, list] = {img["id"]: [] for img in data["images"]}
    for a in data["annotations"]:
        if not a["iscrowd"]:
            x, y, w, h = a["bbox"]
            per_image[a["image_id"]].append(([x, y, x + w, y + h], ds.category_id_to_label[a["category_id"]]))
    return per_image


def test_training_targets_skip_crowd_and_keep_empty_images(coco_like):
    ds, data = coco_like["dataset"], coco_like["data"]
    expected = _expected_targets(data, ds)
    crowd_images = {a["image_id"] for a in data["annotations"] if a["iscrowd"]}
    empty = [i for i, image_id in enumerate(ds.image_ids) if not expected[image_id] and image_id not in crowd_images]
    picks = [ds.image_ids.index(i) for i in sorted(crowd_images)[:4]] + empty[:2]
    for index in picks:
        image, target = ds[index]
        want = expected[target["image_id"]]
        assert image.shape[-2:] == ds.image_hw(index)
        want_boxes = np.array([box for box, _ in want], dtype=np.float32).reshape(-1, 4)
        assert target["boxes"].shape == want_boxes.shape and np.allclose(target["boxes"].numpy(), want_boxes)
        assert target["labels"].tolist() == [label for _, label in want]
    assert len(ds) == NUM_IMAGES
    assert sum(len(v) for v in expected.values()) == NUM_BOXES - NUM_CROWD


def test_gapped_category_ids_map_to_contiguous_labels(coco_like):
    ds = coco_like["dataset"]
    assert ds.num_classes == 80
    assert [ds.label_to_category_id(label) for label in range(1, 81)] == coco_category_ids()
    assert ds.category_id_to_label[13] == 12 and ds.category_id_to_label[90] == 80  # 12 is one of the gaps


def test_dataset_holds_compact_arrays_not_per_image_objects(coco_like):
    ds = coco_like["dataset"]

    def containers(obj, depth=0):
        for value in vars(obj).values():
            if isinstance(value, (list, dict, tuple, set)):
                yield value
            elif hasattr(value, "__dataclass_fields__") and depth < 1:
                yield from containers(value, depth + 1)

    # Nothing that grows with the image or box count is a Python container (only the categories).
    assert all(len(c) <= 81 for c in containers(ds))
    records = ds._records
    for field in records.__dataclass_fields__:
        assert isinstance(getattr(records, field), np.ndarray) and getattr(records, field).dtype != object
    # What a spawned loader worker receives: about 230 bytes an image here (7 boxes an image).
    per_image = len(pickle.dumps(ds)) / len(ds)
    assert per_image < 400, per_image


def test_ground_truth_for_cocoeval_keeps_crowd_regions(coco_like):
    ds, data = coco_like["dataset"], coco_like["data"]
    coco = ds.coco
    assert sum(a["iscrowd"] for a in coco.anns.values()) == NUM_CROWD
    # An image with a crowd region: finding every other box is a perfect score (the crowd region
    # need not be found), and a detection on the crowd region is ignored, not a false positive.
    crowd_image = {(a["image_id"], a["category_id"]) for a in data["annotations"] if a["iscrowd"]}
    image_id, category = next((a["image_id"], a["category_id"]) for a in data["annotations"]
                              if not a["iscrowd"] and (a["image_id"], a["category_id"]) in crowd_image)
    anns = [a for a in data["annotations"] if a["image_id"] == image_id and a["category_id"] == category]
    hits = [{"image_id": image_id, "category_id": category, "bbox": a["bbox"], "score": 0.5}
            for a in anns if not a["iscrowd"]]
    on_crowd = [{"image_id": image_id, "category_id": category, "bbox": a["bbox"], "score": 0.9}
                for a in anns if a["iscrowd"]]
    name = ds.categories[ds.category_id_to_label[category] - 1]["name"]
    assert hits and on_crowd
    for detections in (hits, hits + on_crowd):
        assert coco_bbox_metrics(coco, detections, [image_id])["per_category"][name] == pytest.approx(100.0)
