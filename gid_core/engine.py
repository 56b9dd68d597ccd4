"""Running one ``JobConfig``: models, data, optimiser, hooks, resume, final evaluation, export.

``run_job`` is called in every rank after the process group is up (``launch`` does that;
``run_job_launched`` is the one-call version, used by the CLI and the worker). It is restartable:
with ``resume=True`` it continues from ``output_dir/checkpoints`` exactly where the last
checkpoint left off. The output directory is laid out as ``gid_core.jobdir`` describes:
checkpoints, ``train_log.jsonl`` (rank 0), and for completed runs ``export/`` and ``metrics.json``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from .checkpoint import Checkpointer, seed_everything
from .config import (
    EvalConfig,
    Hyperparameters,
    JobConfig,
    ModelConfig,
    batch_split_problems,
    class_problems,
    dataset_class_problems,
)
from .data import (
    CocoDetectionDataset,
    DatasetValidationError,
    collate_detection,
    label_order,
    validate_coco_dataset,
)
from .classmap import ClassMatch, RelabeledDetector, class_match_for, class_match_problems, teacher_categories
from .errors import Loc, Problem, ProblemsError
from .export import export_student
from .fileio import atomic_write, write_json_atomic
from .hooks import CancelHook, CheckpointHook, EvalHook, LRSchedulerHook, MetricsHook, log_metrics
from .hostmem import retain_freed_memory
from .jobdir import JobDir
from .launch import barrier, default_device, get_rank, get_world_size, launch
from .sampler import ResumableLoader, ResumableSampler, augmentation_seed
from .unlabeled import MixedLoader, UnlabeledImageDataset, validate_unlabeled_images
from .trainer import HookBase, Trainer, build_lr_scheduler, build_optimizer

logger = logging.getLogger(__name__)

UNLABELED_STREAM = 2**40  # mixed into the job's seed for the unlabeled images' order and flips

HookFactory = Callable[[int], Iterable[HookBase]]


class JobSetupError(ProblemsError):
    """The job cannot start as configured (data and model disagree, a checkpoint of another
    model is in the way): a user error, reported without a traceback by the CLI. Each problem's
    loc is a location in the ``JobConfig`` (``EvalConfig`` for an evaluation)."""

    summary = "cannot start"


def _raise_setup_problems(problems: list[Problem]) -> None:
    if problems:
        raise JobSetupError(problems)


def _validated_categories(annotations: Any, images: Any) -> list[dict]:
    """The dataset's categories in label order; ``DatasetValidationError`` lists every problem."""
    data, problems = validate_coco_dataset(annotations, images)
    if problems:
        raise DatasetValidationError(problems, annotations)
    return label_order(data["categories"])


def check_dataset(annotations: Any, images: Any, num_classes: int, *, loc: Loc) -> None:
    """Raises ``DatasetValidationError`` listing every problem of the dataset, or
    ``JobSetupError`` when its categories do not fit ``num_classes`` (the field at ``loc``)."""
    categories = _validated_categories(annotations, images)
    _raise_setup_problems(dataset_class_problems(num_classes, categories, loc=loc, dataset=str(annotations)))


def check_eval_inputs(cfg: EvalConfig) -> None:
    """The dataset and class checks ``run_evaluation`` makes, without building anything (a
    multi-device evaluation reports them once, before any process starts)."""
    eval_class_match(cfg, _validated_categories(cfg.annotations, cfg.images))


def check_job_inputs(job: JobConfig) -> None:
    """The dataset checks ``run_job`` makes, without building anything."""
    train = _validated_categories(job.data.train_annotations, job.data.train_images)
    val = None
    if job.data.val_annotations is not None:
        val = _validated_categories(job.data.val_annotations, job.data.val_images)
    _raise_setup_problems(class_problems(job.student.num_classes, train_categories=train, val_categories=val)
                          + teacher_class_problems(job, [c["name"] for c in train]))
    if job.data.unlabeled_images is not None:
        _, problems = validate_unlabeled_images(job.data.unlabeled_images, job.data.unlabeled_annotations)
        if problems:
            raise DatasetValidationError(problems, job.data.unlabeled_annotations or job.data.unlabeled_images)


def teacher_class_problems(job: JobConfig, dataset: list[str]) -> list[Problem]:
    """A teacher of known categories has each of the dataset's classes (by name or ``class_map``)."""
    if job.teacher is None:
        return []
    names = teacher_categories(job.teacher, job.teacher_classes)
    return class_match_problems(dataset, names, job.teacher_classes, teacher_num_classes=job.teacher.num_classes)


