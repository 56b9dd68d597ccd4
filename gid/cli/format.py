"""How the CLI shows things: a job, its progress (bar or lines), tables, an experiment's
comparison, a spec as commented YAML. Pure text: no requests, no argument parsing."""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from typing import Any, TextIO

from gid.client import Job
from service.status import JobStatus

AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def format_job(job: Job, artifacts: list[dict[str, Any]] | None = None) -> str:
    progress = job.get("progress") or {}
    cancelling = job.get("cancel_requested") and job["status"] == JobStatus.RUNNING
    lines = [
        f"job       {job['id']}" + (f"  ({job['name']})" if job.get("name") else ""),
        f"kind      {job['kind']}",
        f"status    {job['status']}" + ("  (cancel requested)" if cancelling else ""),
        f"progress  {progress_text(job)}" + (f"  ETA {duration_text(eta)}" if (eta := progress.get("eta_seconds"))
                                              and job["status"] == JobStatus.RUNNING else ""),
        f"attempts  {job.get('attempts', 0)}",
    ]
    if job.get("tags"):
        lines.append(f"tags      {', '.join(job['tags'])}")
    if (elapsed := job_duration(job)) is not None:
        lines.append(f"duration  {duration_text(elapsed)}")
    if job.get("output_model_id"):
        lines.append(f"model     {job['output_model_id']}")
    metrics = job.get("final_metrics") or {}
    if metrics:
        ap = "  ".join(f"{k} {metrics[k]:.2f}%" for k in AP_KEYS if isinstance(metrics.get(k), (int, float)))
        lines.append(f"metrics   {ap}  (COCO AP, percent)")
    if job.get("error"):
        lines.append("error     " + job["error"].replace("\n", "\n          "))
    for i, artifact in enumerate(artifacts or []):
        lines.append(("artifacts " if i == 0 else " " * 10) + f"{artifact['name']}  ({size_text(artifact['size'])})")
    return "\n".join(lines)


def progress_text(job: Job) -> str:
    progress = job.get("progress") or {}
    iteration, total = progress.get("iteration") or 0, progress.get("max_iters")
    return f"{iteration}/{total} it ({100 * iteration / total:.0f}%)" if total else f"{iteration} it"


def job_duration(job: Job) -> float | None:
    """Seconds from start to end (to now while it runs); None before it starts."""
    if not job.get("started_at"):
        return None
    start = datetime.fromisoformat(job["started_at"])
    end = datetime.fromisoformat(job["finished_at"]) if job.get("finished_at") else datetime.now(timezone.utc)
    return max(0.0, (end - start).total_seconds())


def duration_text(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h {rest // 60:02d}m" if hours else f"{rest // 60}m {rest % 60:02d}s"


def size_text(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(size)


def job_row(job: Job) -> dict[str, Any]:
    """A row of `gid jobs list`: id prefix (enough for every command), progress, AP, duration."""
    ap = (job.get("final_metrics") or {}).get("AP")
    elapsed = job_duration(job)
    return {**job, "id": job["id"][:8], "progress": progress_text(job),
            "AP": f"{ap:.1f}%" if isinstance(ap, (int, float)) else None,
            "duration": duration_text(elapsed) if elapsed is not None else None}


def print_rows(rows: list[dict[str, Any]], columns: list[str]) -> None:
    cells = [[("" if r.get(c) is None else str(r[c])) for c in columns] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip())
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())


class ProgressDisplay:
    """A tqdm bar on a terminal; on a pipe or file, one line per status change or 10% of progress."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.bar = None
        self.last_line: tuple[str, int] | None = None
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def update(self, job: Job) -> None:
        progress = job.get("progress") or {}
        iteration, total = int(progress.get("iteration") or 0), progress.get("max_iters")
        loss = (job.get("latest_metrics") or {}).get("total_loss")
        label = f"{job['kind']} {job['id'][:8]}"
        if self.tty:
            self._update_bar(label, job["status"], iteration, total, loss)
            return
        decile = int(10 * iteration / total) if total else 0
        if self.last_line != (job["status"], decile):
            self.last_line = (job["status"], decile)
            loss_text = f"  loss {loss:.3f}" if isinstance(loss, (int, float)) else ""
            print(f"{label}: {job['status']}  {iteration}/{total or '?'}{loss_text}", file=self.stream, flush=True)

    def _update_bar(self, label: str, status: str, iteration: int, total: int | None, loss: Any) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, desc=label, unit="it", dynamic_ncols=True, file=self.stream)
        self.bar.update(max(0, iteration - self.bar.n))
        postfix = {"status": status}
        if isinstance(loss, (int, float)):
            postfix["loss"] = f"{loss:.3f}"
        self.bar.set_postfix(postfix)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def format_experiment(exp: dict) -> str:
    """The comparison as a table: one row per model (COCO AP in percent, parameters in millions)."""
    lines = [f"experiment {exp['id']}" + (f" ({exp['name']})" if exp.get("name") else "") + f"  {exp['status']}"]
    if exp.get("error"):
        lines.append(f"error: {exp['error']}")
    lines.append(f"{'model':<9}{'job':<10}{'status':<11}" + "".join(f"{k:>7}" for k in AP_KEYS)
                 + f"{'params':>9}{'time':>9}")
    for row in exp["table"]:
        cells = "".join(f"{row[k]:7.2f}" if isinstance(row.get(k), (int, float)) else f"{'-':>7}" for k in AP_KEYS)
        params = f"{row['params'] / 1e6:8.2f}M" if row.get("params") else f"{'-':>9}"
        seconds = f"{row['seconds']:8.0f}s" if row.get("seconds") is not None else f"{'-':>9}"
        lines.append(f"{row['role']:<9}{(row['job_id'] or '-')[:8]:<10}{row['status'] or '-':<11}{cells}{params}{seconds}")
    return "\n".join(lines)


def commented_yaml(spec: dict[str, Any]) -> str:
    """The spec's body as YAML, each field under a comment that describes it."""
    import yaml  # only `gid init --format yaml` needs it

    lines: list[str] = []

    def emit(value: Any, prefix: str, indent: int) -> None:
        for key, item in value.items():
            doc = spec["fields"].get(prefix + key, {}).get("description")
            if doc:
                lines.append(" " * indent + f"# {doc}")
            if isinstance(item, dict) and item:
                lines.append(" " * indent + f"{key}:")
                emit(item, f"{prefix}{key}.", indent + 2)
            else:
                text = yaml.safe_dump({key: item}, default_flow_style=True, width=10**6).strip()[1:-1]
                lines.append(" " * indent + text)

    emit(spec["body"], "", 0)
    return "\n".join(lines)
