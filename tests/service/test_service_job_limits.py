"""Job limits and the one validation path: the API refuses absurd values (422 naming the field and
the limit) and everything it accepts, the engine builds and trains.

The deployment's limits are ``Settings`` fields (group "job limits"); the engine's own bounds, true
of any run, are in ``gid_core.config``. The boundary test runs the engine's building blocks
(``gid_core.engine``) on the ``JobConfig`` the API stored, one training step each.
"""

from __future__ import annotations

import json

import pytest
import torch

from gid_core.checkpoint import seed_everything
from gid_core.config import MAX_SEED, JobConfig, ModelConfig
from gid_core.engine import build_train_loader, build_training_model, load_job_datasets
from gid_core.models import build_detector, save_state_dict_file
from gid_core.trainer import HookBase, Trainer, build_lr_scheduler, build_optimizer
from service import leases
from service.queue import JOB_QUEUE

STUDENT = {
    "arch": "retinanet", "backbone": "resnet18", "num_classes": 2, "fpn_channels": 8,
    "norm": "frozen_bn", "min_size": 32, "max_size": 32,
}
TEACHER = {**STUDENT, "backbone": "mobilenet_v3_large", "fpn_channels": 16}
# Small limits, so the boundary jobs stay tiny.
LIMITS = {"max_iters": 1000, "max_batch_per_device": 2, "max_image_size": 64, "max_num_workers": 1, "max_devices": 4}


@pytest.fixture
def limited(api):
    api.configure(max_upload_bytes=16 * 1024 * 1024, **LIMITS)
    return api


@pytest.fixture
def dataset(limited) -> str:
    return limited.register_dataset(num_classes=2)


def body(dataset: str, *, student=None, hp=None, devices: int = 1, **top) -> dict:
    return {
        "kind": "train", "student": {**STUDENT, **(student or {})}, "train_dataset": dataset,
        "hyperparameters": {"max_iters": 10, "batch_size": 2, "num_workers": 0, "amp": False, **(hp or {})},
        "resources": {"devices": devices}, **top,
    }


def refused(api, request: dict) -> dict[tuple, str]:
    r = api.post("/v1/jobs", json=request)
    assert r.status_code == 422, r.text
    assert api.get("/v1/jobs").json()["total"] == 0 and api.redis.client().llen(JOB_QUEUE) == 0
    return {tuple(e["loc"]): e["msg"] for e in r.json()["detail"]}


# --------------------------------------------------------------------------- absurd values


ABSURD = [
    # the deployment's limits: the message names the setting
    ({}, {"max_iters": 1001}, 1, ("hyperparameters", "max_iters"), "max_iters 1001 exceeds this server's limit of 1000 (GID_MAX_ITERS)"),
    ({}, {"warmup_iters": 10**6}, 1, ("hyperparameters", "warmup_iters"), "limit of 1000 (GID_MAX_ITERS)"),
    ({}, {"checkpoint_period": 10**9}, 1, ("hyperparameters", "checkpoint_period"), "GID_MAX_ITERS"),
    ({}, {"batch_size": 6}, 2, ("hyperparameters", "batch_size"), "limit of 4 (2 per device on 2 device(s), GID_MAX_BATCH_PER_DEVICE)"),
    ({}, {"num_workers": 64}, 1, ("hyperparameters", "num_workers"), "limit of 1 (GID_MAX_NUM_WORKERS)"),
    ({"max_size": 4096}, {}, 1, ("student", "max_size"), "max_size 4096 exceeds this server's limit of 64 (GID_MAX_IMAGE_SIZE)"),
    ({"min_size": 128, "max_size": 128}, {}, 1, ("student", "min_size"), "GID_MAX_IMAGE_SIZE"),
    ({}, {"batch_size": 8}, 8, ("resources", "devices"), "devices 8 exceeds this server's limit of 4 (GID_MAX_DEVICES)"),
    # the engine's own bounds, true of any run
    ({}, {"max_iters": 10**12}, 1, ("hyperparameters", "max_iters"), "2147483647"),
    ({}, {"batch_size": 10**9}, 1, ("hyperparameters", "batch_size"), "4096"),
    ({}, {"keep_checkpoints": 10**9}, 1, ("hyperparameters", "keep_checkpoints"), "100"),
    ({}, {"seed": 10**30}, 1, ("hyperparameters", "seed"), str(MAX_SEED)),
    ({}, {"seed": -1}, 1, ("hyperparameters", "seed"), "0"),
    ({}, {"distill": {"pre_nms_top_n": 10**9}}, 1, ("hyperparameters", "distill", "pre_nms_top_n"), "100000"),
    ({}, {"distill": {"roi_sampling_ratio": 10**6}}, 1, ("hyperparameters", "distill", "roi_sampling_ratio"), "16"),
    ({}, {"distill": {"adapter_on": "everywhere"}}, 1, ("hyperparameters", "distill", "adapter_on"), "'instances' or 'maps'"),
    ({"anchor_sizes": [8] * 100_000}, {}, 1, ("student", "anchor_sizes"), "5 FPN levels"),
    ({"anchor_sizes": [10**9] * 5}, {}, 1, ("student", "anchor_sizes", 0), "8192"),
    ({"anchor_sizes": [1, 2, 4, 8, 16]}, {}, 1, ("student", "anchor_sizes", 0), "2"),
]