# --------------------------------------------------------------------------- building blocks


def build_training_model(
    job: JobConfig, device: torch.device, world_size: int, dataset: list[str] | None = None
) -> tuple[nn.Module, nn.Module]:
    """``(model the trainer steps, student)``: the student itself, or a ``GIDDistiller`` around a
    frozen, trained teacher and the student; ``dataset`` (category names) matches a teacher of
    other classes to the student's."""
    from .models import build_detector

    student = build_detector(job.student)
    if device.type == "cuda" and world_size > 1 and job.hyperparameters.sync_batchnorm:
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
    student.to(device)
    if job.kind == "train":
        return student, student
    from .distill import GIDDistiller

    assert job.teacher is not None  # JobConfig guarantees it
    teacher = build_detector(job.teacher).to(device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    classes = class_match_for(job.teacher, job.teacher_classes, dataset) if dataset is not None else None
    return GIDDistiller(teacher, student, job.hyperparameters.distill, classes=classes), student


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    # Every trainable parameter takes part in every step (GIDDistiller keeps a switched-off
    # adapter in the graph at weight 0), so DDP needs no unused-parameter search.
    # Buffers (BatchNorm running statistics) follow rank 0 so every rank holds the model rank 0
    # checkpoints; the keyword was renamed in recent PyTorch.
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    sync = {"forward_sync_buffers": True} if "forward_sync_buffers" in params else {"broadcast_buffers": True}
    return DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=False,
        **sync,
    )


def build_train_loader(
    dataset: torch.utils.data.Dataset, hp: Hyperparameters, *, rank: int, world_size: int, device: torch.device,
    seed: int | None = None,
) -> ResumableLoader:
    seed = hp.seed if seed is None else seed
    sampler = ResumableSampler(
        len(dataset), num_replicas=world_size, rank=rank, shuffle=True, seed=seed, batch_size=hp.batch_size
    )
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_detection,
        num_workers=hp.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        # Its own generator: creating an epoch's iterator must not draw from the global RNG,
        # or a resumed run's random stream would differ from an uninterrupted one.
        generator=torch.Generator().manual_seed(seed),
    )
    return ResumableLoader(loader, sampler)


def build_mixed_loader(
    job: JobConfig, labeled: ResumableLoader, *, rank: int, world_size: int, device: torch.device
) -> MixedLoader:
    """The labeled stream interleaved with the unlabeled images at ``unlabeled_ratio``
    (``gid_core.unlabeled``); the unlabeled stream shuffles with a seed of its own."""
    s, hp = job.student, job.hyperparameters
    dataset = UnlabeledImageDataset(job.data.unlabeled_images, job.data.unlabeled_annotations, train=True,
                                    flip_prob=hp.flip_prob, min_size=s.min_size, max_size=s.max_size)
    seed = augmentation_seed(hp.seed, 0, UNLABELED_STREAM)
    unlabeled = build_train_loader(dataset, hp, rank=rank, world_size=world_size, device=device, seed=seed)
    return MixedLoader(labeled, unlabeled, hp.unlabeled_ratio)


def build_eval_loader(
    dataset: CocoDetectionDataset, *, batch_size: int, num_workers: int, rank: int, world_size: int,
    device: torch.device,
) -> DataLoader:
    sampler = (
        DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
        if world_size > 1
        else None
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        collate_fn=collate_detection,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )


def _jsonl_writer(path: Path) -> Callable[[int, dict[str, float]], None]:
    def write(iteration: int, metrics: dict[str, float]) -> None:
        log_metrics(iteration, metrics)
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"iteration": iteration, **metrics}) + "\n")

    return write


class JobInfoHook(HookBase):
    """Records the job's model settings in checkpoints and refuses to resume a different model."""

    KEYS = ("kind", "student", "teacher")

    def __init__(self, job: JobConfig) -> None:
        dumped = job.model_dump(mode="json")
        for name in ("student", "teacher"):  # initial weights do not matter once resumed
            if dumped.get(name):
                dumped[name] = {**dumped[name], "weights": None}
        self.info = {k: dumped[k] for k in self.KEYS}

    def state_dict(self) -> dict[str, Any]:
        return {"job": self.info}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("job", {})
        for key in self.KEYS:
            if key in saved and saved[key] != self.info[key]:
                raise JobSetupError([Problem(
                    (key,),
                    f"cannot resume: the checkpoint's {key} ({saved[key]}) differs from the job's "
                    f"({self.info[key]}); use another output directory or resume=False",
                )])


