"""The FastAPI application: ``create_app(settings)``.

Run it with ``uvicorn --factory service.main:create_app``. Start-up migrates the database to the
newest Alembic revision before the first request is served. Every ``/v1`` route needs
``Authorization: Bearer <token>``; ``/healthz``, ``/readyz``, the OpenAPI pages (``/docs``) and
``/metrics`` (``service.prometheus``: its own optional token) do not.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.limits import BodySizeLimitMiddleware
from service.api.docs import add_local_docs
from service.api.routes import datasets, health, jobs, models, specs, usage, weights
from service.api.routes import events as job_events
from service.api.routes import experiments as experiment_routes
from service.api.routes import instances as gi_instances
from service.core.config import Settings
from service.core.config import settings as default_settings
from service.core.db import make_engine, make_session_factory
from service.dashboard import mount_dashboard
from service.errors import Conflict, FieldErrors, NotFound, field_error
from service.lookup import Ambiguous
from service.migrate import upgrade_to_head
from service.prometheus import add_metrics
from service.models import IllegalTransition
from service.storage import Storage, UploadTooLarge

log = logging.getLogger(__name__)
UPLOAD_PATHS = frozenset({"/v1/datasets", "/v1/models"})
PUT_UPLOAD_PREFIXES = ("/v1/weights/",)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or default_settings
    engine = make_engine(settings.database_url)
    read_engine = make_engine(settings.database_url, read_only=True)  # GET requests (see core/db.py)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await run_in_threadpool(upgrade_to_head, settings.database_url)
        await run_in_threadpool(app.state.storage.purge_stale_tmp)
        # torch's hub cache is the service's (the user's TORCH_HOME does not decide): anything in
        # this process that resolves torchvision weights looks where the uploads go
        os.environ["TORCH_HOME"] = str(settings.torch_home)
        log.info("database at head; data in %s", settings.data_dir)
        yield
        engine.dispose()
        read_engine.dispose()

    app = FastAPI(
        title="GID training service",
        description="General Instance Distillation for object detection: datasets, models, jobs.",
        version="1.0.0",
        lifespan=lifespan,
        docs_url=None,  # served by add_local_docs: FastAPI's own pages load their assets from a CDN
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.session_factory = make_session_factory(engine)
    app.state.read_session_factory = make_session_factory(read_engine)
    app.state.storage = Storage(settings.data_dir)
    app.add_middleware(BodySizeLimitMiddleware, upload_paths=UPLOAD_PATHS, put_upload_prefixes=PUT_UPLOAD_PREFIXES)
    app.add_middleware(UnexpectedErrorMiddleware)  # outermost of ours: sees every escaped exception
    add_metrics(app)  # GET /metrics; its timing middleware wraps the one above (sees its 500s)
    _add_error_handlers(app)
    for module in (health, datasets, models, jobs, job_events, usage, weights, specs, experiment_routes):
        app.include_router(module.router)
    add_local_docs(app)  # before any mount at "/", which would shadow /docs
    app.include_router(gi_instances.router)
    mount_dashboard(app)  # the web dashboard at / (static files, no build step)
    return app


class UnexpectedErrorMiddleware:
    """A bug's exception becomes a logged 500 JSON response, and goes no further.

    Starlette's own handler re-raises after answering, and uvicorn then closes the connection, so
    the client's next request on that keep-alive connection fails too. Here the exception stops:
    the connection stays usable. Once a response has started nothing can be sent, so it propagates.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            if started:
                raise
            log.exception("unexpected error in %s %s", scope["method"], scope["path"])
            await JSONResponse({"detail": "internal server error"}, status_code=500)(scope, receive, send)


def _safe_validation_error(error: dict) -> dict:
    """``error`` with its echoed ``input`` / ``ctx`` dropped where JSON cannot carry them (bytes
    that are not UTF-8, NaN, nesting deeper than the encoder's stack)."""
    out = {key: error[key] for key in ("type", "loc", "msg") if key in error}
    for key in ("input", "ctx"):
        if key in error:
            try:
                value = jsonable_encoder(error[key])
                json.dumps(value, allow_nan=False)
            except (ValueError, TypeError, RecursionError):  # UnicodeDecodeError is a ValueError
                continue
            out[key] = value
    return out


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": [_safe_validation_error(e) for e in exc.errors()]}, status_code=422)

    @app.exception_handler(FieldErrors)
    async def _field_errors(_: Request, exc: FieldErrors) -> JSONResponse:
        return JSONResponse({"detail": exc.errors}, status_code=exc.status_code)

    @app.exception_handler(NotFound)
    async def _not_found(_: Request, exc: NotFound) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(Ambiguous)
    async def _ambiguous(_: Request, exc: Ambiguous) -> JSONResponse:
        # A path parameter that fits several rows (service.lookup): the candidates, as data.
        error = field_error(["path", f"{exc.kind}_id"], str(exc), "ambiguous")
        return JSONResponse({"detail": [{**error, "ctx": {"candidates": exc.candidates}}]}, status_code=409)

    @app.exception_handler(Conflict)
    @app.exception_handler(IllegalTransition)
    async def _conflict(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409)

    @app.exception_handler(UploadTooLarge)
    async def _too_large(_: Request, exc: UploadTooLarge) -> JSONResponse:
        return JSONResponse({"detail": [field_error(["body", exc.field], str(exc), "too_large")]}, status_code=413)
