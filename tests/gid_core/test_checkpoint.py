"""Atomic checkpoints, RNG state, the resumable sampler and exact resume of real jobs."""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gid_core.checkpoint import Checkpointer, capture_rng_state, restore_rng_state
from gid_core.config import DataConfig, Hyperparameters, JobConfig, ModelConfig, SyntheticDatasetConfig
from gid_core.engine import run_job
from gid_core.sampler import ResumableLoader, ResumableSampler, augmentation_seed
from gid_core.trainer import HookBase

# --------------------------------------------------------------------------- Checkpointer


def test_failed_save_leaves_previous_checkpoint_and_pointer(tmp_path, monkeypatch):
    ck = Checkpointer(tmp_path / "ck", keep=2)
    ck.save("ckpt_0000001", {"w": torch.ones(3), "iteration": 1})
    real_save = torch.save

    def crash_midway(obj, f, *args, **kwargs):
        f.write(b"\x80\x02half a checkpoint")  # bytes reach the temp file, then the "crash"
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        ck.save("ckpt_0000002", {"w": torch.zeros(3), "iteration": 2})
    monkeypatch.setattr(torch, "save", real_save)

    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["ckpt_0000001.pt", "last"]
    assert (tmp_path / "ck" / "last").read_text() == "ckpt_0000001.pt"
    state = ck.load_latest()
    assert state["iteration"] == 1 and torch.equal(state["w"], torch.ones(3))


def test_failed_pointer_update_keeps_old_pointer(tmp_path, monkeypatch):
    import os

    ck = Checkpointer(tmp_path, keep=3)
    ck.save("ckpt_0000001", {"iteration": 1})
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(Path(dst).name)
        if Path(dst).name == "last":
            raise OSError("power cut")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="power cut"):
        ck.save("ckpt_0000002", {"iteration": 2})
    monkeypatch.setattr(os, "replace", real_replace)
    assert calls == ["ckpt_0000002.pt", "last"]  # the checkpoint is complete before the pointer moves
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert ck.load_latest()["iteration"] == 1


def test_keep_prunes_oldest_and_pointer_follows(tmp_path):
    ck = Checkpointer(tmp_path, keep=2)
    for i in range(1, 5):
        ck.save(f"ckpt_{i:07d}", {"iteration": i})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_0000003.pt", "ckpt_0000004.pt", "last"]
    assert ck.load_latest()["iteration"] == 4
    (tmp_path / "last").unlink()  # a crash between rename and pointer: the newest file is complete
    assert ck.load_latest()["iteration"] == 4
    assert Checkpointer(tmp_path / "missing").load_latest() is None
    with pytest.raises(ValueError, match="invalid checkpoint name"):
        ck.save("../escape", {})


class Payload:
    """Not a tensor or primitive: a weights_only load must refuse to rebuild it."""

    def __init__(self) -> None:
        self.value = 3


def test_load_latest_refuses_pickled_objects(tmp_path):
    ck = Checkpointer(tmp_path)
    ck.save("ckpt_0000001", {"iteration": 1, "payload": Payload()})
    with pytest.raises(pickle.UnpicklingError, match="weights_only"):
        ck.load_latest()


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.normal(), torch.rand(2)  # numpy caches a gaussian: state it too
    Checkpointer(tmp_path).save("ckpt_0000001", {"rng": capture_rng_state()})

    def draw():
        return random.random(), np.random.normal(), float(np.random.rand()), torch.rand(3).tolist()

    expected = draw()
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    restore_rng_state(Checkpointer(tmp_path).load_latest()["rng"])
    assert draw() == expected


# --------------------------------------------------------------------------- sampler


