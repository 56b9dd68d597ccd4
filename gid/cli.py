"""``gid``: run the service and talk to it.

Running::

    gid up [--data-dir DIR] [--port PORT]    Redis + API + one worker under DIR (Ctrl-C stops all)
    gid serve [--host H] [--port P] [--workers N]   the API alone (settings from GID_* variables)
    gid worker                               one worker node (Celery, one job at a time)
    gid admin create-token --owner NAME      print a new API token for NAME

Client (REST over HTTP; ``--url``/``GID_URL``, ``--token``/``GID_TOKEN``, by default the ``url``
and ``token`` files that ``gid up`` writes into the data directory ``--data-dir``/``GID_DATA_DIR``)::

    gid datasets register --name N --annotations FILE --images DIR    (paths on the server)
    gid datasets list | gid models list | gid jobs list [--status S]
    gid submit JOB.json|JOB.yaml [--wait]    prints the job id
    gid status JOB_ID [--json]
    gid wait JOB_ID                          progress bar; exit 0 only if the job succeeded
    gid cancel JOB_ID
    gid download JOB_ID -o FILE              the job's output model (or --model ID, --artifact NAME)

Exit codes: 0 success; 1 an error (message on stderr) or a job that failed or was cancelled;
2 bad command-line usage.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from gid.client import (
    DEFAULT_DATA_DIR,
    DEFAULT_URL,
    ApiError,
    ApiUnreachable,
    Client,
    ClientError,
    Job,
    NoTokenError,
    resolve_data_dir,
)
from gid_core.config import load_config_file
from gid_core.errors import ConfigFileError
from service.status import JobStatus

if TYPE_CHECKING:
    from gid.embedded import EmbeddedStack

Commands = argparse._SubParsersAction  # what ``add_subparsers`` returns

# The server-side commands (up, serve, worker, admin) import their modules when they run: the
# client commands start without torch, FastAPI, SQLAlchemy or Celery.

LIST_COLUMNS = {
    "datasets": ["id", "name", "num_images", "num_categories", "created_at"],
    "models": ["id", "name", "arch", "source_job_id", "created_at"],
    "jobs": ["id", "name", "kind", "status", "attempts", "created_at"],
}


class CliError(Exception):
    """An error for the user: printed as ``error: <message>``, exit code 1."""


def fail(message: str) -> NoReturn:
    raise CliError(message)


def info(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _report_error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return 1


def describe(error: ClientError) -> str:
    """The client's message, with the hint that names this command's own options."""
    if isinstance(error, NoTokenError):
        return f"no API token: pass --token, set GID_TOKEN, or run `gid up` (it writes {error.token_path})"
    if isinstance(error, ApiError) and error.status_code == 401:
        return f"{error} (check --token / GID_TOKEN)"
    if isinstance(error, ApiUnreachable):
        return f"{error}; see --url"
    return str(error)


def client_of(args: argparse.Namespace) -> Client:
    return Client.from_environment(url=args.url, token=args.token, data_dir=args.data_dir)


# --------------------------------------------------------------------------- display


def format_job(job: Job) -> str:
    progress = job.get("progress") or {}
    cancelling = job.get("cancel_requested") and job["status"] == JobStatus.RUNNING
    lines = [
        f"job       {job['id']}" + (f"  ({job['name']})" if job.get("name") else ""),
        f"kind      {job['kind']}",
        f"status    {job['status']}" + ("  (cancel requested)" if cancelling else ""),
        f"progress  {progress.get('iteration', 0)}/{progress.get('max_iters', '?')}",
        f"attempts  {job.get('attempts', 0)}",
    ]
    if job.get("output_model_id"):
        lines.append(f"model     {job['output_model_id']}")
    metrics = job.get("final_metrics") or {}
    if metrics:
        ap = "  ".join(f"{k}={metrics[k]:.2f}" for k in ("AP", "AP50", "AP75")
                       if isinstance(metrics.get(k), (int, float)))
        lines.append(f"metrics   {ap}")
    if job.get("error"):
        lines.append("error     " + job["error"].replace("\n", "\n          "))
    return "\n".join(lines)


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


def print_rows(rows: list[dict[str, Any]], columns: list[str]) -> None:
    cells = [[("" if r.get(c) is None else str(r[c])) for c in columns] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip())
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())


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


# --------------------------------------------------------------------------- client commands


def cmd_submit(args: argparse.Namespace) -> int:
    try:
        body = load_config_file(args.file)
    except ConfigFileError as e:
        fail(str(e))
    client = client_of(args)
    job = client.submit_job(body, idempotency_key=args.idempotency_key)
    info(f"submitted {job['kind']} job {job['id']}" + (f" ({job['name']})" if job.get("name") else ""))
    print(job["id"], flush=True)
    return follow_job(client, job["id"], interval=args.interval) if args.wait else 0


def cmd_status(args: argparse.Namespace) -> int:
    job = client_of(args).get_job(args.job_id)
    print(json.dumps(job, indent=2) if args.json else format_job(job))
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    return follow_job(client_of(args), args.job_id, interval=args.interval, timeout=args.timeout,
                      show_progress=not args.no_progress)


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


def cmd_datasets_register(args: argparse.Namespace) -> int:
    # Paths on the server; relative ones are taken relative to this directory (a local server).
    dataset = client_of(args).register_dataset(
        name=args.name,
        annotations=str(Path(args.annotations).expanduser().absolute()),
        images=str(Path(args.images).expanduser().absolute()),
    )
    info(f"registered dataset {dataset['name']}: {dataset['num_images']} images, "
         f"{dataset['num_annotations']} annotations, {dataset['num_categories']} categories")
    print(dataset["id"], flush=True)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    page = client_of(args).list_page(args.resource, limit=args.limit, status=getattr(args, "status", None))
    if args.json:
        print(json.dumps(page, indent=2))
    else:
        print_rows(page["items"], LIST_COLUMNS[args.resource])
    return 0


# --------------------------------------------------------------------------- running the service


def cmd_up(args: argparse.Namespace) -> int:
    from gid.embedded import EmbeddedStack

    stack = EmbeddedStack(resolve_data_dir(args.data_dir), host=args.host, port=args.port, data_roots=args.data_root)
    _interrupt_on_first(signal.SIGTERM, signal.SIGINT)
    try:
        info(f"starting Redis, API and worker in {stack.data_dir} ...")
        stack.start()
        _announce(stack)
        while True:
            for message in stack.heal():  # restarts a dead child; StackError when that keeps failing
                info(message)
            time.sleep(0.5)
    except KeyboardInterrupt:
        info("stopping ...")
        return 0
    except CliError:
        raise
    except Exception as e:  # noqa: BLE001 - one line for the user; the stack is stopped below
        fail(str(e))
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the shutdown
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.stop()
        info("stopped")


def _interrupt_on_first(*signals: int) -> None:
    """The first of ``signals`` raises ``KeyboardInterrupt`` (later ones are ignored until then)."""
    stopping = False

    def on_signal(_signum, _frame) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            raise KeyboardInterrupt

    for sig in signals:
        signal.signal(sig, on_signal)


def _announce(stack: EmbeddedStack) -> None:
    from gid.embedded import LOCAL_OWNER

    info(f"GID is up at {stack.url}  (API docs: {stack.url}/docs)")
    if stack.token_created:
        info(f"API token (owner '{LOCAL_OWNER}'), saved to {stack.token_path}:\n  {stack.token}")
    else:
        info(f"API token: in {stack.token_path}")
    info(f"logs: {stack.logs_dir}/{{api,worker,redis}}.log   data roots: {stack.env()['GID_DATA_ROOTS']}")
    info("press Ctrl-C to stop")


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.core.config import settings

    # Several processes need the app as an import string (uvicorn imports it in each one); each
    # builds its own engine and pools, and start-up migrations are serialised (service.migrate).
    workers = args.workers or settings.api_workers
    if workers == 1:
        uvicorn.run("service.main:create_app", factory=True, host=args.host, port=args.port,
                    log_level=args.log_level.lower(), proxy_headers=True)
        return 0
    from uvicorn.supervisors import Multiprocess

    config = uvicorn.Config("service.main:create_app", factory=True, host=args.host, port=args.port,
                            log_level=args.log_level.lower(), proxy_headers=True, workers=workers)
    sock = config.bind_socket()
    # uvicorn binds the shared socket with proto 0, so asyncio does not set TCP_NODELAY on the
    # connections it accepts, and Nagle + delayed ACK add ~40 ms to every keep-alive response
    # (measured: p50 46 vs 4 ms). Accepted sockets inherit the option from the listener on Linux.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    Multiprocess(config, sockets=[sock]).run()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from service.queue import JOB_QUEUE
    from worker.celery_app import app

    argv = ["worker", "-Q", JOB_QUEUE, "--concurrency", "1", "--loglevel", args.log_level,
            "--without-gossip", "--without-mingle"]
    if args.hostname:
        argv += ["--hostname", args.hostname]
    app.worker_main(argv)
    return 0


def cmd_create_token(args: argparse.Namespace) -> int:
    from service.admin import DatabaseNotFound, create_token

    try:
        token = create_token(args.owner, init=args.init)
    except (ValueError, DatabaseNotFound) as e:
        fail(str(e))
    info(f"new API token for owner '{args.owner}' (shown once):")
    print(token, flush=True)
    return 0


# --------------------------------------------------------------------------- argument parsing


def _client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help=f"API address (env GID_URL; default: <data dir>/url, else {DEFAULT_URL})")
    p.add_argument("--token", help="API token (env GID_TOKEN; default: <data dir>/token)")
    p.add_argument("--data-dir", help=f"data directory of `gid up` (env GID_DATA_DIR; default ./{DEFAULT_DATA_DIR})")


def _add_up(commands: Commands) -> None:
    p = commands.add_parser("up", help="run Redis, the API and a worker under one data directory")
    p.add_argument("--data-dir", help=f"everything lives here (env GID_DATA_DIR; default ./{DEFAULT_DATA_DIR})")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--data-root", action="append", type=Path, default=[],
                   help="a server folder datasets may be registered from by path (repeatable; the data dir always is)")
    p.set_defaults(func=cmd_up)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_serve(commands: Commands) -> None:
    p = commands.add_parser("serve", help="run the API (uvicorn)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--log-level", default="info")
    p.add_argument("--workers", type=_positive_int, help="API processes (env GID_API_WORKERS; default: CPU cores)")
    p.set_defaults(func=cmd_serve)


def _add_worker(commands: Commands) -> None:
    p = commands.add_parser("worker", help="run one worker node (Celery, one job at a time)")
    p.add_argument("--hostname", help="Celery node name, e.g. gpu1@%%h")
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=cmd_worker)


def _add_admin(commands: Commands) -> None:
    admin = commands.add_parser("admin", help="administration").add_subparsers(dest="admin_command", required=True)
    p = admin.add_parser("create-token", help="create an owner (if needed) and print a new API token")
    p.add_argument("--owner", required=True)
    p.add_argument("--init", action="store_true",
                   help="create and migrate the database if it does not exist (by default: refuse)")
    p.set_defaults(func=cmd_create_token)


def _add_submit(commands: Commands) -> None:
    p = commands.add_parser("submit", help="submit a job (JSON or YAML request body); prints its id")
    p.add_argument("file", type=Path)
    p.add_argument("--wait", action="store_true", help="then follow it like `gid wait`")
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--idempotency-key", help="a retry with the same key returns the same job")
    _client_options(p)
    p.set_defaults(func=cmd_submit)


def _add_job_commands(commands: Commands) -> None:
    p = commands.add_parser("status", help="show a job")
    p.add_argument("job_id")
    p.add_argument("--json", action="store_true")
    _client_options(p)
    p.set_defaults(func=cmd_status)

    p = commands.add_parser("wait", help="follow a job until it ends; exit 0 only if it succeeded")
    p.add_argument("job_id")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between polls")
    p.add_argument("--timeout", type=float, help="give up (exit 1) after this many seconds")
    p.add_argument("--no-progress", action="store_true")
    _client_options(p)
    p.set_defaults(func=cmd_wait)

    p = commands.add_parser("cancel", help="cancel a job")
    p.add_argument("job_id")
    _client_options(p)
    p.set_defaults(func=cmd_cancel)


def _add_download(commands: Commands) -> None:
    p = commands.add_parser("download", help="download a job's output model, a model, or a job artifact")
    p.add_argument("job_id", nargs="?")
    p.add_argument("--model", help="a model id instead of a job")
    p.add_argument("--artifact", help="a job artifact name (see `gid status`), e.g. metrics.json")
    p.add_argument("-o", "--output", type=Path, required=True)
    _client_options(p)
    p.set_defaults(func=cmd_download)


def _add_catalogs(commands: Commands) -> None:
    """``datasets register``, and ``list`` under ``datasets``, ``models`` and ``jobs``."""
    groups = {
        resource: commands.add_parser(resource, help=resource).add_subparsers(dest=f"{resource}_command", required=True)
        for resource in LIST_COLUMNS
    }
    p = groups["datasets"].add_parser("register", help="register a COCO dataset by its paths on the server")
    p.add_argument("--name", required=True)
    p.add_argument("--annotations", required=True, help="COCO annotation JSON")
    p.add_argument("--images", required=True, help="folder the annotation file_names are relative to")
    _client_options(p)
    p.set_defaults(func=cmd_datasets_register)

    for resource, group in groups.items():
        p = group.add_parser("list", help=f"list {resource}, newest first")
        p.add_argument("--limit", type=int, default=50)
        p.add_argument("--json", action="store_true")
        if resource == "jobs":
            p.add_argument("--status", choices=[str(s) for s in JobStatus])
        _client_options(p)
        p.set_defaults(func=cmd_list, resource=resource)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gid", description="General Instance Distillation training service.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_up, _add_serve, _add_worker, _add_admin, _add_submit, _add_job_commands, _add_download,
                _add_catalogs):
        add(commands)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``; usage errors (also the ones argparse cannot express) exit with code 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "download" and bool(args.job_id) == bool(args.model):
        parser.error("download: give a JOB_ID or --model ID (one of them)")
    if args.command == "download" and args.artifact and not args.job_id:
        parser.error("download: --artifact needs a JOB_ID")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ClientError as e:
        return _report_error(describe(e))
    except CliError as e:
        return _report_error(str(e))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
