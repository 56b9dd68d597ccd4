"""Prometheus metrics at ``GET /metrics`` (the text exposition format, prometheus-client).

Two sources, both right however many API processes serve (``api_workers``):

* **The database, read at scrape time** (``DatabaseCollector``): jobs by status and kind, queue
  depth and the age of the oldest queued job, finished jobs' durations (a histogram), attempts by
  outcome, and each registered worker node's heartbeat age (``service.workers``' table, read only).
  Every process reads the same rows, so any process answers the same numbers.
* **This API's own requests** (``RequestMetricsMiddleware``): a latency histogram per route
  template (``/v1/jobs/{job_id}``, never the concrete path, so the label set stays bounded),
  method and status. These live in the process that served the request: with several uvicorn
  processes ``gid serve`` sets ``PROMETHEUS_MULTIPROC_DIR`` (``<data_dir>/prometheus``, emptied at
  start, ``prepare_multiprocess_dir``) before it starts them, and a scrape sums every process's
  files (prometheus-client's multiprocess mode). A streamed response (logs ``follow``, events)
  counts its whole duration.

Access: open by default, like most exporters on an internal network; it shows counts and worker
node names, never an owner, job, dataset or token. With ``GID_METRICS_TOKEN`` set a scrape needs
``Authorization: Bearer <that token>`` (Prometheus' ``authorization`` scrape option);
``GID_METRICS_ENABLED=false`` removes the route.
"""

from __future__ import annotations

import hmac
import os
import shutil
import time
from bisect import bisect_right
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.routing import Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.core.db import session_scope
from service.models import Job, JobAttempt, Worker, utcnow
from service.status import TERMINAL_STATUSES, JobStatus

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
JOB_KINDS = ("train", "distill")
UNMATCHED = "<unmatched>"  # requests no route matched (404s): one label value, whatever the path

# Seconds: API requests, and whole jobs (minutes to days).
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
JOB_BUCKETS = (60.0, 300.0, 900.0, 1800.0, 3600.0, 3 * 3600.0, 6 * 3600.0, 12 * 3600.0, 86400.0, 3 * 86400.0, 7 * 86400.0)

# Module-level, registered nowhere: each app's registry adds it (or, in multiprocess mode, reads the
# files every process writes). prometheus-client picks its value store when it is imported, from
# PROMETHEUS_MULTIPROC_DIR: set before the API processes start (``prepare_multiprocess_dir``).
REQUEST_DURATION = Histogram(
    "gid_http_request_duration_seconds", "API request latency, from the first byte in to the last byte out",
    ["route", "method", "status"], buckets=REQUEST_BUCKETS, registry=None,
)


def prepare_multiprocess_dir(data_dir: Path) -> Path:
    """Empty ``<data_dir>/prometheus`` and point ``PROMETHEUS_MULTIPROC_DIR`` at it; call in the
    parent before the API processes start (they inherit the variable). Files of a previous run
    would add its counts to this one's."""
    path = Path(data_dir) / "prometheus"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    os.environ[MULTIPROC_ENV] = str(path)
    return path


def route_label(scope: Scope) -> str:
    """The route template that served the request (the router records it in the scope)."""
    route = scope.get("route")
    if route is None:
        return UNMATCHED
    if isinstance(route, Mount):  # the dashboard's static files: one label for the whole mount
        return f"{route.path}/{{path:path}}"
    return getattr(route, "path", UNMATCHED)