def test_ranks_split_each_global_batch_like_one_process():
    single = ResumableSampler(10, num_replicas=1, rank=0, seed=5, batch_size=4)
    ranks = [ResumableSampler(10, num_replicas=2, rank=r, seed=5, batch_size=4) for r in range(2)]
    assert single.steps_per_epoch == 2 and len(single) == 2  # 10 // 4, incomplete batch dropped
    for epoch in range(3):
        one = single.epoch_batches(epoch)
        per_rank = [s.epoch_batches(epoch) for s in ranks]
        for step in range(2):
            assert all(len(b[step]) == 2 for b in per_rank)
            assert sorted(per_rank[0][step] + per_rank[1][step]) == sorted(one[step])
            assert per_rank[0][step] == one[step][0::2] and per_rank[1][step] == one[step][1::2]
    orders = [single.epoch_order(e) for e in range(3)]
    assert orders[0] != orders[1] and orders[0] == ResumableSampler(10, seed=5, batch_size=4).epoch_order(0)
    assert sorted(torch.randperm(10, generator=torch.Generator().manual_seed(6)).tolist()[:8]) == sorted(orders[1])


def test_aug_seed_depends_on_seed_epoch_and_index_only():
    a = ResumableSampler(8, num_replicas=2, rank=1, seed=3, batch_size=2).epoch_batches(1)
    for batch in a:
        for index, aug in batch:
            assert aug == augmentation_seed(3, 1, index)
            assert 0 <= aug < 2**31
    seeds = {augmentation_seed(3, e, i) for e in range(4) for i in range(50)}
    assert len(seeds) == 200  # no collisions on a small grid
    assert augmentation_seed(3, 0, 1) != augmentation_seed(4, 0, 1)


def test_set_position_and_padding():
    s = ResumableSampler(9, seed=1, batch_size=3, shuffle=False)
    s.set_position(2, 1)
    assert list(s) == s.epoch_batches(2)[1:] and len(s) == 2
    assert [i for i, _ in s.epoch_batches(0)[0]] == [0, 1, 2]
    tiny = ResumableSampler(3, num_replicas=2, rank=0, seed=0, batch_size=4, shuffle=False)
    assert tiny.steps_per_epoch == 1
    assert [i for i, _ in tiny.epoch_batches(0)[0]] == [0, 2]  # order 0,1,2 cycled to 0,1,2,0
    with pytest.raises(ValueError, match="multiple of num_replicas"):
        ResumableSampler(10, num_replicas=3, rank=0, batch_size=4)