@pytest.mark.parametrize(
    ("student", "hp", "devices", "loc", "text"),
    [pytest.param(*case, id=".".join(map(str, case[3]))) for case in ABSURD],
)
def test_absurd_values_are_refused_naming_field_and_limit(limited, dataset, student, hp, devices, loc, text):
    limited.configure(max_json_body_bytes=1024 * 1024)  # room for the 100 000 anchor sizes
    errors = refused(limited, body(dataset, student=student, hp=hp, devices=devices))
    assert ("body", *loc) in errors, errors
    assert text in errors[("body", *loc)], errors


def test_limits_are_settings(limited, dataset):
    request = body(dataset, hp={"max_iters": 5000})
    refused(limited, request)
    limited.configure(max_iters=5000)
    assert limited.post("/v1/jobs", json=request).status_code == 201


def test_teacher_image_size_is_limited(limited, dataset):
    teacher = limited.add_model({**TEACHER, "min_size": 128, "max_size": 128})
    errors = refused(limited, body(dataset, kind="distill", teacher={"model_id": teacher}))
    assert "the teacher's max_size 128 exceeds this server's limit of 64" in errors[("body", "teacher", "model_id")]


# --------------------------------------------------------------------------- one validation path


def test_anchor_sizes_the_engine_cannot_use_are_refused(limited, dataset):
    """A size per FPN level: torchvision's AnchorGenerator fails on fewer (it used to pass the API)."""
    unchecked = ModelConfig.model_construct(**{**STUDENT, "anchor_sizes": [8], "weights": None})
    with pytest.raises(ValueError, match="5 FPN levels"):
        build_detector(unchecked, load_weights=False)
    errors = refused(limited, body(dataset, student={"anchor_sizes": [8]}))
    assert "5 FPN levels, got 1" in errors[("body", "student", "anchor_sizes")]


def test_seeds_torch_cannot_take_are_refused(limited, dataset):
    """torch.manual_seed takes 64 bits; the engine seeds with seed + rank and seed + epoch."""
    with pytest.raises((ValueError, RuntimeError, OverflowError)):
        seed_everything(10**30)
    seed_everything(MAX_SEED + 64)  # the largest accepted seed, plus a rank and an epoch
    torch.Generator().manual_seed(MAX_SEED + 10**6)
    errors = refused(limited, body(dataset, hp={"seed": 10**30}))
    assert ("body", "hyperparameters", "seed") in errors


class OneStep(HookBase):
    def after_step(self) -> None:
        self.trainer.request_stop()


