"""Job commands: ``submit``, ``init``, ``status``, ``wait``, ``logs``, ``cancel``, ``download`` and
``jobs list``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gid.cli.common import (
    Commands,
    _non_negative_int,
    add_list_parser,
    add_resource_group,
    client_of,
    client_options,
    fail,
    info,
    list_resource,
)
from gid.cli.format import ProgressDisplay, commented_yaml, format_job, job_row
from gid.client import ApiError, Client
from gid.convert import is_engine_config, to_request
from gid_core.config import load_config_file
from gid_core.errors import ConfigFileError
from service.status import JobStatus

JOB_COLUMNS = ["id", "name", "kind", "status", "progress", "AP", "duration"]
JOB_KINDS = ["train", "distill", "evaluate"]


def follow_job(client: Client, job_id: str, *, interval: float = 1.0, timeout: float | None = None,
               show_progress: bool = True) -> int:
    """Wait for the job, showing its progress; 0 if it succeeded, else 1."""
    display = ProgressDisplay() if show_progress else None
    try:
        job = client.wait_for_job(job_id, interval=interval, timeout=timeout,
                                  on_update=display.update if display else None)
    finally:
        if display is not None:
            display.close()
    if job["status"] == JobStatus.SUCCEEDED:
        info(f"job {job_id} succeeded" + (f"; model {job['output_model_id']}" if job.get("output_model_id") else ""))
        return 0
    info(f"job {job_id} {job['status']}" + (f": {job['error']}" if job.get("error") else ""))
    return 1


# --------------------------------------------------------------------------- commands


def cmd_submit(args: argparse.Namespace) -> int:
    try:
        body = load_config_file(args.file)
    except ConfigFileError as e:
        fail(str(e))
    client = client_of(args)
    if is_engine_config(body):
        info(f"{args.file} is an engine config: mapping its datasets and weights to the server's")
        body = to_request(body, client, info=info)
    job = client.submit_job(body, idempotency_key=args.idempotency_key)
    info(f"submitted {job['kind']} job {job['id']}" + (f" ({job['name']})" if job.get("name") else ""))
    print(job["id"], flush=True)
    return follow_job(client, job["id"], interval=args.interval) if args.wait else 0


def cmd_init(args: argparse.Namespace) -> int:
    """Print a complete request body for KIND (``GET /v1/specs/KIND``) to fill in and submit."""
    params = {k: getattr(args, k) for k in ("arch", "backbone", "weights", "min_size", "max_size", "max_iters",
                                              "num_classes", "train_dataset", "val_dataset", "teacher")}
    spec = client_of(args).get_spec(args.kind, **params)
    print(json.dumps(spec["body"], indent=2) if args.format == "json" else commented_yaml(spec), flush=True)
    for note in spec.get("notes", []):
        info(f"note: {note}")
    if spec["placeholders"]:
        info(f"fill in: {', '.join(spec['placeholders'])}  (ids or names: `gid datasets list`, `gid models list`)")
    if not spec.get("accepted", True):
        info(f"this server does not accept {args.kind} jobs yet")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    client = client_of(args)
    job = client.get_job(args.job_id)
    print(json.dumps(job, indent=2) if args.json else format_job(job, client.list_artifacts(job["id"])))
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    return follow_job(client_of(args), args.job_id, interval=args.interval, timeout=args.timeout,
                      show_progress=not args.no_progress)


def cmd_logs(args: argparse.Namespace) -> int:
    for text in client_of(args).logs(args.job_id, tail=args.lines, follow=args.follow):
        sys.stdout.write(text)
        sys.stdout.flush()
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    client = client_of(args)
    try:
        job = client.cancel_job(args.job_id)
    except ApiError as e:
        # 409: the job already ended. Cancelling it again asks for what is already so: not an error.
        if e.status_code != 409 or (job := client.get_job(args.job_id))["status"] != JobStatus.CANCELLED:
            raise
        info(f"job {job['id']}: already cancelled")
        return 0
    info(f"job {job['id']}: {'cancel requested' if job['status'] == JobStatus.RUNNING else job['status']}")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    client = client_of(args)
    if args.model:
        path = f"/v1/models/{args.model}/download"
    elif args.artifact:
        path = f"/v1/jobs/{args.job_id}/artifacts/{args.artifact}"
    else:
        job = client.get_job(args.job_id)
        if not job.get("output_model_id"):
            fail(f"job {args.job_id} has no output model (status {job['status']})")
        path = f"/v1/models/{job['output_model_id']}/download"
    size, digest = client.download(path, args.output)
    info(f"wrote {args.output} ({size} bytes, sha256 {digest})")
    return 0


def cmd_jobs_list(args: argparse.Namespace) -> int:
    return list_resource(args, JOB_COLUMNS, row=job_row)


def cmd_jobs_update(args: argparse.Namespace) -> int:
    """Rename and/or re-tag: ``--tag`` adds, ``--untag`` removes, the job's other tags stay."""
    changes: dict[str, object] = {}
    if args.name is not None or args.clear_name:
        changes["name"] = None if args.clear_name else args.name
    client = client_of(args)
    if args.tag or args.untag:
        current = client.get_job(args.job_id)["tags"]
        removed = set(args.untag or ())
        changes["tags"] = [t for t in dict.fromkeys([*current, *(args.tag or ())]) if t not in removed]
    if not changes:
        fail("jobs update: nothing to change (give --name, --clear-name, --tag or --untag)")
    job = client.update_job(args.job_id, **changes)
    info(f"job {job['id']}: name {job['name'] or '-'}, tags {', '.join(job['tags']) or '-'}")
    return 0


