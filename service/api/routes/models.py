"""``/v1/models``: upload a detector checkpoint (checked against its arch), list, get, download."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool

from service import checkpoints, crud, deletion
from service.api.deps import CurrentOwner, ModelId, SessionDep, SettingsDep, StorageDep
from service.api.files import FILE_RESPONSES, file_response
from service.api.limits import MAX_QUERY_INT, StrictJSONRoute
from service.api.responses import AUTHENTICATED, error_responses
from service.schemas import ModelOut, Page

router = APIRouter(prefix="/v1/models", tags=["models"], route_class=StrictJSONRoute, responses=AUTHENTICATED)


@router.post("", status_code=201, response_model=ModelOut, responses=error_responses(400))
async def upload_model(
    owner: CurrentOwner,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    file: Annotated[UploadFile, File(description=".safetensors, or a .pt/.pth state_dict (weights-only)")],
    config: Annotated[str, Form(description="JSON ModelConfig: arch, backbone, num_classes, ...")],
    name: Annotated[str, Form(max_length=200)],
    categories: Annotated[str | None, Form(description="JSON list of category names, label order")] = None,
):
    spec, names, suffix = checkpoints.parse_model_form(name, config, categories, file.filename)
    return await run_in_threadpool(
        checkpoints.register_upload, session, owner_id=owner.id, name=name, spec=spec, categories=names,
        suffix=suffix, fileobj=file.file, storage=storage, settings=settings,
    )


@router.get("", response_model=Page[ModelOut])
def list_models(
    owner: CurrentOwner, session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50, offset: Annotated[int, Query(ge=0, le=MAX_QUERY_INT)] = 0,
):
    items, total = crud.list_models(session, owner_id=owner.id, limit=limit, offset=offset)
    return Page(items=items, total=total, limit=limit, offset=offset)


@router.get("/{model_id}", response_model=ModelOut, responses=error_responses(404))
def get_model(model_id: ModelId, owner: CurrentOwner, session: SessionDep):
    return crud.get_model(session, owner_id=owner.id, model_id=model_id)


@router.get("/{model_id}/download", responses={**FILE_RESPONSES, **error_responses(404)})
def download_model(model_id: ModelId, request: Request, owner: CurrentOwner, session: SessionDep):
    model = crud.get_model(session, owner_id=owner.id, model_id=model_id)
    suffix = model.path[model.path.rfind(".") :]
    return file_response(request, model.path, sha256=model.sha256, filename=f"{model.id}{suffix}")


@router.delete("/{model_id}", status_code=204, responses=error_responses(404, 409))
def delete_model(model_id: ModelId, owner: CurrentOwner, session: SessionDep, storage: StorageDep) -> None:
    """Delete a model and free its file. 409 while a queued or running job uses it (teacher or
    initial weights); finished jobs keep its id, which answers 404 from now on."""
    deletion.delete_model(session, storage, owner_id=owner.id, model_id=model_id)