def resume_data_problems(job: JobConfig, state: Mapping[str, Any]) -> list[Problem]:
    """A checkpoint's data position fits the job's stream: a labeled-only position cannot resume
    the labeled + unlabeled mix (``gid_core.unlabeled.MixedLoader``), nor the reverse."""
    saved = state.get("data")
    if not isinstance(saved, Mapping):
        return []
    had, has = "unlabeled" in saved, job.data.unlabeled_images is not None
    if had == has:
        return []
    now = (f"the job now has data.unlabeled_images ({job.data.unlabeled_images})" if has
           else "the job now has no data.unlabeled_images")
    return [Problem(
        ("data", "unlabeled_images"),
        f"cannot resume: the checkpoint at iteration {state.get('iteration')} was written "
        f"{'with' if had else 'without'} unlabeled images, but {now}; resume with the same data, "
        "or use another output directory or resume=False",
        "resume_mismatch",
    )]


# --------------------------------------------------------------------------- the job


def load_job_datasets(job: JobConfig) -> tuple[CocoDetectionDataset, CocoDetectionDataset | None]:
    """The train set (with flip augmentation) and the optional val set, resized like the student."""
    s, hp = job.student, job.hyperparameters
    train_ds = CocoDetectionDataset(job.data.train_annotations, job.data.train_images, train=True,
                                    flip_prob=hp.flip_prob, min_size=s.min_size, max_size=s.max_size)
    val_ds = None
    if job.data.val_annotations is not None:
        val_ds = CocoDetectionDataset(job.data.val_annotations, job.data.val_images, train=False,
                                      min_size=s.min_size, max_size=s.max_size)
    val_categories = val_ds.categories if val_ds is not None else None
    _raise_setup_problems(class_problems(s.num_classes, train_categories=train_ds.categories,
                                         val_categories=val_categories)
                          + teacher_class_problems(job, [c["name"] for c in train_ds.categories]))
    return train_ds, val_ds


def _truncate_log(path: Path, iteration: int) -> None:
    """Drops log rows past ``iteration``: a resumed run logs those iterations again."""
    if not path.is_file():
        return
    rows = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("iteration", 0) <= iteration]
    atomic_write(path, lambda f: f.write("".join(r + "\n" for r in rows).encode()))


def _resolve_ranks(rank: int | None, world_size: int | None, batch_size: int) -> tuple[int, int]:
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    if (rank, world_size) != (get_rank(), get_world_size()):
        raise ValueError(f"rank/world_size {rank}/{world_size} do not match the process group "
                         f"({get_rank()}/{get_world_size()})")
    _raise_setup_problems(batch_split_problems(batch_size, world_size))
    return rank, world_size


