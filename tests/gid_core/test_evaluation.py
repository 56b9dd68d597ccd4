"""COCO evaluation of detectors (gid_core.evaluation)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from torch import nn

from gid_core.data import CocoDetectionDataset, collate_detection
from gid_core.evaluation import METRIC_KEYS, coco_bbox_metrics, evaluate_coco, summarize_metrics


def _make_dataset(root: Path) -> tuple[Path, Path]:
    """3 images of 128 px: small + medium + crowd, large, and a negative; 3 categories, one unused."""
    images = root / "images"
    images.mkdir(parents=True)
    for i in range(3):
        pixels = np.random.default_rng(i).integers(0, 256, size=(128, 128, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{i}.png")
    data = {
        "images": [{"id": 100 + i, "file_name": f"{i}.png", "width": 128, "height": 128} for i in range(3)],
        "categories": [{"id": 9, "name": "b"}, {"id": 5, "name": "a"}, {"id": 11, "name": "unused"}],
        "annotations": [
            {"id": 1, "image_id": 100, "category_id": 5, "bbox": [10, 10, 20, 20]},  # small
            {"id": 2, "image_id": 100, "category_id": 9, "bbox": [40, 40, 40, 40]},  # medium
            {"id": 3, "image_id": 100, "category_id": 9, "bbox": [90, 90, 30, 30], "iscrowd": 1},
            {"id": 4, "image_id": 101, "category_id": 5, "bbox": [10, 10, 110, 100]},  # large
        ],
    }
    ann = root / "ann.json"
    ann.write_text(json.dumps(data))
    return ann, images


def _key(image: torch.Tensor) -> str:
    return hashlib.sha1(image.cpu().numpy().tobytes()).hexdigest()


class GroundTruthEcho(nn.Module):
    """Test double for a detector: recognises each dataset image and returns its ground truth
    (in the coordinates of the image it is given), optionally shifted / filtered."""

    def __init__(self, dataset, *, shift: float = 0.0, keep_labels=None, background_boxes: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))  # so .to()/train()/eval() behave like a model
        self.targets = {}
        for i in range(len(dataset)):
            image, target = dataset[i]
            self.targets[_key(image)] = target
        self.shift, self.keep_labels, self.background_boxes = shift, keep_labels, background_boxes
        self.modes_seen: list[bool] = []

    def forward(self, images):
        self.modes_seen.append(self.training)
        outputs = []
        for image in images:
            target = self.targets[_key(image)]
            boxes, labels = target["boxes"].clone(), target["labels"].clone()
            if self.keep_labels is not None:
                keep = torch.isin(labels, torch.tensor(self.keep_labels))
                boxes, labels = boxes[keep], labels[keep]
            boxes[:, [0, 2]] += self.shift
            scores = torch.linspace(0.9, 0.5, len(labels))
            if self.background_boxes:  # label 0 has no category and must be ignored
                boxes = torch.cat([boxes, torch.tensor([[0.0, 0.0, 5.0, 5.0]])])
                labels = torch.cat([labels, torch.tensor([0])])
                scores = torch.cat([scores, torch.tensor([1.0])])
            outputs.append({"boxes": boxes.to(image.device), "labels": labels.to(image.device), "scores": scores.to(image.device)})
        return outputs


def _loader(ds, batch_size=2, sampler=None):
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=collate_detection, sampler=sampler)


@pytest.fixture
def dataset_files(tmp_path: Path):
    return _make_dataset(tmp_path)


@pytest.mark.parametrize("resize", [False, True])
def test_perfect_predictions_score_100(dataset_files, resize):
    ann, images = dataset_files
    # resize 128 -> 64: predictions come back in model-input coordinates and must be mapped back
    ds = CocoDetectionDataset(ann, images, min_size=64 if resize else None, max_size=64 if resize else None)
    model = GroundTruthEcho(ds, background_boxes=True)
    m = evaluate_coco(model, _loader(ds), ds, "cpu")
    for key in METRIC_KEYS:
        assert m[key] == pytest.approx(100.0), key
    assert m["per_category"] == {"b": pytest.approx(100.0), "a": pytest.approx(100.0), "unused": None}
    assert m["num_images"] == 3 and m["num_detections"] == 3
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 1.000" in m["summary"]


def test_shifted_prediction_matches_hand_computed_ap(tmp_path: Path):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(images / "a.png")
    ann = tmp_path / "ann.json"
    ann.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 64}],
                "categories": [{"id": 1, "name": "x"}],
                "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20]}],
            }
        )
    )
    ds = CocoDetectionDataset(ann, images)
    # shift by 4 px: IoU = 16*20 / (400 + 400 - 320) = 2/3 -> a match at IoU 0.50..0.65 (4 of 10)
    m = evaluate_coco(GroundTruthEcho(ds, shift=4.0), _loader(ds), ds, "cpu")
    assert m["AP"] == pytest.approx(40.0)
    assert m["AP50"] == pytest.approx(100.0)
    assert m["AP75"] == pytest.approx(0.0)
    assert m["APs"] == pytest.approx(40.0)
    assert m["APm"] is None and m["APl"] is None
    assert m["per_category"] == {"x": pytest.approx(40.0)}


def test_shifted_predictions_score_lower(dataset_files):
    ann, images = dataset_files
    ds = CocoDetectionDataset(ann, images)
    m = evaluate_coco(GroundTruthEcho(ds, shift=6.0), _loader(ds), ds, "cpu")
    assert 0.0 < m["AP"] < 100.0
    assert m["AP50"] >= m["AP"] >= m["AP75"]
    assert m["APl"] > m["APm"] > m["APs"]  # a fixed shift hurts small boxes most


def test_no_detections_score_zero(dataset_files):
    ann, images = dataset_files
    ds = CocoDetectionDataset(ann, images)
    m = evaluate_coco(GroundTruthEcho(ds, keep_labels=[]), _loader(ds), ds, "cpu")
    for key in METRIC_KEYS:
        assert m[key] == 0.0, key
    assert m["per_category"] == {"b": 0.0, "a": 0.0, "unused": None}
    assert m["num_detections"] == 0


def test_per_category_ap(dataset_files):
    ann, images = dataset_files
    ds = CocoDetectionDataset(ann, images)
    # labels follow sorted COCO ids: label 1 is id 5 ("a"), label 2 is id 9 ("b", never predicted)
    m = evaluate_coco(GroundTruthEcho(ds, keep_labels=[1]), _loader(ds), ds, "cpu")
    assert m["per_category"] == {"b": 0.0, "a": pytest.approx(100.0), "unused": None}
    assert m["AP"] == pytest.approx(50.0)


def test_partial_pass_scores_only_the_images_it_saw(dataset_files):
    ann, images = dataset_files
    ds = CocoDetectionDataset(ann, images)
    subset = torch.utils.data.Subset(ds, [1])
    m = evaluate_coco(GroundTruthEcho(ds), _loader(subset), ds, "cpu")
    assert m["num_images"] == 1
    assert m["AP"] == pytest.approx(100.0) and m["APs"] is None and m["APl"] == pytest.approx(100.0)
    assert m["per_category"] == {"b": None, "a": pytest.approx(100.0), "unused": None}


@pytest.mark.parametrize("training", [True, False])
def test_restores_mode_and_runs_in_eval(dataset_files, training):
    ann, images = dataset_files
    ds = CocoDetectionDataset(ann, images)
    model = GroundTruthEcho(ds)
    model.train(training)
    evaluate_coco(model, _loader(ds), ds, "cpu")
    assert model.modes_seen == [False, False]
    assert model.training is training


def test_mode_restored_when_the_model_fails(dataset_files):
    ann, images = dataset_files
    ds = CocoDetectionDataset(ann, images)

    class Broken(nn.Module):
        def forward(self, images):
            raise RuntimeError("boom")

    model = Broken().train()
    with pytest.raises(RuntimeError, match="boom"):
        evaluate_coco(model, _loader(ds), ds, "cpu")
    assert model.training


def test_metrics_and_summary_match_pycocotools(dataset_files):
    """Our AP formulas against pycocotools' own summarize() on noisy detections (maxDets 100)."""
    from pycocotools.cocoeval import COCOeval

    ann, images = dataset_files
    ds = CocoDetectionDataset(ann, images)
    rng = np.random.default_rng(0)
    detections = []
    for a in ds.coco.dataset["annotations"]:
        for _ in range(3):
            x, y, w, h = (np.asarray(a["bbox"], dtype=float) + rng.normal(0, 3, 4)).tolist()
            detections.append({"image_id": a["image_id"], "category_id": a["category_id"], "bbox": [x, y, abs(w), abs(h)], "score": float(rng.random())})
    for image_id in ds.image_ids:  # false positives
        detections.append({"image_id": image_id, "category_id": 9, "bbox": [60.0, 5.0, 30.0, 30.0], "score": 0.7})
    m = coco_bbox_metrics(ds.coco, detections, ds.image_ids)

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        E = COCOeval(ds.coco, ds.coco.loadRes([dict(d) for d in detections]), "bbox")
        E.evaluate()
        E.accumulate()
        E.summarize()
    expected = [None if v == -1 else 100 * v for v in E.stats[:6]]
    assert [m[k] for k in METRIC_KEYS] == pytest.approx(expected)
    assert 0 < m["AP"] < 100
    printed = [line for line in out.getvalue().splitlines() if line.startswith(" Average")]
    assert m["summary"].splitlines() == printed


