"""The training child of a worker: ``python -m worker.runner --config JOB.json --output-dir DIR ...``.

``gid.run_job`` (``worker.tasks``) starts this module as a child process in its own session and
supervises it (lease heartbeats, cancel timeout, time limit). The runner runs the job with the
engine's launcher, ``gid_core.engine.run_job_launched`` (the job's ``devices`` DDP ranks), on the
job's output directory with ``resume=True``, so a job picked up again after its worker died
continues from its newest checkpoint. ``job_row_hooks`` is the launcher's hook factory.

Rank 0 streams to the database: progress (throttled to one write per
``GID_PROGRESS_INTERVAL_SECONDS``), the reduced training scalars as metric points every
``log_period`` iterations, and it reads the job's ``cancel_requested`` flag every
``GID_CANCEL_POLL_SECONDS``; ``CancelHook`` agrees on the decision across ranks, the trainer stops
after the same iteration everywhere and checkpoints.

With ``--evaluate`` the config is an ``EvalConfig`` (an evaluation job): the engine's evaluation
runs on its devices and the result carries its metrics (also written to ``metrics.json``).

The outcome goes to ``--result`` as JSON (written atomically): ``{"status": "completed" |
"cancelled" | "failed", "metrics", "iterations", "start_iteration", "export_dir", "error",
"error_types"}``. ``error`` is one line (exception type and message; the traceback is in the log);
``error_types`` names the exception's classes, most specific first (for a failed DDP rank, the
rank's own exception type): the supervisor decides from them, never from the message, whether a
failure is worth retrying. Exit code 0 when training ended (completed or cancelled), 1 when it failed.

Every process of the tree dies with its parent (``PR_SET_PDEATHSIG``; ``gid_core.launch`` does it
for the ranks): if the worker is killed, no orphaned rank keeps training into the job's output
directory.
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from gid_core.config import EvalConfig, JobConfig
from gid_core.engine import run_evaluation_launched, run_job_launched
from gid_core.fileio import finite_only, write_json_atomic
from gid_core.hooks import CancelHook, MetricsHook, ProgressHook
from gid_core.jobdir import JobDir
from gid_core.launch import LaunchError
from gid_core.processes import die_with_parent
from gid_core.trainer import HookBase

logger = logging.getLogger("worker.runner")

MAX_ERROR_CHARS = 4000


def describe_exception(exc: BaseException) -> str:
    """One readable line for a failure; for a failed DDP rank, the rank's own exception and which
    rank failed first. A multi-line message (a list of problems) is joined into the line."""
    if isinstance(exc, LaunchError):
        own = _one_line(exc.exc_message)
        own = f"{exc.exc_type}: {own}" if own else exc.exc_type
        return f"{own} (rank {exc.rank} failed first)"
    text = _one_line(str(exc))
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def exception_types(exc: BaseException) -> list[str]:
    """The class names of ``exc``, most specific first; for a failed rank, its exception's type
    (the launcher carries only the name)."""
    if isinstance(exc, LaunchError):
        return [exc.exc_type]
    return [cls.__name__ for cls in type(exc).__mro__ if issubclass(cls, BaseException)]


def _one_line(text: str) -> str:
    return " ".join(text.split())


# --------------------------------------------------------------------------- rank 0 -> database


class DbReporter(HookBase):
    """Rank 0's link to the job row: progress, metric points, the cancel flag.

    As a hook it records where training starts (0, or the iteration of the checkpoint it resumed
    from) and, after training, writes what is pending and closes; ``ProgressHook``,
    ``MetricsHook`` and ``CancelHook`` call its methods. Database errors never stop training:
    progress is best effort, metric points stay buffered (up to ``MAX_BUFFERED_POINTS``) and are
    retried with the next batch.
    """

    MAX_BUFFERED_POINTS = 100_000

    def __init__(
        self, job_id: str, worker_id: str, *, attempt: int | None, cancel_poll_seconds: float,
        progress_interval_seconds: float,
    ) -> None:
        from service.core.config import settings
        from service.core.db import make_engine, make_session_factory

        self.job_id, self.worker_id, self.attempt = job_id, worker_id, attempt
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

    def before_train(self) -> None:
        start = int(self.trainer.start_iter)
        self._progress.update(
            attempt=self.attempt, start_iteration=start, iteration=start, max_iters=int(self.trainer.max_iters),
            eta_seconds=None,
        )
        self._write_progress()

    def after_train(self) -> None:
        self.close()

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
        from service import leases

        try:
            with self._session() as session:
                leases.add_metric_points(session, job_id=self.job_id, points=list(self._points))
            self._points.clear()
        except Exception:
            logger.warning("could not store %d metric points (kept for the next batch)", len(self._points), exc_info=True)

    def _write_progress(self) -> None:
        from service import leases

        try:
            with self._session() as session:
                leases.update_progress(
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
        from service import leases

        try:
            with self._session() as session:
                job = leases.get_job(session, job_id=self.job_id)
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


def job_row_hooks(
    rank: int, *, job_id: str, worker_id: str, attempt: int | None, log_period: int, cancel_poll_seconds: float,
    progress_interval_seconds: float,
) -> list[HookBase]:
    """The launcher's hook factory: rank 0 reports to the job row through a ``DbReporter``.

    Every rank gets the same ``MetricsHook`` and ``CancelHook`` with the same periods (they are
    collectives); their callbacks run on rank 0 only.
    """
    if rank != 0:
        return [MetricsHook(_ignore, period=log_period), CancelHook(period=1)]
    reporter = DbReporter(
        job_id, worker_id, attempt=attempt, cancel_poll_seconds=cancel_poll_seconds,
        progress_interval_seconds=progress_interval_seconds,
    )
    return [
        ProgressHook(reporter.progress, period=1),
        MetricsHook(reporter.metrics, period=log_period),
        CancelHook(reporter.should_cancel, period=1),
        reporter,  # last: it closes after the others have reported
    ]


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
    p.add_argument("--evaluate", action="store_true", help="--config is an EvalConfig: COCO metrics, no training")
    p.add_argument("--allow-weights-download", action="store_true",
                   help="fetch torchvision weights missing from $TORCH_HOME's cache (hash-checked)")
    return p.parse_args(argv)


def run_evaluation(args: argparse.Namespace) -> dict[str, Any]:
    """An evaluation job: the engine's evaluation on its devices; its result has the metrics."""
    cfg = EvalConfig.model_validate_json(args.config.read_text())
    logger.info("evaluation on %d device(s) of %s", cfg.devices, cfg.annotations)
    if args.allow_weights_download:
        from service.weights_store import download_missing

        download_missing(cfg)
    metrics = run_evaluation_launched(cfg)
    write_json_atomic(JobDir(args.output_dir).metrics, metrics)
    return {"status": "completed", "metrics": metrics, "iterations": 0, "start_iteration": 0}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _configure_logging("runner")
    die_with_parent(args.parent_pid)
    start_iteration = JobDir(args.output_dir).checkpoint_iteration() or 0
    if args.evaluate:
        try:
            result = run_evaluation(args)
        except Exception as exc:
            traceback.print_exc()
            sys.stdout.flush()
            write_json_atomic(args.result, _failure(exc, 0))
            return 1
        write_json_atomic(args.result, result)
        logger.info("evaluation completed")
        return 0
    try:
        job = JobConfig.model_validate_json(args.config.read_text())
        logger.info(
            "%s job on %d device(s), %d iterations, output %s, newest checkpoint: %s",
            job.kind, job.devices, job.hyperparameters.max_iters, args.output_dir,
            f"iteration {start_iteration}" if start_iteration else "none",
        )
        hook_factory = None  # without a job row: no progress, no metric points, no cancel flag
        if args.job_id is not None:
            hook_factory = functools.partial(
                job_row_hooks, job_id=args.job_id, worker_id=args.worker_id or "", attempt=args.attempt,
                log_period=job.hyperparameters.log_period, cancel_poll_seconds=args.cancel_poll_seconds,
                progress_interval_seconds=args.progress_interval_seconds,
            )
        if args.allow_weights_download:
            from service.weights_store import download_missing

            for path in download_missing(job):  # once, here, rather than in every rank
                logger.info("weights file %s", path)
        result = run_job_launched(job, args.output_dir, hook_factory, resume=True)
    except Exception as exc:
        traceback.print_exc()
        sys.stdout.flush()
        write_json_atomic(args.result, _failure(exc, start_iteration))
        return 1
    write_json_atomic(args.result, result)
    logger.info("training %s at iteration %s", result.get("status"), result.get("iterations"))
    return 0


def _failure(exc: BaseException, start_iteration: int) -> dict[str, Any]:
    error = describe_exception(exc)[:MAX_ERROR_CHARS]
    return {"status": "failed", "error": error, "error_types": exception_types(exc), "start_iteration": start_iteration}


if __name__ == "__main__":
    sys.exit(main())
