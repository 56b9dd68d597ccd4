"""The training child of a worker: ``python -m worker.runner --config JOB.json --output-dir DIR ...``.

``gid.run_job`` (``worker.tasks``) starts this module as a child process in its own session and
supervises it (lease heartbeats, cancel timeout, time limit). The runner spawns the job's
``devices`` DDP ranks with ``gid_core.launch`` and each rank calls ``gid_core.engine.run_job`` on
the job's output directory with ``resume=True``, so a job picked up again after its worker died
continues from its newest checkpoint.

Rank 0 streams to the database: progress (throttled to one write per
``GID_PROGRESS_INTERVAL_SECONDS``), the reduced training scalars as metric points every
``log_period`` iterations, and it reads the job's ``cancel_requested`` flag every
``GID_CANCEL_POLL_SECONDS``; ``CancelHook`` agrees on the decision across ranks, the trainer stops
after the same iteration everywhere and checkpoints.

The outcome goes to ``--result`` as JSON (written atomically): ``{"status": "completed" |
"cancelled" | "failed", "metrics", "iterations", "start_iteration", "export_dir", "error"}``.
Exit code 0 when training ended (completed or cancelled), 1 when it failed.

Every process of the tree dies with its parent (``PR_SET_PDEATHSIG``): if the worker is killed,
no orphaned rank keeps training into the job's output directory.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gid_core.config import JobConfig
from gid_core.engine import run_job
from gid_core.hooks import CancelHook, HookBase, MetricsHook, ProgressHook
from gid_core.launch import launch
from worker.files import checkpoint_iteration, die_with_parent, finite_only, write_json_atomic

logger = logging.getLogger("worker.runner")

MAX_ERROR_CHARS = 4000


def describe_exception(exc: BaseException) -> str:
    """One readable line for a failure; for a failed DDP rank, the rank's own exception line
    followed by which rank it was (``gid_core.launch`` puts the child's traceback in the message)."""
    text = str(exc).strip()
    if "Traceback (most recent call last)" in text:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        header = next((ln.strip() for ln in lines if ln.startswith("-- ")), "")  # "-- rank 1 failed first:"
        last = lines[-1].strip()
        return f"{last} ({header.strip('-: ')})" if header else last
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --------------------------------------------------------------------------- rank 0 -> database


class DbReporter:
    """Rank 0's link to the job row: progress, metric points, the cancel flag.

    Database errors never stop training: progress is best effort, metric points stay buffered
    (up to ``MAX_BUFFERED_POINTS``) and are retried with the next batch.
    """

    MAX_BUFFERED_POINTS = 100_000

    def __init__(
        self, job_id: str, worker_id: str, *, cancel_poll_seconds: float, progress_interval_seconds: float
    ) -> None:
        from service.core.config import settings
        from service.core.db import make_engine, make_session_factory

        self.job_id, self.worker_id = job_id, worker_id
        self.cancel_poll_seconds = cancel_poll_seconds
        self.progress_interval_seconds = progress_interval_seconds
        self._engine = make_engine(settings.database_url)
        self._factory = make_session_factory(self._engine)
        self._points: list[tuple[str, int, float]] = []
        self._progress: dict[str, Any] = {}
        self._latest_metrics: dict[str, Any] | None = None
        self._last_progress_write = -math.inf
        self._last_cancel_check = -math.inf
        self._cancel = False

    def _session(self):
        from service.core.db import session_scope

        return session_scope(self._factory)

    def set_start(self, start_iteration: int, max_iters: int, attempt: int | None) -> None:
        """Where this attempt starts: 0, or the iteration of the checkpoint it resumed from."""
        self._progress.update(
            attempt=attempt, start_iteration=start_iteration, iteration=start_iteration, max_iters=max_iters,
            eta_seconds=None,
        )
        self._write_progress()

    def progress(self, info: dict[str, Any]) -> None:
        """``ProgressHook`` callback."""
        self._progress.update(finite_only(info))
        last = info.get("max_iters") is not None and info.get("iteration", 0) >= info["max_iters"]
        if last or time.monotonic() - self._last_progress_write >= self.progress_interval_seconds:
            self._write_progress()

    def metrics(self, iteration: int, metrics: dict[str, float]) -> None:
        """``MetricsHook`` callback: one batch of points per report, plus the latest values."""
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        self._points.extend((name, int(iteration), value) for name, value in sorted(clean.items()))
        self._points = self._points[-self.MAX_BUFFERED_POINTS :]
        self._latest_metrics = {**clean, "iteration": int(iteration)}
        self.flush()
        self._write_progress()

    def flush(self) -> None:
        if not self._points:
            return
        from service import crud

        try:
            with self._session() as session:
                crud.add_metric_points(session, job_id=self.job_id, points=list(self._points))
            self._points.clear()
        except Exception:
            logger.warning("could not store %d metric points (kept for the next batch)", len(self._points), exc_info=True)

    def _write_progress(self) -> None:
        from service import crud

        try:
            with self._session() as session:
                crud.update_progress(
                    session,
                    job_id=self.job_id,
                    worker_id=self.worker_id,
                    progress=dict(self._progress),
                    latest_metrics=self._latest_metrics,
                )
            self._last_progress_write = time.monotonic()
        except Exception:
            logger.warning("could not store progress", exc_info=True)

    def should_cancel(self) -> bool:
        """``CancelHook`` callback: the job's cancel flag, read at most every ``cancel_poll_seconds``."""
        if self._cancel:
            return True
        now = time.monotonic()
        if now - self._last_cancel_check < self.cancel_poll_seconds:
            return False
        self._last_cancel_check = now
        from service import crud

        try:
            with self._session() as session:
                job = crud.get_job(session, job_id=self.job_id)
                self._cancel = job is None or bool(job.cancel_requested)
        except Exception:
            logger.warning("could not read the cancel flag", exc_info=True)
        if self._cancel:
            logger.info("cancel requested: stopping after this iteration")
        return self._cancel

    def close(self) -> None:
        self.flush()
        self._write_progress()
        self._engine.dispose()


# --------------------------------------------------------------------------- the ranks


@dataclass(frozen=True)
class RankSpec:
    """Everything a rank needs (picklable: it crosses the spawn boundary)."""

    job_json: str
    output_dir: str
    job_id: str | None  # None: run without a database (no progress, no cancel flag)
    worker_id: str | None
    runner_pid: int
    attempt: int | None = None
    cancel_poll_seconds: float = 1.0
    progress_interval_seconds: float = 1.0


class StartHook(HookBase):
    """Records where training starts: 0, or the iteration of the checkpoint it resumed from."""

    def __init__(self, reporter: DbReporter | None, attempt: int | None) -> None:
        self.reporter = reporter
        self.attempt = attempt
        self.start_iteration: int | None = None

    def before_train(self) -> None:
        self.start_iteration = int(self.trainer.start_iter)
        if self.start_iteration > 0:
            logger.info("resumed from checkpoint at iteration %d", self.start_iteration)
        if self.reporter is not None:
            self.reporter.set_start(self.start_iteration, int(self.trainer.max_iters), self.attempt)


def run_rank(rank: int, world_size: int, spec: RankSpec) -> dict[str, Any] | None:
    """One DDP rank (called by ``gid_core.launch.launch`` after the process group is up)."""
    if world_size > 1:
        die_with_parent(spec.runner_pid)
        _configure_logging(f"rank{rank}")
    job = JobConfig.model_validate_json(spec.job_json)
    reporter = None
    if rank == 0 and spec.job_id is not None:
        reporter = DbReporter(
            spec.job_id,
            spec.worker_id or "",
            cancel_poll_seconds=spec.cancel_poll_seconds,
            progress_interval_seconds=spec.progress_interval_seconds,
        )
    start = StartHook(reporter, spec.attempt)
    # The same hooks with the same periods on every rank: MetricsHook and CancelHook are collectives.
    hooks = [
        start,
        ProgressHook(reporter.progress if reporter else _ignore, period=1),
        MetricsHook(reporter.metrics if reporter else _ignore, period=job.hyperparameters.log_period),
        CancelHook(reporter.should_cancel if reporter else None, period=1),
    ]
    try:
        result = run_job(job, output_dir=Path(spec.output_dir), hooks=hooks, resume=True)
    finally:
        if reporter is not None:
            reporter.close()
    if rank != 0:
        return None
    out = finite_only(dict(result))
    out["start_iteration"] = start.start_iteration
    if out.get("export_dir") is not None:
        out["export_dir"] = str(out["export_dir"])
    return out


def _ignore(*_args: Any) -> None:
    return None


# --------------------------------------------------------------------------- main


def _configure_logging(name: str) -> None:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stdout,
        format=f"%(asctime)s %(levelname)s [{name}] %(name)s: %(message)s",
        force=True,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m worker.runner", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, type=Path, help="gid_core JobConfig JSON")
    p.add_argument("--output-dir", required=True, type=Path)
    p.add_argument("--result", required=True, type=Path, help="where the outcome JSON is written")
    p.add_argument("--job-id", help="job row to report to (omit to run without a database)")
    p.add_argument("--worker-id", help="lease owner (with --job-id)")
    p.add_argument("--attempt", type=int, help="attempt number, reported in the progress")
    p.add_argument("--parent-pid", type=int, help="die if this process is no longer the parent")
    p.add_argument("--cancel-poll-seconds", type=float, default=1.0)
    p.add_argument("--progress-interval-seconds", type=float, default=1.0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _configure_logging("runner")
    die_with_parent(args.parent_pid)
    start_iteration = checkpoint_iteration(args.output_dir) or 0
    try:
        job = JobConfig.model_validate_json(args.config.read_text())
        logger.info(
            "%s job on %d device(s), %d iterations, output %s, newest checkpoint: %s",
            job.kind, job.devices, job.hyperparameters.max_iters, args.output_dir,
            f"iteration {start_iteration}" if start_iteration else "none",
        )
        spec = RankSpec(
            job_json=job.model_dump_json(),
            output_dir=str(args.output_dir),
            job_id=args.job_id,
            worker_id=args.worker_id,
            runner_pid=os.getpid(),
            attempt=args.attempt,
            cancel_poll_seconds=args.cancel_poll_seconds,
            progress_interval_seconds=args.progress_interval_seconds,
        )
        result = launch(run_rank, job.devices, spec)
    except Exception as exc:
        traceback.print_exc()
        sys.stdout.flush()
        error = describe_exception(exc)[:MAX_ERROR_CHARS]
        write_json_atomic(args.result, {"status": "failed", "error": error, "start_iteration": start_iteration})
        return 1
    write_json_atomic(args.result, result)
    logger.info("training %s at iteration %s", result.get("status"), result.get("iterations"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
