"""``/v1/weights``: torchvision's published weights the server knows by name, and its cache of them.

Jobs name them (``teacher.weights``, ``student.backbone_weights``); a job whose file is not in the
cache is refused at submission unless the worker may download (``GID_ALLOW_WEIGHTS_DOWNLOAD``).
``PUT /v1/weights/{name}`` places a file the user downloaded: the raw request body, accepted only
if its sha256 starts with the hash prefix in torchvision's file name (torch.hub's own check).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

import anyio.from_thread
from fastapi import APIRouter, Path, Request
from fastapi.concurrency import run_in_threadpool

from service import weights_store
from service.api.deps import CurrentOwner, SettingsDep
from service.api.limits import StrictJSONRoute
from service.api.responses import AUTHENTICATED, error_responses
from service.schemas import WeightsOut, WeightsStored

router = APIRouter(prefix="/v1/weights", tags=["weights"], route_class=StrictJSONRoute, responses=AUTHENTICATED)

# A name holds a ':' and a '.' but no '/': one path segment.
NAME_PATH = "/{name}"
Name = Annotated[str, Path(min_length=1, max_length=200, description="e.g. torchvision:ResNet50_Weights.IMAGENET1K_V2")]


@router.get("", response_model=list[WeightsOut])
def list_weights(_: CurrentOwner, settings: SettingsDep):
    """Every name a job may use, with the file it resolves to and whether the server has it."""
    return weights_store.list_weights(settings)


@router.get(NAME_PATH, response_model=WeightsOut, responses=error_responses(404))
def get_weights(name: Name, _: CurrentOwner, settings: SettingsDep):
    return weights_store.describe(weights_store.find(name), settings)


@router.put(
    NAME_PATH, response_model=WeightsStored, responses=error_responses(404),
    openapi_extra={"requestBody": {"required": True, "content": {"application/octet-stream": {
        "schema": {"type": "string", "format": "binary"}}}}},
)
async def put_weights(name: Name, request: Request, _: CurrentOwner, settings: SettingsDep):
    """Upload torchvision's file for ``name`` (the raw body, e.g. ``curl -T file``). 422 when its
    sha256 does not start with the prefix in the file name; the cache then keeps what it had."""
    spec = weights_store.find(name)
    chunks = _body_chunks(request)
    return await run_in_threadpool(weights_store.store, chunks, spec, settings)


def _body_chunks(request: Request) -> Iterator[bytes]:
    """The request body as a blocking iterator, for a worker thread: each chunk is awaited on the
    event loop, so the body streams to disk without being held in memory."""
    stream = request.stream().__aiter__()

    async def next_chunk() -> bytes | None:
        try:
            return await stream.__anext__()
        except StopAsyncIteration:
            return None

    while (chunk := anyio.from_thread.run(next_chunk)) is not None:
        if chunk:
            yield chunk