class KeyDataset(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 7

    def __getitem__(self, key):
        index, aug = key
        return torch.tensor([index, aug])


@pytest.mark.parametrize("num_workers", [0, 1])
def test_resumable_loader_continues_exactly(num_workers):
    def make():
        sampler = ResumableSampler(7, seed=11, batch_size=2)
        loader = torch.utils.data.DataLoader(KeyDataset(), batch_sampler=sampler, num_workers=num_workers)
        return ResumableLoader(loader, sampler)

    straight = make()
    expected = [next(straight).tolist() for _ in range(8)]  # 3 steps per epoch: crosses 2 epochs
    assert straight.state_dict() == {"epoch": 2, "offset": 2}

    first = make()
    got = [next(first).tolist() for _ in range(4)]
    state = first.state_dict()
    assert state == {"epoch": 1, "offset": 1}
    resumed = make()
    resumed.load_state_dict(state)
    got += [next(resumed).tolist() for _ in range(4)]
    assert got == expected


# --------------------------------------------------------------------------- exact resume of jobs


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from gid_core.models import build_detector, save_state_dict_file
    from gid_core.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("data")
    info = make_synthetic_dataset(
        SyntheticDatasetConfig(output_dir=root, num_train=4, num_val=2, image_size=64, num_classes=3, max_objects=3)
    )
    torch.manual_seed(0)
    teacher_cfg = teacher_config(None)
    save_state_dict_file(build_detector(teacher_cfg).state_dict(), root / "teacher.safetensors")
    info["teacher"] = str(root / "teacher.safetensors")
    return info


def student_config() -> ModelConfig:
    return ModelConfig(arch="retinanet", backbone="resnet18", num_classes=3, fpn_channels=32, norm="gn",
                       min_size=64, max_size=64)


def teacher_config(weights) -> ModelConfig:
    return ModelConfig(arch="retinanet", backbone="resnet18", num_classes=3, fpn_channels=64, norm="gn",
                       min_size=64, max_size=64, weights=weights)


def make_job(kind: str, info: dict, **hp) -> JobConfig:
    defaults = dict(max_iters=4, batch_size=2, lr=0.01, warmup_iters=2, num_workers=0, flip_prob=0.5,
                    log_period=1, checkpoint_period=100, schedule="step", steps=[0.5])
    return JobConfig(
        kind=kind,
        student=student_config(),
        teacher=teacher_config(info["teacher"]) if kind == "distill" else None,
        data=DataConfig(train_annotations=info["train_annotations"], train_images=info["train_images"]),
        hyperparameters=Hyperparameters(**{**defaults, **hp}),
    )


class StopAt(HookBase):
    def __init__(self, iteration: int) -> None:
        self.iteration = iteration

    def after_step(self) -> None:
        if self.trainer.iter == self.iteration:
            self.trainer.request_stop()


def read_log(out: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return {r["iteration"]: r for r in rows}


@pytest.mark.parametrize("kind", ["train", "distill"])
def test_resume_equals_uninterrupted_run(kind, tiny_data, tmp_path):
    job = make_job(kind, tiny_data)  # 2 steps per epoch: the stop at 3 is mid-epoch 1
    straight = run_job(job, output_dir=tmp_path / "a")
    assert straight["status"] == "completed" and straight["iterations"] == 4

    first = run_job(job, output_dir=tmp_path / "b", hooks=[StopAt(3)])
    assert first == {"status": "cancelled", "metrics": {}, "export_dir": None, "iterations": 3, "start_iteration": 0}
    assert (tmp_path / "b" / "checkpoints" / "last").read_text() == "ckpt_0000003.pt"
    assert not (tmp_path / "b" / "export").exists()
    second = run_job(job, output_dir=tmp_path / "b")
    assert second["status"] == "completed" and second["iterations"] == 4 and second["start_iteration"] == 3

    log_a, log_b = read_log(tmp_path / "a"), read_log(tmp_path / "b")
    assert sorted(log_b) == list(range(1, 5))
    loss_keys = [k for k in log_a[1] if k.startswith(("loss", "classification", "bbox"))]
    if kind == "distill":
        assert {"loss_feature", "loss_relation", "loss_response_cls"} <= set(loss_keys)
        assert "gi/gi_per_image" in log_a[4]
    for it in range(1, 5):
        for key in loss_keys + ["total_loss", "lr"]:
            assert log_b[it][key] == pytest.approx(log_a[it][key], rel=1e-5, abs=1e-7), (it, key)
    wa = load_file(str(tmp_path / "a" / "export" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "export" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6)
    # The last step moved the weights (the comparison is not vacuous).
    at3 = torch.load(tmp_path / "b" / "checkpoints" / "ckpt_0000003.pt", weights_only=True)["model"]
    prefix = "student." if kind == "distill" else ""
    changed = sum(not torch.allclose(wa[k], at3[prefix + k]) for k in wa if wa[k].is_floating_point())
    assert changed > len(wa) // 2


def test_resume_refuses_a_different_model(tiny_data, tmp_path):
    job = make_job("train", tiny_data, max_iters=2)
    run_job(job, output_dir=tmp_path, hooks=[StopAt(1)])
    other = job.model_copy(update={"student": student_config().model_copy(update={"fpn_channels": 64})})
    with pytest.raises(ValueError, match="cannot resume: the checkpoint's student"):
        run_job(other, output_dir=tmp_path)
    assert run_job(other, output_dir=tmp_path, resume=False)["status"] == "completed"