def test_summarize_metrics():
    m = {"AP": 41.234, "AP50": 63.0, "AP75": 44.06, "APs": 0.0, "APm": 45.0, "APl": None}
    assert summarize_metrics(m) == "AP 41.2 | AP50 63.0 | AP75 44.1 | APs 0.0 | APm 45.0 | APl n/a"
    assert summarize_metrics({}) == "no metrics"


def test_max_dets_validated(dataset_files):
    ann, images = dataset_files
    ds = CocoDetectionDataset(ann, images)
    with pytest.raises(ValueError, match="max_dets"):
        evaluate_coco(GroundTruthEcho(ds), _loader(ds), ds, "cpu", max_dets=0)


def test_max_dets_keeps_top_scores(dataset_files):
    ann, images = dataset_files
    ds = CocoDetectionDataset(ann, images)
    # image 100 has 2 GT boxes; with max_dets=1 only the higher-scored one (label "a") survives
    m = evaluate_coco(GroundTruthEcho(ds), _loader(ds), ds, "cpu", max_dets=1)
    assert m["num_detections"] == 2
    assert m["per_category"]["a"] == pytest.approx(100.0) and m["per_category"]["b"] == 0.0
    assert "maxDets=  1 ] = " in m["summary"]


def _ddp_worker(rank: int, world_size: int, init_file: str, ann: str, images: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        ds = CocoDetectionDataset(ann, images)
        # 3 images on 2 ranks: the sampler pads rank 1 with a repeat of image 0
        sampler = torch.utils.data.distributed.DistributedSampler(ds, shuffle=False)
        m = evaluate_coco(GroundTruthEcho(ds), _loader(ds, batch_size=1, sampler=sampler), ds, "cpu")
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(m))
    finally:
        dist.destroy_process_group()


