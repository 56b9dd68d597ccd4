"""``/v1/specs/{kind}``: a complete request body to start from (``service.specs``)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query
from pydantic import ValidationError

from gid_core.config import Arch, Backbone
from gid_core.weights import WeightsError, lookup
from service import crud, specs
from service import lookup as refs
from service.api.deps import CurrentOwner, SessionDep, SettingsDep
from service.api.responses import AUTHENTICATED, error_responses
from service.errors import FieldErrors, NotFound, field_error
from service.schemas import SpecOut

router = APIRouter(prefix="/v1/specs", tags=["specs"], responses=AUTHENTICATED)

Size = Annotated[int | None, Query(ge=32, le=8192, description="input image side (shorter / longer cap)")]
Ref = Annotated[str | None, Query(max_length=255)]


@router.get("/{kind}", response_model=SpecOut, response_model_by_alias=True, responses=error_responses(422))
def get_spec(
    kind: Literal["train", "distill", "evaluate"],
    owner: CurrentOwner,
    session: SessionDep,
    settings: SettingsDep,
    arch: Annotated[Arch | None, Query()] = None,
    backbone: Annotated[Backbone | None, Query()] = None,
    weights: Annotated[str | None, Query(max_length=200, description="a torchvision detector weights name: "
                                         "its arch, classes and input size (a distillation's teacher)")] = None,
    min_size: Size = None,
    max_size: Size = None,
    max_iters: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
    num_classes: Annotated[int | None, Query(ge=1, le=10_000)] = None,
    train_dataset: Ref = None,
    val_dataset: Ref = None,
    teacher: Annotated[str | None, Query(max_length=255, description="a model (id or name): the teacher of a "
                                         "distillation, or the model an evaluation scores")] = None,
):
    """A valid request body for ``kind`` with every default and a placeholder (``<...>``) where
    you must choose, a description of each field, and the JSON Schema. The query picks defaults
    that fit a model: a weights name or a teacher (arch, classes, input size), datasets (classes),
    ``min_size`` (anchors), ``max_iters`` (warm-up, checkpoints); all within this server's limits."""
    errors: list[dict] = []

    def resolve(kind_: str, ref: str | None, field: str, getter):
        if ref is None:
            return None
        try:
            full_id = refs.resolve_id(session, kind_, owner_id=owner.id, ref=ref)
            return getter(session, owner_id=owner.id, **{f"{kind_}_id": full_id})
        except (NotFound, refs.Ambiguous) as e:
            errors.append(field_error(["query", field], str(e), "ambiguous" if isinstance(e, refs.Ambiguous) else "not_found"))
            return None

    choices = specs.SpecChoices(
        arch=arch, backbone=backbone, weights=weights, min_size=min_size, max_size=max_size, max_iters=max_iters,
        num_classes=num_classes, train=resolve("dataset", train_dataset, "train_dataset", crud.get_dataset),
        val=resolve("dataset", val_dataset, "val_dataset", crud.get_dataset),
        teacher=resolve("model", teacher, "teacher", crud.get_model),
    )
    if weights is not None:
        try:
            lookup(weights, kind="detector")
        except WeightsError as e:
            errors += [field_error(["query", "weights"], p.message, p.code) for p in e.problems]
    if errors:
        raise FieldErrors(errors)
    try:
        return specs.build_spec(kind, choices, settings)
    except ValidationError as e:  # choices that contradict each other, e.g. max_size < min_size
        raise FieldErrors([field_error(["query", *e["loc"]], e["msg"], e["type"]) for e in e.errors()]) from None