class RequestMetricsMiddleware:
    """Times each HTTP request into ``REQUEST_DURATION``: one clock read at each end and one
    histogram observation (a lock and an add, or an mmap write in multiprocess mode)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # an exception before the response started (UnexpectedErrorMiddleware answers 500)

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            REQUEST_DURATION.labels(route_label(scope), scope["method"], str(status)).observe(
                time.perf_counter() - start
            )


# --------------------------------------------------------------------------- the database


def _seconds(later: datetime, earlier: datetime) -> float:
    return max((later - earlier).total_seconds(), 0.0)


def _histogram_buckets(values: list[float], bounds: tuple[float, ...]) -> list[tuple[str, int]]:
    """Cumulative ``(le, count)`` pairs, ``+Inf`` last."""
    values = sorted(values)
    out = [(repr(bound), bisect_right(values, bound)) for bound in bounds]
    return [*out, ("+Inf", len(values))]


def attempt_outcome(cause: str | None) -> str:
    """A bounded label for a ``job_attempts.cause`` (free text: an exception's message)."""
    if cause is None:
        return "running"
    if cause in ("succeeded", "cancelled"):
        return cause
    if cause.startswith("worker lost"):
        return "lost"
    return "failed"


class DatabaseCollector(Collector):
    """Gauges and histograms read from the database at each scrape (one short read-only
    transaction, four grouped queries and one column scan of finished jobs)."""

    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self.session_factory = session_factory

    def collect(self) -> Iterator:
        with session_scope(self.session_factory) as session:
            now = utcnow()
            yield from self._jobs(session, now)
            yield self._durations(session)
            yield self._attempts(session)
            yield from self._workers(session, now)

    def _jobs(self, session: Session, now: datetime) -> Iterator:
        counts = {(status, kind): 0 for status in JobStatus for kind in JOB_KINDS}
        for status, kind, n in session.execute(select(Job.status, Job.kind, func.count()).group_by(Job.status, Job.kind)):
            counts[(status, kind)] = int(n)
        jobs = GaugeMetricFamily("gid_jobs", "Jobs by status and kind", labels=["status", "kind"])
        for (status, kind), n in sorted(counts.items()):
            jobs.add_metric([str(status), kind], n)
        yield jobs
        queued = sum(n for (status, _), n in counts.items() if status == JobStatus.QUEUED)
        yield GaugeMetricFamily("gid_queue_depth", "Jobs waiting for a worker (status queued)", value=queued)
        oldest = session.scalar(select(func.min(Job.created_at)).where(Job.status == JobStatus.QUEUED.value))
        yield GaugeMetricFamily(
            "gid_queue_oldest_age_seconds", "Age of the oldest queued job (0: none queued)",
            value=_seconds(now, oldest) if oldest is not None else 0.0,
        )

    def _durations(self, session: Session) -> HistogramMetricFamily:
        rows = session.execute(
            select(Job.kind, Job.status, Job.started_at, Job.finished_at).where(
                Job.status.in_([str(s) for s in TERMINAL_STATUSES]),
                Job.started_at.is_not(None), Job.finished_at.is_not(None),
            )
        ).all()
        by_label: dict[tuple[str, str], list[float]] = {}
        for kind, status, started, finished in rows:
            by_label.setdefault((kind, status), []).append(_seconds(finished, started))
        family = HistogramMetricFamily(
            "gid_job_duration_seconds", "Finished jobs: first start to the end, by kind and final status",
            labels=["kind", "status"],
        )
        for (kind, status), values in sorted(by_label.items()):
            family.add_metric([kind, status], _histogram_buckets(values, JOB_BUCKETS), sum_value=sum(values))
        return family

    def _attempts(self, session: Session) -> CounterMetricFamily:
        counts: dict[str, int] = {}
        for cause, n in session.execute(select(JobAttempt.cause, func.count()).group_by(JobAttempt.cause)):
            outcome = attempt_outcome(cause)
            counts[outcome] = counts.get(outcome, 0) + int(n)
        family = CounterMetricFamily(
            "gid_job_attempts", "Runs of jobs by outcome (running, succeeded, cancelled, lost, failed)",
            labels=["outcome"],
        )
        for outcome in ("running", "succeeded", "cancelled", "lost", "failed"):
            family.add_metric([outcome], counts.get(outcome, 0))
        return family

    def _workers(self, session: Session, now: datetime) -> Iterator:
        rows = session.execute(select(Worker.id, Worker.kind, Worker.slots, Worker.heartbeat_at).order_by(Worker.id)).all()
        age = GaugeMetricFamily(
            "gid_worker_heartbeat_age_seconds", "Seconds since each registered worker node's last heartbeat",
            labels=["worker", "kind"],
        )
        slots = GaugeMetricFamily("gid_worker_slots", "Jobs each registered worker node runs at once",
                                  labels=["worker", "kind"])
        for worker_id, kind, n_slots, heartbeat in rows:
            age.add_metric([worker_id, kind], _seconds(now, heartbeat))
            slots.add_metric([worker_id, kind], n_slots)
        yield GaugeMetricFamily("gid_workers_registered", "Registered worker nodes (live or not)", value=len(rows))
        yield age
        yield slots


# --------------------------------------------------------------------------- the route


def build_registry(session_factory: sessionmaker[Session]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    if os.environ.get(MULTIPROC_ENV):
        MultiProcessCollector(registry)  # every API process's request metrics
    else:
        registry.register(REQUEST_DURATION)
    registry.register(DatabaseCollector(session_factory))
    return registry


def add_metrics(app: FastAPI) -> None:
    """``GET /metrics`` and the request timing middleware, unless ``metrics_enabled`` is off."""
    settings = app.state.settings
    if not settings.metrics_enabled:
        return
    registry = build_registry(app.state.read_session_factory)
    app.add_middleware(RequestMetricsMiddleware)

    @app.get("/metrics", include_in_schema=False)
    def metrics(request: Request) -> Response:
        token = request.app.state.settings.metrics_token
        if token is not None and not _bearer_matches(request.headers.get("authorization"), token):
            return Response("metrics token required\n", status_code=401, media_type="text/plain",
                            headers={"WWW-Authenticate": "Bearer"})
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def _bearer_matches(header: str | None, token: str) -> bool:
    scheme, _, given = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())
