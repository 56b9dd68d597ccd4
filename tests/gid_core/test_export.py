"""Student export: contents, integrity, atomic replacement, loading into stock torchvision."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
import torchvision
from safetensors.torch import load_file

from gid_core.config import DistillConfig, ModelConfig
from gid_core.distill import GIDDistiller
from gid_core.export import export_student, load_export
from gid_core.models import build_detector

CATS = [{"id": 7, "name": "seven"}, {"id": 9, "name": "nine"}]


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(arch="retinanet", backbone="resnet18", num_classes=2, fpn_channels=32, norm="gn",
                min_size=64, max_size=64, weights="/somewhere/init.safetensors")
    return ModelConfig(**{**base, **kw})


def test_export_holds_the_student_only_and_reloads_identically(tmp_path):
    torch.manual_seed(0)
    teacher = build_detector(tiny_cfg(fpn_channels=64, weights=None))
    student = build_detector(tiny_cfg(weights=None))
    distiller = GIDDistiller(teacher, student, DistillConfig())
    out = export_student(distiller.student, tiny_cfg(), tmp_path / "export", categories=CATS,
                         training_config={"kind": "distill", "lr": 0.01}, metrics={"AP": 12.5})
    assert sorted(p.name for p in out.iterdir()) == ["metadata.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left

    tensors = load_file(str(out / "model.safetensors"))
    assert tensors.keys() == student.state_dict().keys()  # no teacher., no adapter.
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["format"] == "gid-export/1"
    assert meta["model"]["weights"] is None and meta["model"]["fpn_channels"] == 32
    assert meta["torchvision_class"] == "torchvision.models.detection.RetinaNet"
    assert meta["num_classes_torchvision"] == 3
    assert meta["categories"] == CATS
    assert meta["training_config"] == {"kind": "distill", "lr": 0.01} and meta["metrics"] == {"AP": 12.5}
    assert meta["sha256"] == hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()

    model, loaded_meta = load_export(out)
    assert loaded_meta == meta and not model.training
    assert type(model) is torchvision.models.detection.RetinaNet
    for k, v in student.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    image = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1))]
    student.eval()
    with torch.no_grad():
        a, b = student(image)[0], model(image)[0]
    for key in ("boxes", "scores", "labels"):
        assert torch.equal(a[key], b[key])


def test_reference_config_loads_into_the_stock_torchvision_builder(tmp_path):
    cfg = ModelConfig(arch="retinanet", num_classes=2)  # resnet50, 256 channels, bn, default anchors
    torch.manual_seed(0)
    out = export_student(build_detector(cfg), cfg, tmp_path / "e", categories=CATS, training_config={}, metrics={})
    stock = torchvision.models.detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3)
    missing, unexpected = stock.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
    assert not missing and not unexpected


def test_failed_export_keeps_the_previous_one(tmp_path, monkeypatch):
    student = build_detector(tiny_cfg(weights=None))
    out = export_student(student, tiny_cfg(), tmp_path / "export", categories=CATS, training_config={},
                         metrics={"AP": 1.0})
    before = (out / "model.safetensors").read_bytes()

    import safetensors.torch

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        export_student(student, tiny_cfg(), out, categories=CATS, training_config={}, metrics={"AP": 2.0})
    monkeypatch.undo()
    assert (out / "model.safetensors").read_bytes() == before
    assert json.loads((out / "metadata.json").read_text())["metrics"] == {"AP": 1.0}
    assert [p.name for p in tmp_path.iterdir()] == ["export"]

    # A successful export replaces the old one as a whole.
    with torch.no_grad():
        student.head.classification_head.cls_logits.bias.fill_(0.5)
    export_student(student, tiny_cfg(), out, categories=CATS, training_config={}, metrics={"AP": 3.0})
    assert [p.name for p in tmp_path.iterdir()] == ["export"]
    model, meta = load_export(out)
    assert meta["metrics"] == {"AP": 3.0}
    assert torch.all(model.head.classification_head.cls_logits.bias == 0.5)


def test_load_export_checks_integrity_and_inputs(tmp_path):
    student = build_detector(tiny_cfg(weights=None))
    out = export_student(student, tiny_cfg(), tmp_path / "e", categories=CATS, training_config={}, metrics={})
    with open(out / "model.safetensors", "r+b") as f:  # flip one byte of the weights
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 0xFF]))
    with pytest.raises(ValueError, match="sha256"):
        load_export(out)
    with pytest.raises(ValueError, match="2 categories"):
        export_student(student, tiny_cfg(num_classes=3), tmp_path / "x", categories=CATS,
                       training_config={}, metrics={})
    with pytest.raises(FileNotFoundError, match="not an export folder"):
        load_export(tmp_path / "nothing")