def check_download_usage(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What argparse cannot express: exactly one of JOB_ID and --model; --artifact with a JOB_ID."""
    if bool(args.job_id) == bool(args.model):
        parser.error("download: give a JOB_ID or --model ID (one of them)")
    if args.artifact and not args.job_id:
        parser.error("download: --artifact needs a JOB_ID")


# --------------------------------------------------------------------------- arguments


def add_commands(commands: Commands) -> None:
    """``submit``, ``init``, ``status``, ``wait``, ``logs``, ``cancel``, ``download`` (in this order)."""
    for add in (_add_submit, _add_init, _add_status, _add_wait, _add_logs, _add_cancel, _add_download):
        add(commands)


def add_list_command(commands: Commands) -> None:
    group = add_resource_group(commands, "jobs")
    p = add_list_parser(group, "jobs")
    p.add_argument("--status", choices=[str(s) for s in JobStatus])
    p.add_argument("--kind", choices=JOB_KINDS)
    p.add_argument("--name", help="exact job name")
    p.add_argument("--tag", action="append", help="jobs with this tag (repeatable: every tag)")
    client_options(p)
    p.set_defaults(func=cmd_jobs_list, resource="jobs")

    p = group.add_parser("update", help="rename or re-tag a job (any state)")
    p.add_argument("job_id", help="job id, unique name or unique id prefix")
    names = p.add_mutually_exclusive_group()
    names.add_argument("--name", help="the job's new name")
    names.add_argument("--clear-name", action="store_true", help="remove the job's name")
    p.add_argument("--tag", action="append", help="add this tag (repeatable)")
    p.add_argument("--untag", action="append", help="remove this tag (repeatable)")
    client_options(p)
    p.set_defaults(func=cmd_jobs_update)


def _add_submit(commands: Commands) -> None:
    p = commands.add_parser("submit", help="submit a job (JSON or YAML request body); prints its id")
    p.add_argument("file", type=Path)
    p.add_argument("--wait", action="store_true", help="then follow it like `gid wait`")
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--idempotency-key", help="a retry with the same key returns the same job")
    client_options(p)
    p.set_defaults(func=cmd_submit)


def _add_init(commands: Commands) -> None:
    p = commands.add_parser("init", help="print a complete job request to fill in (gid init distill > job.json)")
    p.add_argument("kind", choices=JOB_KINDS)
    p.add_argument("--format", choices=["json", "yaml"], default="json", help="yaml: with a comment per field")
    p.add_argument("--arch", choices=["retinanet", "fcos", "fasterrcnn"])
    p.add_argument("--backbone")
    p.add_argument("--weights", help="a torchvision detector weights name (see `gid weights list`)")
    p.add_argument("--min-size", type=int, help="input image side: anchors are scaled to it")
    p.add_argument("--max-size", type=int)
    p.add_argument("--max-iters", type=int, help="warm-up and checkpoints are scaled to it")
    p.add_argument("--num-classes", type=int)
    p.add_argument("--train-dataset", help="id or name: fills train_dataset and the class count")
    p.add_argument("--val-dataset", help="id or name")
    p.add_argument("--teacher", help="model id or name: fills the teacher and fits the student to it")
    client_options(p)
    p.set_defaults(func=cmd_init)


def _add_status(commands: Commands) -> None:
    p = commands.add_parser("status", help="show a job")
    p.add_argument("job_id")
    p.add_argument("--json", action="store_true")
    client_options(p)
    p.set_defaults(func=cmd_status)


def _add_wait(commands: Commands) -> None:
    p = commands.add_parser("wait", help="follow a job until it ends; exit 0 only if it succeeded")
    p.add_argument("job_id")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between polls (when the event stream is not available)")
    p.add_argument("--timeout", type=float, help="give up (exit 1) after this many seconds")
    p.add_argument("--no-progress", action="store_true")
    client_options(p)
    p.set_defaults(func=cmd_wait)


def _add_logs(commands: Commands) -> None:
    p = commands.add_parser("logs", help="print a job's training output (readable while it runs)")
    p.add_argument("job_id")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines until the job ends")
    p.add_argument("-n", "--lines", type=_non_negative_int, metavar="N", help="only the last N lines")
    client_options(p)
    p.set_defaults(func=cmd_logs)


def _add_cancel(commands: Commands) -> None:
    p = commands.add_parser("cancel", help="cancel a job")
    p.add_argument("job_id")
    client_options(p)
    p.set_defaults(func=cmd_cancel)


def _add_download(commands: Commands) -> None:
    p = commands.add_parser("download", help="download a job's output model, a model, or a job artifact")
    p.add_argument("job_id", nargs="?")
    p.add_argument("--model", help="a model id instead of a job")
    p.add_argument("--artifact", help="a job artifact name (see `gid status`), e.g. metrics.json")
    p.add_argument("-o", "--output", type=Path, required=True)
    client_options(p)
    p.set_defaults(func=cmd_download)
