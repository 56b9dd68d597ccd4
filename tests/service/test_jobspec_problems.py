"""Every problem the engine can report maps to a field of the request, through tables, never text."""

from __future__ import annotations

from types import UnionType
from typing import Any, Union, get_args, get_origin

import pytest
from pydantic import BaseModel

from gid_core.config import (
    JobConfig,
    ModelConfig,
    batch_split_problems,
    class_problems,
    teacher_problems,
)
from gid_core.data import DATASET_LOCS
from gid_core.errors import Loc
from service.datasets import DATASET_PROBLEM_FIELDS
from service.jobspec import request_loc
from service.schemas import DatasetPathCreate, JobCreate
from tests.service.helpers import TINY_MODEL


def _variants(annotation: Any) -> tuple:
    return get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)


def _model_of(annotation: Any) -> type[BaseModel] | None:
    models = [a for a in _variants(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
    return models[0] if models else None


def _list_item(annotation: Any) -> Any:
    lists = [a for a in _variants(annotation) if get_origin(a) is list]
    return get_args(lists[0])[0] if lists else None


def is_field(schema: type[BaseModel], loc: list[str | int]) -> bool:
    """``loc`` (``["body", ...]``) names ``schema`` itself or one of its (nested) fields."""
    if loc[:1] != ["body"]:
        return False
    annotation: Any = schema
    for part in loc[1:]:
        if isinstance(part, int):
            annotation = _list_item(annotation)
        else:
            model = _model_of(annotation)
            if model is None or part not in model.model_fields:
                return False
            annotation = model.model_fields[part].annotation
        if annotation is None:
            return False
    return True


def engine_locs(model: type[BaseModel], prefix: Loc = ()) -> set[Loc]:
    """Every location pydantic or a model-level rule can report in ``model``: each nested model
    (its own validators report there), each field, and the first item of each list field."""
    locs = {prefix}
    for name, field in model.model_fields.items():
        loc = (*prefix, name)
        locs.add(loc)
        if (nested := _model_of(field.annotation)) is not None:
            locs |= engine_locs(nested, loc)
        elif _list_item(field.annotation) is not None:
            locs.add((*loc, 0))
    return locs


def rule_locs() -> set[Loc]:
    """The locations of the cross-field rules, triggered with hand-built bad inputs."""
    student = ModelConfig(**TINY_MODEL)
    untrained_fcos = ModelConfig(**{**TINY_MODEL, "arch": "fcos", "fpn_channels": 64, "num_classes": 3})
    problems = [
        *teacher_problems("distill", student, None),
        *teacher_problems("train", student, untrained_fcos),
        *teacher_problems("distill", student, untrained_fcos),
        *class_problems(2, train_categories=["a"], val_categories=["b"]),
        *class_problems(2, teacher_classes=3),
        *class_problems(2, teacher_categories=["x", "y"], train_categories=["a", "b"]),
        *batch_split_problems(3, 2),
    ]
    return {p.loc for p in problems}


JOB_CONFIG_LOCS = engine_locs(JobConfig)


def test_rules_report_locations_in_job_config():
    expected = {
        ("teacher",), ("teacher", "weights"), ("teacher", "arch"), ("teacher", "num_classes"),
        ("student", "num_classes"), ("data", "val_annotations"), ("hyperparameters", "batch_size"),
    }
    assert rule_locs() == expected
    assert expected <= JOB_CONFIG_LOCS


@pytest.mark.parametrize("loc", sorted(JOB_CONFIG_LOCS | rule_locs(), key=str), ids=str)
def test_every_engine_location_maps_to_a_request_field(loc):
    mapped = request_loc(loc)
    assert is_field(JobCreate, mapped), (loc, mapped)
    assert mapped != ["body"] or loc == (), f"{loc} is not in jobspec.REQUEST_FIELDS"


def test_request_locations_of_the_rules():
    assert request_loc(("teacher",)) == ["body", "teacher"]
    assert request_loc(("teacher", "num_classes")) == ["body", "teacher", "model_id"]
    assert request_loc(("student", "num_classes")) == ["body", "student", "num_classes"]
    assert request_loc(("student", "weights")) == ["body", "student", "init_model_id"]
    assert request_loc(("data", "val_annotations")) == ["body", "val_dataset"]
    assert request_loc(("hyperparameters", "distill", "top_k")) == ["body", "hyperparameters", "distill", "top_k"]
    assert request_loc(("devices",)) == ["body", "resources", "devices"]


@pytest.mark.parametrize("loc", DATASET_LOCS, ids=str)
def test_every_dataset_problem_maps_to_a_registration_field(loc):
    assert is_field(DatasetPathCreate, DATASET_PROBLEM_FIELDS[loc])


def test_field_check_refuses_what_is_not_a_field():
    assert not is_field(JobCreate, ["body", "teacher", "num_classes"])
    assert not is_field(JobCreate, ["body", "data"])
    assert not is_field(JobCreate, ["query", "kind"])