def run_job(
    job: JobConfig,
    *,
    output_dir: str | os.PathLike[str],
    hooks: Iterable[HookBase] = (),
    resume: bool = True,
    rank: int | None = None,
    world_size: int | None = None,
) -> dict[str, Any]:
    """Trains (or distils) ``job`` in this rank. Returns ``{"status": "completed" | "cancelled",
    "metrics": final evaluation (rank 0; {} elsewhere or without a val set), "export_dir": str or
    None (cancelled), "iterations": completed iterations, "start_iteration": 0 or the iteration of
    the checkpoint it resumed from}``. ``hooks`` run after the engine's own."""
    hp = job.hyperparameters
    rank, world_size = _resolve_ranks(rank, world_size, hp.batch_size)
    job_dir = JobDir(output_dir)
    job_dir.root.mkdir(parents=True, exist_ok=True)
    device = default_device()
    if device.type == "cpu":
        retain_freed_memory()  # the step's temporaries stay mapped (gid_core.hostmem)
    train_ds, val_ds = load_job_datasets(job)

    seed_everything(hp.seed)  # identical initial weights on every rank (DDP broadcasts anyway)
    model, student = build_training_model(job, device, world_size, [c["name"] for c in train_ds.categories])
    seed_everything(hp.seed + rank)  # per-rank stream for training-time randomness
    optimizer = build_optimizer(model, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
    scheduler = build_lr_scheduler(
        optimizer, max_iters=hp.max_iters, schedule=hp.schedule, warmup_iters=hp.warmup_iters,
        warmup_factor=hp.warmup_factor, steps=hp.steps, gamma=hp.gamma,
    )
    data = build_train_loader(train_ds, hp, rank=rank, world_size=world_size, device=device)
    if job.data.unlabeled_images is not None:
        data = build_mixed_loader(job, data, rank=rank, world_size=world_size, device=device)
    evaluate = None
    if val_ds is not None:
        val_loader = build_eval_loader(val_ds, batch_size=max(1, hp.batch_size // world_size),
                                       num_workers=hp.num_workers, rank=rank, world_size=world_size, device=device)
        evaluate = functools.partial(_evaluate, student, val_loader, val_ds, device)

    checkpointer = Checkpointer(job_dir.checkpoints, keep=hp.keep_checkpoints)
    trainer = Trainer(
        wrap_ddp(model, device) if world_size > 1 else model, optimizer, data, max_iters=hp.max_iters,
        device=device, amp=hp.amp, grad_clip=hp.grad_clip,
        hooks=_job_hooks(job, scheduler, checkpointer, evaluate, job_dir, hooks, world_size),
    )
    state = checkpointer.load_latest() if resume else None
    if state is not None:
        _raise_setup_problems(resume_data_problems(job, state))
        trainer.load_state_dict(state)
        logger.info("resumed from checkpoint at iteration %d", trainer.iter)
        if rank == 0:
            _truncate_log(job_dir.train_log, trainer.iter)
    del state  # the checkpoint's tensors: not kept through training
    start_iteration = trainer.start_iter
    try:
        status = trainer.train()
    finally:
        data.close()
    result = {"status": status, "metrics": {}, "export_dir": None, "iterations": trainer.iter,
              "start_iteration": start_iteration}
    if status == "completed":
        result["metrics"], result["export_dir"] = _finish_job(
            job, student, train_ds.categories, evaluate, job_dir, rank)
    return result


def _job_hooks(
    job: JobConfig, scheduler: torch.optim.lr_scheduler.LRScheduler, checkpointer: Checkpointer,
    evaluate: Callable[[], dict[str, Any]] | None, job_dir: JobDir, extra: Iterable[HookBase], world_size: int,
) -> list[HookBase]:
    """The engine's hooks, then ``extra``, then a ``CancelHook`` when distributed and none is
    among them (stop requests must be agreed on: every rank stops after the same iteration)."""
    hp = job.hyperparameters
    hooks: list[HookBase] = [
        JobInfoHook(job),  # first: refuses another model's checkpoint before any state is loaded
        LRSchedulerHook(scheduler),  # before CheckpointHook: a checkpoint holds the stepped scheduler
        CheckpointHook(checkpointer, hp.checkpoint_period),
    ]
    if evaluate is not None and hp.eval_period:
        hooks.append(EvalHook(evaluate, hp.eval_period, eval_at_end=False))  # the final one: _finish_job
    hooks.append(MetricsHook(_jsonl_writer(job_dir.train_log), hp.log_period))
    hooks.extend(extra)
    if world_size > 1 and not any(isinstance(h, CancelHook) for h in hooks):
        hooks.append(CancelHook())
    return hooks


def _evaluate(student: nn.Module, loader: DataLoader, dataset: CocoDetectionDataset,
              device: torch.device) -> dict[str, Any]:
    from .evaluation import evaluate_coco

    return evaluate_coco(student, loader, dataset, device)


def _finish_job(
    job: JobConfig, student: nn.Module, categories: list[dict], evaluate: Callable[[], dict[str, Any]] | None,
    job_dir: JobDir, rank: int,
) -> tuple[dict[str, Any], str]:
    """After a completed run: final evaluation on every rank; rank 0 exports and writes metrics.
    Returns the metrics and the export folder."""
    metrics = evaluate() if evaluate is not None else {}
    if rank == 0:
        export_student(student, job.student, job_dir.export, categories=categories,
                       training_config=job.model_dump(mode="json"), metrics=metrics)
        write_json_atomic(job_dir.metrics, metrics)
    barrier()  # the export exists for every rank that returns its path
    return metrics, str(job_dir.export)


def _launched_job(
    rank: int, world_size: int, job: JobConfig, output_dir: str, hook_factory: HookFactory | None,
    resume: bool, log_level: int,
) -> dict[str, Any]:
    if not logging.getLogger().handlers:  # a spawned child starts without logging config
        logging.basicConfig(level=log_level if rank == 0 else logging.WARNING,
                            format=f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s")
    hooks = list(hook_factory(rank)) if hook_factory is not None else []
    return run_job(job, output_dir=output_dir, hooks=hooks, resume=resume, rank=rank, world_size=world_size)


def run_job_launched(
    job: JobConfig,
    output_dir: str | os.PathLike[str],
    hook_factory: HookFactory | None = None,
    *,
    resume: bool = True,
) -> dict[str, Any]:
    """``run_job`` on ``job.devices`` processes; returns rank 0's result.

    ``hook_factory(rank)`` builds each rank's extra hooks in that rank's process (so it may open
    per-rank resources, such as rank 0's database link) and must be picklable (a top-level
    function or a ``functools.partial`` of one). Spawned ranks log to stderr, rank 0 at the
    caller's level and the others at WARNING; a single rank runs in the calling process."""
    return launch(
        _launched_job, job.devices, job, str(output_dir), hook_factory, resume,
        logging.getLogger().getEffectiveLevel(),
    )


# --------------------------------------------------------------------------- evaluation jobs


def load_model_for_eval(cfg: ModelConfig) -> nn.Module:
    """A detector from ``cfg``; ``cfg.weights`` may be an export folder, a training checkpoint
    (its student) or a state_dict file."""
    from .models import build_detector, load_state_dict_checked

    if cfg.weights is None:
        raise JobSetupError([Problem(("model", "weights"), "evaluation needs trained weights", "missing")])
    path = Path(cfg.weights)
    if path.is_dir():
        from .export import load_export

        model, _ = load_export(path)
        return model
    if path.suffix == ".pt":
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
            state = dict(obj["model"])
            if any(k.startswith("student.") for k in state):  # a distillation checkpoint
                state = {k[len("student."):]: v for k, v in state.items() if k.startswith("student.")}
            model = build_detector(cfg, load_weights=False)
            load_state_dict_checked(model, state, source=str(path))
            return model
    return build_detector(cfg)


def eval_class_match(cfg: EvalConfig, categories: list[dict[str, Any]]) -> ClassMatch | None:
    """How the model's classes meet the dataset's: by name when the model's categories are known
    (``model_classes``, or a torchvision weights name's); else it must have the dataset's classes.
    Raises ``JobSetupError`` (locs under ``model_classes``) when they do not fit."""
    names = [c["name"] for c in categories]
    known = teacher_categories(cfg.model, cfg.model_classes)
    if known is None:
        _raise_setup_problems(dataset_class_problems(
            cfg.model.num_classes, categories, loc=("model", "num_classes"), dataset=str(cfg.annotations)
        ))
        return None
    problems = class_match_problems(names, known, cfg.model_classes, teacher_num_classes=cfg.model.num_classes)
    _raise_setup_problems([dataclasses.replace(p, loc=("model_classes", *p.loc[1:])) for p in problems])
    return class_match_for(cfg.model, cfg.model_classes, names)


def run_evaluation(cfg: EvalConfig, *, rank: int | None = None, world_size: int | None = None) -> dict[str, Any]:
    """COCO metrics of ``cfg.model`` on ``cfg.annotations``; every rank calls it, rank 0 gets them."""
    from .evaluation import evaluate_coco

    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    device = default_device()
    if device.type == "cpu":
        retain_freed_memory()
    dataset = CocoDetectionDataset(
        cfg.annotations, cfg.images, train=False, min_size=cfg.model.min_size, max_size=cfg.model.max_size
    )
    match = eval_class_match(cfg, dataset.categories)
    model = load_model_for_eval(cfg.model).to(device).eval()
    if match is not None and not match.identity:
        model = RelabeledDetector(model, match)
    loader = build_eval_loader(
        dataset, batch_size=cfg.batch_size, num_workers=cfg.num_workers, rank=rank,
        world_size=world_size, device=device,
    )
    return evaluate_coco(model, loader, dataset, device)


def _launched_eval(rank: int, world_size: int, cfg: EvalConfig) -> dict[str, Any]:
    return run_evaluation(cfg, rank=rank, world_size=world_size)


def run_evaluation_launched(cfg: EvalConfig) -> dict[str, Any]:
    return launch(_launched_eval, cfg.devices, cfg)
