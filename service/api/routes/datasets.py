"""``/v1/datasets``: register a COCO dataset (server path or upload), list, get."""

from __future__ import annotations

import json
from typing import Annotated, NamedTuple

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from gid_core.fileio import loads_finite
from service import crud, datasets, deletion
from service.api.deps import CurrentOwner, DatasetId, SessionDep, SettingsDep, StorageDep
from service.api.limits import MAX_QUERY_INT, StrictJSONRoute
from service.api.responses import AUTHENTICATED, error_responses
from service.errors import FieldErrors, field_error
from service.schemas import DatasetOut, DatasetPathCreate, Page

router = APIRouter(prefix="/v1/datasets", tags=["datasets"], route_class=StrictJSONRoute, responses=AUTHENTICATED)

_REQUEST_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": DatasetPathCreate.model_json_schema()},
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["name", "images"],
                "properties": {
                    "name": {"type": "string", "maxLength": 200},
                    "annotations": {"type": "string", "format": "binary",
                                    "description": "COCO JSON; required unless unlabeled (then optional: a COCO "
                                                   "file listing the images, without annotations)"},
                    "images": {"type": "string", "format": "binary", "description": "zip of the images"},
                    "unlabeled": {"type": "boolean", "default": False,
                                  "description": "images without labels, for a distillation job's unlabeled_dataset"},
                },
            }
        },
    },
}


@router.post(
    "", status_code=201, response_model=DatasetOut, openapi_extra={"requestBody": _REQUEST_BODY},
    responses=error_responses(400, 403),
)
async def register_dataset(
    request: Request, owner: CurrentOwner, session: SessionDep, settings: SettingsDep, storage: StorageDep
):
    """Register by server paths (JSON, inside the configured data roots) or by upload (multipart)."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        async with request.form(max_files=2, max_fields=4) as form:
            upload = _upload_fields(form)
            return await run_in_threadpool(
                datasets.register_upload, session, owner_id=owner.id, name=upload.name,
                annotations=upload.annotations.file if upload.annotations else None, images_zip=upload.images.file,
                storage=storage, settings=settings, unlabeled=upload.unlabeled,
            )
    spec = _path_body(await request.body())
    return await run_in_threadpool(
        datasets.register_by_path, session, owner_id=owner.id, name=spec.name, annotations=spec.annotations,
        images=spec.images, roots=settings.data_roots, store=storage.root, unlabeled=spec.unlabeled,
    )


@router.get("", response_model=Page[DatasetOut])
def list_datasets(
    owner: CurrentOwner, session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50, offset: Annotated[int, Query(ge=0, le=MAX_QUERY_INT)] = 0,
):
    items, total = crud.list_datasets(session, owner_id=owner.id, limit=limit, offset=offset)
    return Page(items=items, total=total, limit=limit, offset=offset)


@router.get("/{dataset_id}", response_model=DatasetOut, responses=error_responses(404))
def get_dataset(dataset_id: DatasetId, owner: CurrentOwner, session: SessionDep):
    return crud.get_dataset(session, owner_id=owner.id, dataset_id=dataset_id)


def _path_body(raw: bytes) -> DatasetPathCreate:
    try:
        # Parsed here, not by pydantic's JSON mode, which accepts NaN and Infinity.
        return DatasetPathCreate.model_validate(loads_finite(raw))
    except json.JSONDecodeError as e:
        raise FieldErrors.one(["body"], f"must be a JSON object: {e.msg}", "json_invalid") from None
    except ValidationError as e:
        errors = [{**err, "loc": ("body", *err["loc"])} for err in e.errors(include_url=False)]
        raise RequestValidationError(errors) from None


class _Upload(NamedTuple):
    name: str
    annotations: UploadFile | None
    images: UploadFile
    unlabeled: bool


_BOOLEAN_FORM_VALUES = {"true": True, "1": True, "false": False, "0": False}


def _upload_fields(form) -> _Upload:
    errors = []
    name = form.get("name")
    if not isinstance(name, str) or not 1 <= len(name) <= 200:
        errors.append(field_error(["body", "name"], "required, 1 to 200 characters", "missing"))
    unlabeled = form.get("unlabeled", "false")
    if not isinstance(unlabeled, str) or unlabeled.lower() not in _BOOLEAN_FORM_VALUES:
        errors.append(field_error(["body", "unlabeled"], "must be true or false", "bool_parsing"))
        unlabeled = "false"
    unlabeled = _BOOLEAN_FORM_VALUES[unlabeled.lower()]
    if not isinstance(form.get("images"), UploadFile):
        errors.append(field_error(["body", "images"], "required file", "missing"))
    annotations = form.get("annotations")
    if annotations is not None and not isinstance(annotations, UploadFile):
        errors.append(field_error(["body", "annotations"], "must be a file", "missing"))
    elif annotations is None and not unlabeled:
        errors.append(field_error(["body", "annotations"], "required file unless unlabeled is true", "missing"))
    if errors:
        raise FieldErrors(errors)
    return _Upload(name, annotations, form["images"], unlabeled)


@router.delete("/{dataset_id}", status_code=204, responses=error_responses(404, 409))
def delete_dataset(dataset_id: DatasetId, owner: CurrentOwner, session: SessionDep, storage: StorageDep) -> None:
    """Delete a dataset: an uploaded one's files are freed; one registered by path is only
    unregistered (its folder is yours). 409 while a queued or running job uses it; finished jobs
    keep its id, which answers 404 from now on."""
    deletion.delete_dataset(session, storage, owner_id=owner.id, dataset_id=dataset_id)
