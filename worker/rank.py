"""One rank of a multi-node job: ``torchrun ... -m worker.rank --config JOB.json ...``.

``worker.node`` starts ``torch.distributed.run`` (torch elastic, c10d rendezvous) on every node of
the gang; the elastic agent starts this module ``devices`` times with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT`` set. Each rank joins the process group with a
bounded collective timeout (a lost peer ends the attempt), runs the engine with the same hooks as
a single-node job (``worker.runner.job_row_hooks``: global rank 0 reports to the job row, writes
metrics and checkpoints into the shared job folder) and resumes from the newest checkpoint.

Outcome, in the shared job folder: global rank 0 writes ``--result`` (as ``worker.runner`` does);
a rank that raises writes ``rank_failure_path(result, rank)`` with its exception, so node 0 can
tell which rank failed first and whether a retry may help (``first_rank_failure``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from gid_core.fileio import read_json, write_json_atomic


def rank_failure_path(result: Path, rank: int) -> Path:
    return result.with_name(f"{result.name}.rank{rank}")


def first_rank_failure(result: Path) -> dict[str, Any] | None:
    """The failure of the rank that failed first (the others mostly fail because of it)."""
    records = [read_json(p) for p in result.parent.glob(f"{result.name}.rank*")]
    records = [r for r in records if isinstance(r, dict)]
    return min(records, key=lambda r: r.get("time", 0.0)) if records else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m worker.rank", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, type=Path)
    p.add_argument("--output-dir", required=True, type=Path)
    p.add_argument("--result", required=True, type=Path)
    p.add_argument("--job-id", required=True)
    p.add_argument("--worker-id", required=True, help="the job's lease owner (node 0's task)")
    p.add_argument("--attempt", type=int)
    p.add_argument("--cancel-poll-seconds", type=float, default=1.0)
    p.add_argument("--progress-interval-seconds", type=float, default=1.0)
    p.add_argument("--collective-timeout-seconds", type=float, default=60.0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from gid_core.processes import die_with_parent

    die_with_parent(os.getppid())  # the elastic agent: no rank outlives its node's launcher
    from gid_core.config import JobConfig
    from gid_core.engine import run_job
    from gid_core.launch import destroy, init_from_env
    from worker.runner import _configure_logging, describe_exception, exception_types, job_row_hooks

    rank = int(os.environ.get("RANK", "0"))
    _configure_logging(f"rank {rank}")
    try:
        job = JobConfig.model_validate_json(args.config.read_text())
        rank, world_size, _ = init_from_env(timeout=datetime.timedelta(seconds=args.collective_timeout_seconds))
        hooks = job_row_hooks(
            rank, job_id=args.job_id, worker_id=args.worker_id, attempt=args.attempt,
            log_period=job.hyperparameters.log_period, cancel_poll_seconds=args.cancel_poll_seconds,
            progress_interval_seconds=args.progress_interval_seconds,
        )
        result = run_job(job, output_dir=args.output_dir, hooks=hooks, resume=True, rank=rank, world_size=world_size)
    except Exception as exc:
        traceback.print_exc()
        write_json_atomic(rank_failure_path(args.result, rank), {
            "status": "failed", "error": describe_exception(exc)[:4000], "error_types": exception_types(exc),
            "rank": rank, "time": time.time(),
        })
        sys.stdout.flush()
        os._exit(1)  # no process-group teardown: a peer is gone, its collectives would hang
    if rank == 0:
        write_json_atomic(args.result, result)
    destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
