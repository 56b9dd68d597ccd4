"""gid_core.config: the cross-field rules, JobConfig's located errors, the config file loader."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from gid_core.config import (
    JobConfig,
    ModelConfig,
    StrictModel,
    batch_split_problems,
    class_problems,
    dataset_class_problems,
    load_config_file,
    teacher_problems,
)
from gid_core.errors import ConfigFileError, Problem, ProblemsError

MODEL = {"arch": "retinanet", "backbone": "resnet18", "num_classes": 2, "fpn_channels": 32}
DATA = {"train_annotations": "train.json", "train_images": "train"}


def locs(problems: list[Problem]) -> list[tuple]:
    return [p.loc for p in problems]


# --------------------------------------------------------------------------- rules


def test_teacher_rules():
    student = ModelConfig(**MODEL)
    trained = ModelConfig(**MODEL, weights="t.safetensors")
    assert teacher_problems("distill", student, trained) == []
    assert teacher_problems("train", student, None) == []
    assert teacher_problems("train", student, trained) == [
        Problem(("teacher",), "only allowed when kind is 'distill'")
    ]
    assert teacher_problems("distill", student, None) == [
        Problem(("teacher",), "required when kind is 'distill'", "missing")
    ]
    fcos = ModelConfig(**{**MODEL, "arch": "fcos", "fpn_channels": 64})
    (untrained, arch) = teacher_problems("distill", student, fcos)
    assert untrained == Problem(("teacher", "weights"), "a distillation teacher must be trained", "missing")
    assert arch.loc == ("teacher", "arch") and "teacher.arch (fcos) != student.arch (retinanet)" in arch.message


def test_teacher_must_share_the_students_input_size():
    """The teacher runs on the student's resized images: its own sizes would be silently ignored."""
    student = ModelConfig(**MODEL, min_size=512, max_size=683)
    teacher = ModelConfig(**MODEL, weights="t.safetensors")  # torchvision's 800 / 1333
    problems = teacher_problems("distill", student, teacher)
    assert locs(problems) == [("teacher", "min_size"), ("teacher", "max_size")]
    assert "teacher.min_size (800) != student.min_size (512)" in problems[0].message
    same = teacher.model_copy(update={"min_size": 512, "max_size": 683})
    assert teacher_problems("distill", student, same) == []
    with pytest.raises(ValidationError) as info:
        JobConfig(kind="distill", student=student, teacher=teacher, data=DATA)
    assert {e["loc"] for e in info.value.errors()} == {("teacher", "min_size"), ("teacher", "max_size")}


def test_teacher_loads_all_its_weights():
    student = ModelConfig(**MODEL)
    teacher = ModelConfig(**MODEL, weights="t.safetensors", init_mode="backbone_and_box")
    assert locs(teacher_problems("distill", student, teacher)) == [("teacher", "init_mode")]


def test_class_rules():
    assert class_problems(2) == []  # nothing known to compare
    assert class_problems(2, teacher_classes=2, train_categories=["a", "b"], val_categories=["a", "b"]) == []
    (train,) = class_problems(3, train_categories=["a", "b"])
    assert train == Problem(
        ("student", "num_classes"), "student.num_classes (3) != the 2 categories of the train set", "class_mismatch"
    )
    (val,) = class_problems(2, train_categories=["a", "b"], val_categories=["a", "c"])
    assert val.loc == ("data", "val_annotations") and val.code == "class_mismatch"
    (teacher,) = class_problems(2, teacher_classes=3)
    assert teacher.loc == ("teacher", "num_classes")
    assert teacher.message == "teacher.num_classes (3) != student.num_classes (2)"
    (names,) = class_problems(2, teacher_classes=2, teacher_categories=["x", "y"], train_categories=["a", "b"])
    assert names.loc == ("teacher", "weights") and "categories" in names.message
    # A teacher of another class count is one problem, not two.
    assert locs(class_problems(2, teacher_classes=3, teacher_categories=["x"], train_categories=["a", "b"])) == [
        ("teacher", "num_classes")
    ]


def test_dataset_class_rule_names_the_field():
    assert dataset_class_problems(2, [{"id": 1}, {"id": 5}], loc=("model", "num_classes"), dataset="val.json") == []
    (problem,) = dataset_class_problems(3, ["a"], loc=("model", "num_classes"), dataset="val.json")
    assert problem == Problem(
        ("model", "num_classes"), "model.num_classes (3) != the 1 categories of val.json", "class_mismatch"
    )


def test_batch_split_rule():
    assert batch_split_problems(8, 4) == []
    assert batch_split_problems(6, 4) == [
        Problem(("hyperparameters", "batch_size"), "batch_size (6) must be divisible by devices (4)")
    ]


def test_job_config_reports_every_rule_at_its_field():
    with pytest.raises(ValidationError) as info:
        JobConfig(
            kind="distill", student=MODEL, teacher={**MODEL, "num_classes": 3}, data=DATA,
            hyperparameters={"batch_size": 3}, devices=2,
        )
    errors = info.value.errors()
    assert [e["loc"] for e in errors] == [
        ("teacher", "weights"), ("teacher", "num_classes"), ("hyperparameters", "batch_size")
    ]
    assert [e["type"] for e in errors] == ["missing", "class_mismatch", "value_error"]
    assert errors[1]["msg"] == "teacher.num_classes (3) != student.num_classes (2)" and errors[1]["input"] == 3
    with pytest.raises(ValidationError) as info:
        JobConfig(kind="train", student=MODEL, teacher={**MODEL, "weights": "t.pt"}, data=DATA)
    assert [e["loc"] for e in info.value.errors()] == [("teacher",)]