def start_engine(job: JobConfig) -> None:
    """What run_job does before training, on rank 0 of ``job.devices``, then one training step."""
    hp, device = job.hyperparameters, torch.device("cpu")
    train_ds, _ = load_job_datasets(job)
    seed_everything(hp.seed)
    model, _ = build_training_model(job, device, job.devices)
    seed_everything(hp.seed + job.devices - 1)
    optimizer = build_optimizer(model, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
    scheduler = build_lr_scheduler(
        optimizer, max_iters=hp.max_iters, schedule=hp.schedule, warmup_iters=hp.warmup_iters,
        warmup_factor=hp.warmup_factor, steps=hp.steps, gamma=hp.gamma,
    )
    data = build_train_loader(train_ds, hp, rank=0, world_size=job.devices, device=device)
    try:
        trainer = Trainer(model, optimizer, data, max_iters=hp.max_iters, device=device, amp=hp.amp,
                          grad_clip=hp.grad_clip, hooks=[OneStep()])
        assert trainer.train() == "cancelled" and trainer.iter == 1  # a non-finite loss raises
        scheduler.step()
    finally:
        data.close()


AT_THE_LIMITS = {"max_iters": 1000, "warmup_iters": 1000, "log_period": 1000, "checkpoint_period": 1000,
                 "eval_period": 1000, "keep_checkpoints": 100, "num_workers": 0}
BOUNDARY_JOBS = {
    "iterations-and-largest-seed": dict(hp={**AT_THE_LIMITS, "seed": MAX_SEED}),
    "smallest-anchors-and-fpn": dict(student={"anchor_sizes": [2] * 5, "fpn_channels": 8}, hp={"seed": 0}),
    "largest-anchors": dict(student={"anchor_sizes": [8192] * 5}),
    "largest-images": dict(student={"min_size": 64, "max_size": 64}),
    "largest-batch-on-most-devices": dict(hp={"batch_size": 8}, devices=4),
    "fcos-gn": dict(student={"arch": "fcos", "norm": "gn", "fpn_channels": 64, "anchor_sizes": [2] * 5}),
    "fasterrcnn-mobilenet": dict(student={"arch": "fasterrcnn", "backbone": "mobilenet_v3_large", "norm": "bn",
                                          "anchor_sizes": [2] * 5}),
    "distill-most-instances": dict(distill=True, hp={"distill": {
        "top_k": 1000, "pre_nms_top_n": 100_000, "nms_iou": 1.0, "roi_canonical_level": 16}}),
    "distill-largest-pooling": dict(distill=True, hp={"distill": {
        "top_k": 1, "roi_output_size": 64, "roi_sampling_ratio": 16, "roi_canonical_level": 0}}),
    "distill-adapter-on-maps-most-instances": dict(distill=True, hp={"distill": {
        "adapter_on": "maps", "top_k": 1000, "pre_nms_top_n": 100_000, "roi_output_size": 64, "roi_sampling_ratio": 16}}),
}


def upload_teacher(api, tmp_path) -> str:
    torch.manual_seed(0)
    path = tmp_path / "teacher.safetensors"
    save_state_dict_file(build_detector(ModelConfig(**TEACHER), load_weights=False).state_dict(), path)
    r = api.post("/v1/models", data={"name": "teacher", "config": json.dumps(TEACHER)},
                 files={"file": (path.name, path.read_bytes())})
    assert r.status_code == 201, r.text
    return r.json()["id"]


@pytest.mark.parametrize("case", BOUNDARY_JOBS, ids=str)
def test_what_the_api_accepts_the_engine_starts(limited, dataset, tmp_path, case):
    spec = dict(BOUNDARY_JOBS[case])
    extra = {"kind": "distill", "teacher": {"model_id": upload_teacher(limited, tmp_path)}} if spec.pop("distill", False) else {}
    r = limited.post("/v1/jobs", json=body(dataset, **spec, **extra))
    assert r.status_code == 201, r.text
    with limited.session() as s:
        engine_config = leases.get_job(s, job_id=r.json()["id"]).engine_config
    start_engine(JobConfig.model_validate(engine_config))