def test_ddp_results_are_gathered_on_rank_0(dataset_files, tmp_path: Path):
    ann, images = dataset_files
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(ann), str(images), str(tmp_path)), nprocs=2)
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert rank1 == {}
    assert rank0["num_images"] == 3
    assert rank0["num_detections"] == 3  # the padded repeat is not counted twice
    assert rank0["AP"] == pytest.approx(100.0)


def test_real_untrained_detector_runs_end_to_end(dataset_files):
    """A real torchvision FCOS (random weights): real output tensors go through without error."""
    from torchvision.models import resnet18
    from torchvision.models.detection import FCOS
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    ann, images = dataset_files
    ds = CocoDetectionDataset(ann, images, min_size=96, max_size=96)
    torch.manual_seed(0)
    backbone = BackboneWithFPN(
        resnet18(weights=None),
        return_layers={"layer2": "0", "layer3": "1", "layer4": "2"},
        in_channels_list=[128, 256, 512],
        # 64, not 32: FCOS's head uses GroupNorm(32) and P7 is 1x1 at 96 px (1 value per group)
        out_channels=64,
        extra_blocks=LastLevelP6P7(64, 64),
    )
    model = FCOS(backbone, num_classes=ds.num_classes + 1, min_size=96, max_size=96, score_thresh=0.0)
    m = evaluate_coco(model, _loader(ds), ds, "cpu", max_dets=20)
    assert model.training
    assert m["num_images"] == 3 and 0 < m["num_detections"] <= 60
    for key in METRIC_KEYS:
        assert m[key] is not None and 0.0 <= m[key] <= 100.0
    assert set(m["per_category"]) == {"a", "b", "unused"}
