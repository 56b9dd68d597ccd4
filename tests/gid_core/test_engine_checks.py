"""The engine's setup checks raise the shared rules' problems, located in the job's config."""

from __future__ import annotations

from pathlib import Path

import pytest

from gid_core.config import EvalConfig, JobConfig, ModelConfig, SyntheticDatasetConfig
from gid_core.data import IMAGES_LOC, DatasetValidationError
from gid_core.engine import (
    JobSetupError,
    check_dataset,
    check_eval_inputs,
    check_job_inputs,
    load_job_datasets,
    load_model_for_eval,
)
from gid_core.synthetic import make_synthetic_dataset

MODEL = {"arch": "retinanet", "backbone": "resnet18", "num_classes": 2, "fpn_channels": 32}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[int, dict]:
    """Tiny synthetic datasets with 2 and 3 categories."""
    root = tmp_path_factory.mktemp("data")
    return {
        n: make_synthetic_dataset(SyntheticDatasetConfig(
            output_dir=root / str(n), num_train=2, num_val=1, image_size=32, num_classes=n, max_objects=1,
        ))
        for n in (2, 3)
    }


def job(train: dict, val: dict | None = None, num_classes: int = 2) -> JobConfig:
    data = {"train_annotations": train["train_annotations"], "train_images": train["train_images"]}
    if val is not None:
        data.update(val_annotations=val["val_annotations"], val_images=val["val_images"])
    return JobConfig(kind="train", student={**MODEL, "num_classes": num_classes}, data=data)


def test_matching_job_passes(datasets):
    check_job_inputs(job(datasets[2], datasets[2]))
    train, val = load_job_datasets(job(datasets[2], datasets[2]))
    assert train.num_classes == val.num_classes == 2


@pytest.mark.parametrize("check", [check_job_inputs, load_job_datasets])
def test_class_problems_are_located_in_the_job(datasets, check):
    with pytest.raises(JobSetupError) as info:
        check(job(datasets[2], datasets[3], num_classes=3))
    assert [p.loc for p in info.value.problems] == [("student", "num_classes"), ("data", "val_annotations")]
    assert "student.num_classes (3) != the 2 categories of the train set" in str(info.value)


def test_check_dataset_locates_the_model_field(datasets):
    annotations, images = datasets[3]["val_annotations"], datasets[3]["val_images"]
    check_dataset(annotations, images, 3, loc=("model", "num_classes"))
    with pytest.raises(JobSetupError) as info:
        check_dataset(annotations, images, 2, loc=("model", "num_classes"))
    (problem,) = info.value.problems
    assert problem.loc == ("model", "num_classes") and problem.code == "class_mismatch"
    with pytest.raises(DatasetValidationError) as info:
        check_dataset(annotations, Path(images) / "missing", 3, loc=("model", "num_classes"))
    assert info.value.problems[0].loc == IMAGES_LOC


def test_evaluation_needs_weights():
    with pytest.raises(JobSetupError) as info:
        load_model_for_eval(ModelConfig(**MODEL))
    assert [p.loc for p in info.value.problems] == [("model", "weights")]


def test_eval_inputs_are_checked_as_each_rank_checks_them(datasets):
    """A model of other classes (relabelled by name) passes the pre-check of a multi-device
    evaluation, which used to compare only the class counts."""
    data = {"annotations": datasets[2]["val_annotations"], "images": datasets[2]["val_images"]}
    five = {**MODEL, "num_classes": 5, "weights": "unused.safetensors"}
    named = ["a", "digit_1", "b", "digit_0", "c"]
    check_eval_inputs(EvalConfig(model=five, model_classes={"categories": named}, **data))
    with pytest.raises(JobSetupError) as info:  # the count check said "5 != 2" here
        check_dataset(data["annotations"], data["images"], 5, loc=("model", "num_classes"))
    with pytest.raises(JobSetupError) as info:
        check_eval_inputs(EvalConfig(model=five, model_classes={"categories": ["a", "digit_1", "b", "c", "d"]}, **data))
    assert [p.loc[0] for p in info.value.problems] == ["model_classes"] and "digit_0" in str(info.value)
    with pytest.raises(DatasetValidationError):
        check_eval_inputs(EvalConfig(model=five, model_classes={"categories": named},
                                     **{**data, "images": Path(data["images"]) / "missing"}))