def test_strict_model_refuses_unknown_fields():
    class Settings(StrictModel):
        a: int = 0

    with pytest.raises(ValidationError) as info:
        Settings(a=1, b=2)
    assert info.value.errors()[0]["loc"] == ("b",)


def test_problems_error_lists_every_problem():
    error = ProblemsError([Problem(("a",), "first"), Problem(("b",), "second")], source="x.json")
    assert str(error) == "invalid input x.json: 2 problem(s)\n  - first\n  - second"
    assert isinstance(error, ValueError) and locs(error.problems) == [("a",), ("b",)]
    with pytest.raises(ValueError, match="at least one problem"):
        ProblemsError([])


# --------------------------------------------------------------------------- config files


@pytest.mark.parametrize("name, text", [
    ("job.yaml", "kind: train\nstudent: {arch: fcos}\n"),
    ("job.yml", "kind: train\nstudent: {arch: fcos}\n"),
    ("job.json", '{"kind": "train", "student": {"arch": "fcos"}}'),
    ("job.conf", '{"kind": "train", "student": {"arch": "fcos"}}'),  # other suffixes: YAML, so JSON too
])
def test_load_config_file(tmp_path: Path, name, text):
    (tmp_path / name).write_text(text)
    assert load_config_file(tmp_path / name) == {"kind": "train", "student": {"arch": "fcos"}}


@pytest.mark.parametrize("name, content, expected", [
    ("missing.yaml", None, "cannot read config file {path}: not found"),
    ("folder.yaml", "dir", "cannot read config file {path}: "),
    ("latin1.yaml", b"kind: \xe9", "cannot read config file {path}: "),
    ("broken.json", "{not json", "config file {path} is not valid JSON: "),
    ("broken.yaml", "kind: [train", "config file {path} is not valid YAML: "),
    ("broken.conf", "kind: [train", "config file {path} is not valid YAML or JSON: "),
    ("list.yaml", "- kind: train\n", "config file {path}: expected a mapping, got list"),
    ("empty.yaml", "", "config file {path}: expected a mapping, got NoneType"),
])
def test_config_file_errors_name_the_file(tmp_path: Path, name, content, expected):
    path = tmp_path / name
    if content == "dir":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ConfigFileError) as info:
        load_config_file(path)
    assert str(info.value).startswith(expected.format(path=path)) and info.value.path == path


# --------------------------------------------------------------------------- intrinsic bounds


@pytest.mark.parametrize("where, update, loc", [
    ("hyperparameters", {"seed": 10**30}, ("hyperparameters", "seed")),  # torch.manual_seed: 64 bits
    ("hyperparameters", {"seed": -1}, ("hyperparameters", "seed")),
    ("hyperparameters", {"max_iters": 10**12}, ("hyperparameters", "max_iters")),
    ("hyperparameters", {"warmup_iters": 10**12}, ("hyperparameters", "warmup_iters")),
    ("hyperparameters", {"checkpoint_period": 10**12}, ("hyperparameters", "checkpoint_period")),
    ("hyperparameters", {"eval_period": 10**12}, ("hyperparameters", "eval_period")),
    ("hyperparameters", {"batch_size": 10**9}, ("hyperparameters", "batch_size")),
    ("hyperparameters", {"keep_checkpoints": 10**9}, ("hyperparameters", "keep_checkpoints")),
    ("hyperparameters", {"distill": {"pre_nms_top_n": 10**9}}, ("hyperparameters", "distill", "pre_nms_top_n")),
    ("hyperparameters", {"distill": {"roi_sampling_ratio": 10**6}}, ("hyperparameters", "distill", "roi_sampling_ratio")),
    ("hyperparameters", {"distill": {"roi_canonical_level": 10**30}}, ("hyperparameters", "distill", "roi_canonical_level")),
    ("student", {"anchor_sizes": [8]}, ("student", "anchor_sizes")),  # one per FPN level
    ("student", {"anchor_sizes": [32] * 100_000}, ("student", "anchor_sizes")),
    ("student", {"anchor_sizes": [1, 2, 4, 8, 16]}, ("student", "anchor_sizes", 0)),  # rounds to zero height
    ("student", {"anchor_sizes": [32, 64, 128, 256, 10**9]}, ("student", "anchor_sizes", 4)),
])
def test_values_no_run_can_use_are_refused_at_their_field(where, update, loc):
    job = {"kind": "train", "student": dict(MODEL), "data": DATA, "hyperparameters": {}}
    job[where].update(update)
    with pytest.raises(ValidationError) as info:
        JobConfig.model_validate(job)
    assert [e["loc"] for e in info.value.errors()] == [loc]


def test_largest_accepted_seed_and_anchor_sizes_work_in_torch():
    import torch

    from gid_core.checkpoint import seed_everything
    from gid_core.config import MAX_SEED, Hyperparameters
    from gid_core.models import build_detector

    seed = Hyperparameters(seed=MAX_SEED).seed
    seed_everything(seed + 63)  # the engine adds the rank, and the epoch for the sampler
    torch.Generator().manual_seed(seed + 10**6)
    model = build_detector(ModelConfig(**MODEL, anchor_sizes=[2, 4, 8, 16, 8192]), load_weights=False)
    assert model.anchor_generator.sizes[0] == (2, 2, 3)
