"""``gid``: run the service and talk to it.

Running::

    gid up [--data-dir DIR] [--port PORT]    Redis + API + one worker under DIR (Ctrl-C stops all)
    gid serve [--host H] [--port P]          the API alone (settings from GID_* variables)
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
import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_DATA_DIR = "data"
TERMINAL = ("succeeded", "failed", "cancelled")


class CliError(Exception):
    """An error for the user: printed as ``error: <message>``, exit code 1."""


def fail(message: str) -> NoReturn:
    raise CliError(message)


def info(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- HTTP client


def data_dir_of(args: argparse.Namespace) -> Path:
    return Path(getattr(args, "data_dir", None) or os.environ.get("GID_DATA_DIR") or DEFAULT_DATA_DIR).expanduser()


class Client:
    """A thin httpx wrapper that turns every failure into a ``CliError`` naming what went wrong."""

    def __init__(self, url: str, token: str | None, *, timeout: float = 60.0) -> None:
        import httpx

        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Client":
        data_dir = data_dir_of(args)
        url = args.url or os.environ.get("GID_URL")
        if not url and (data_dir / "url").is_file():
            url = (data_dir / "url").read_text().strip()
        token = args.token or os.environ.get("GID_TOKEN")
        if not token and (data_dir / "token").is_file():
            token = (data_dir / "token").read_text().strip()
        if not token:
            fail(f"no API token: pass --token, set GID_TOKEN, or run `gid up` (it writes {data_dir / 'token'})")
        return cls(url or DEFAULT_URL, token)

    def request(self, method: str, path: str, **kwargs: Any):
        import httpx

        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.ConnectError:
            fail(f"cannot reach the GID API at {self.url} (is `gid up` or `gid serve` running? see --url)")
        except httpx.TimeoutException:
            fail(f"the GID API at {self.url} did not answer in time ({method} {path})")
        except httpx.HTTPError as e:
            fail(f"{method} {self.url}{path}: {e}")
        if response.status_code >= 400:
            fail(describe_http_error(response))
        return response

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs).json()

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.request("POST", path, **kwargs).json()

    def download(self, path: str, dest: Path) -> tuple[int, str]:
        """Stream ``path`` to ``dest`` atomically; checks the sha256 against the ETag. Returns (size, sha256)."""
        import httpx

        dest = dest.expanduser()
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.part")
        digest, size = hashlib.sha256(), 0
        try:
            with self.http.stream("GET", path) as response:
                if response.status_code >= 400:
                    response.read()
                    fail(describe_http_error(response))
                with open(tmp, "wb") as f:
                    for chunk in response.iter_bytes(1 << 20):
                        digest.update(chunk)
                        size += len(chunk)
                        f.write(chunk)
                    f.flush()
                    os.fsync(f.fileno())
                etag = response.headers.get("etag", "").strip('"')
            if etag and etag != digest.hexdigest():
                fail(f"download of {path} is corrupt: sha256 {digest.hexdigest()} != {etag}")
            os.replace(tmp, dest)
        except httpx.ConnectError:
            fail(f"cannot reach the GID API at {self.url}")
        finally:
            tmp.unlink(missing_ok=True)
        return size, digest.hexdigest()


def describe_http_error(response) -> str:
    """``HTTP 422: body.teacher.model_id: model 'x' not found; ...``"""
    try:
        detail = response.json().get("detail")
    except ValueError:
        detail = response.text.strip()[:500]
    if isinstance(detail, list):
        parts = []
        for err in detail:
            if isinstance(err, dict):
                loc = ".".join(str(p) for p in err.get("loc", []))
                parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
            else:
                parts.append(str(err))
        detail = "; ".join(parts)
    hint = " (check --token / GID_TOKEN)" if response.status_code == 401 else ""
    return f"HTTP {response.status_code}: {detail}{hint}"


# --------------------------------------------------------------------------- client commands


def load_job_file(path: Path) -> dict[str, Any]:
    """A ``POST /v1/jobs`` body from JSON or YAML."""
    try:
        text = path.read_text()
    except OSError as e:
        fail(f"cannot read {path}: {e.strerror}")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            body = yaml.safe_load(text)
        else:
            body = json.loads(text)
    except Exception as e:  # noqa: BLE001 - yaml and json raise different types
        fail(f"{path} is not valid {'YAML' if path.suffix.lower() in ('.yaml', '.yml') else 'JSON'}: {e}")
    if not isinstance(body, dict):
        fail(f"{path}: expected a mapping (the job request body), got {type(body).__name__}")
    return body


def cmd_submit(args: argparse.Namespace) -> int:
    body = load_job_file(args.file)
    client = Client.from_args(args)
    headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else {}
    job = client.post("/v1/jobs", json=body, headers=headers)
    info(f"submitted {job['kind']} job {job['id']}" + (f" ({job['name']})" if job.get("name") else ""))
    print(job["id"], flush=True)
    return wait_for_job(client, job["id"], interval=args.interval) if args.wait else 0


def format_job(job: dict[str, Any]) -> str:
    progress = job.get("progress") or {}
    lines = [
        f"job       {job['id']}" + (f"  ({job['name']})" if job.get("name") else ""),
        f"kind      {job['kind']}",
        f"status    {job['status']}" + ("  (cancel requested)" if job.get("cancel_requested") and job["status"] == "running" else ""),
        f"progress  {progress.get('iteration', 0)}/{progress.get('max_iters', '?')}",
        f"attempts  {job.get('attempts', 0)}",
    ]
    if job.get("output_model_id"):
        lines.append(f"model     {job['output_model_id']}")
    metrics = job.get("final_metrics") or {}
    if metrics:
        ap = "  ".join(f"{k}={metrics[k]:.2f}" for k in ("AP", "AP50", "AP75") if isinstance(metrics.get(k), (int, float)))
        lines.append(f"metrics   {ap}")
    if job.get("error"):
        lines.append("error     " + job["error"].replace("\n", "\n          "))
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    job = Client.from_args(args).get(f"/v1/jobs/{args.job_id}")
    print(json.dumps(job, indent=2) if args.json else format_job(job))
    return 0


class ProgressDisplay:
    """A tqdm bar on a terminal; on a pipe or file, one line per status change or 10% of progress."""

    def __init__(self, job: dict[str, Any], stream=None) -> None:
        self.stream = stream or sys.stderr
        self.label = f"{job['kind']} {job['id'][:8]}"
        self.bar = None
        self.last_line: tuple[str, int] | None = None
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def update(self, job: dict[str, Any]) -> None:
        progress = job.get("progress") or {}
        iteration, total = int(progress.get("iteration") or 0), progress.get("max_iters")
        loss = (job.get("latest_metrics") or {}).get("total_loss")
        if self.tty:
            from tqdm import tqdm

            if self.bar is None:
                self.bar = tqdm(total=total, desc=self.label, unit="it", dynamic_ncols=True, file=self.stream)
            self.bar.update(max(0, iteration - self.bar.n))
            postfix = {"status": job["status"]}
            if isinstance(loss, (int, float)):
                postfix["loss"] = f"{loss:.3f}"
            self.bar.set_postfix(postfix)
            return
        decile = int(10 * iteration / total) if total else 0
        if self.last_line != (job["status"], decile):
            self.last_line = (job["status"], decile)
            loss_text = f"  loss {loss:.3f}" if isinstance(loss, (int, float)) else ""
            print(f"{self.label}: {job['status']}  {iteration}/{total or '?'}{loss_text}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def wait_for_job(client: Client, job_id: str, *, interval: float = 1.0, timeout: float | None = None,
                 show_progress: bool = True) -> int:
    """Poll until the job is terminal, showing progress; 0 if it succeeded, else 1."""
    deadline = None if timeout is None else time.monotonic() + timeout
    display = None
    try:
        while True:
            job = client.get(f"/v1/jobs/{job_id}")
            if show_progress:
                display = display or ProgressDisplay(job)
                display.update(job)
            if job["status"] in TERMINAL:
                break
            if deadline is not None and time.monotonic() > deadline:
                fail(f"job {job_id} still {job['status']} after {timeout:.0f} s")
            time.sleep(interval)
    finally:
        if display is not None:
            display.close()
    if job["status"] == "succeeded":
        info(f"job {job_id} succeeded" + (f"; model {job['output_model_id']}" if job.get("output_model_id") else ""))
        return 0
    info(f"job {job_id} {job['status']}" + (f": {job['error']}" if job.get("error") else ""))
    return 1


def cmd_wait(args: argparse.Namespace) -> int:
    return wait_for_job(Client.from_args(args), args.job_id, interval=args.interval, timeout=args.timeout,
                        show_progress=not args.no_progress)


def cmd_cancel(args: argparse.Namespace) -> int:
    job = Client.from_args(args).post(f"/v1/jobs/{args.job_id}/cancel")
    info(f"job {job['id']}: {'cancel requested' if job['status'] == 'running' else job['status']}")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    client = Client.from_args(args)
    if args.model:
        path = f"/v1/models/{args.model}/download"
    elif args.artifact:
        path = f"/v1/jobs/{args.job_id}/artifacts/{args.artifact}"
    else:
        job = client.get(f"/v1/jobs/{args.job_id}")
        if not job.get("output_model_id"):
            fail(f"job {args.job_id} has no output model (status {job['status']})")
        path = f"/v1/models/{job['output_model_id']}/download"
    size, digest = client.download(path, args.output)
    info(f"wrote {args.output} ({size} bytes, sha256 {digest})")
    return 0


def cmd_datasets_register(args: argparse.Namespace) -> int:
    body = {
        "name": args.name,
        # Paths on the server; relative ones are taken relative to this directory (a local server).
        "annotations": str(Path(args.annotations).expanduser().absolute()),
        "images": str(Path(args.images).expanduser().absolute()),
    }
    dataset = Client.from_args(args).post("/v1/datasets", json=body)
    info(f"registered dataset {dataset['name']}: {dataset['num_images']} images, "
         f"{dataset['num_annotations']} annotations, {dataset['num_categories']} categories")
    print(dataset["id"], flush=True)
    return 0


def _print_rows(rows: list[dict[str, Any]], columns: list[str]) -> None:
    cells = [[("" if r.get(c) is None else str(r[c])) for c in columns] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip())
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())


def cmd_list(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"limit": args.limit}
    if getattr(args, "status", None):
        params["status"] = args.status
    page = Client.from_args(args).get(f"/v1/{args.resource}", params=params)
    columns = {
        "datasets": ["id", "name", "num_images", "num_categories", "created_at"],
        "models": ["id", "name", "arch", "source_job_id", "created_at"],
        "jobs": ["id", "name", "kind", "status", "attempts", "created_at"],
    }[args.resource]
    if args.json:
        print(json.dumps(page, indent=2))
    else:
        _print_rows(page["items"], columns)
    return 0


# --------------------------------------------------------------------------- running the service


def cmd_up(args: argparse.Namespace) -> int:
    from service.embedded import EmbeddedStack

    stack = EmbeddedStack(data_dir_of(args), host=args.host, port=args.port, data_roots=args.data_root)
    stopping = False

    def on_signal(signum, _frame) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        info(f"starting Redis, API and worker in {stack.data_dir} ...")
        stack.start()
        info(f"GID is up at {stack.url}  (API docs: {stack.url}/docs)")
        if stack.token_created:
            info(f"API token (owner '{stack_owner()}'), saved to {stack.token_path}:\n  {stack.token}")
        else:
            info(f"API token: in {stack.token_path}")
        info(f"logs: {stack.logs_dir}/{{api,worker,redis}}.log   data roots: {stack.env()['GID_DATA_ROOTS']}")
        info("press Ctrl-C to stop")
        while True:
            dead = stack.check_children()
            if dead is not None:
                from service.embedded import tail

                fail(f"{dead.name} exited unexpectedly (code {dead.process.returncode}); "
                     f"last lines of {dead.log_path}:\n{tail(dead.log_path)}")
            time.sleep(0.5)
    except KeyboardInterrupt:
        info("stopping ...")
        return 0
    except Exception as e:
        if isinstance(e, CliError):
            raise
        fail(str(e))
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the shutdown
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.stop()
        info("stopped")


def stack_owner() -> str:
    from service.embedded import LOCAL_OWNER

    return LOCAL_OWNER


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    uvicorn.run("service.main:create_app", factory=True, host=args.host, port=args.port,
                log_level=args.log_level.lower(), proxy_headers=True)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from worker.celery_app import QUEUE, app

    argv = ["worker", "-Q", QUEUE, "--concurrency", "1", "--loglevel", args.log_level,
            "--without-gossip", "--without-mingle"]
    if args.hostname:
        argv += ["--hostname", args.hostname]
    app.worker_main(argv)
    return 0


def cmd_create_token(args: argparse.Namespace) -> int:
    from service.admin import create_token

    try:
        token = create_token(args.owner)
    except ValueError as e:
        fail(str(e))
    info(f"new API token for owner '{args.owner}' (shown once):")
    print(token, flush=True)
    return 0


# --------------------------------------------------------------------------- argument parsing


def _client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help=f"API address (env GID_URL; default: <data dir>/url, else {DEFAULT_URL})")
    p.add_argument("--token", help="API token (env GID_TOKEN; default: <data dir>/token)")
    p.add_argument("--data-dir", help=f"data directory of `gid up` (env GID_DATA_DIR; default ./{DEFAULT_DATA_DIR})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gid", description="General Instance Distillation training service.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("up", help="run Redis, the API and a worker under one data directory")
    p.add_argument("--data-dir", help=f"everything lives here (env GID_DATA_DIR; default ./{DEFAULT_DATA_DIR})")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--data-root", action="append", type=Path, default=[],
                   help="a server folder datasets may be registered from by path (repeatable; the data dir always is)")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("serve", help="run the API (uvicorn)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="run one worker node (Celery, one job at a time)")
    p.add_argument("--hostname", help="Celery node name, e.g. gpu1@%%h")
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=cmd_worker)

    admin = sub.add_parser("admin", help="administration").add_subparsers(dest="admin_command", required=True)
    p = admin.add_parser("create-token", help="create an owner (if needed) and print a new API token")
    p.add_argument("--owner", required=True)
    p.set_defaults(func=cmd_create_token)

    p = sub.add_parser("submit", help="submit a job (JSON or YAML request body); prints its id")
    p.add_argument("file", type=Path)
    p.add_argument("--wait", action="store_true", help="then follow it like `gid wait`")
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--idempotency-key", help="a retry with the same key returns the same job")
    _client_options(p)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("status", help="show a job")
    p.add_argument("job_id")
    p.add_argument("--json", action="store_true")
    _client_options(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("wait", help="follow a job until it ends; exit 0 only if it succeeded")
    p.add_argument("job_id")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between polls")
    p.add_argument("--timeout", type=float, help="give up (exit 1) after this many seconds")
    p.add_argument("--no-progress", action="store_true")
    _client_options(p)
    p.set_defaults(func=cmd_wait)

    p = sub.add_parser("cancel", help="cancel a job")
    p.add_argument("job_id")
    _client_options(p)
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("download", help="download a job's output model, a model, or a job artifact")
    p.add_argument("job_id", nargs="?")
    p.add_argument("--model", help="a model id instead of a job")
    p.add_argument("--artifact", help="a job artifact name (see `gid status`), e.g. metrics.json")
    p.add_argument("-o", "--output", type=Path, required=True)
    _client_options(p)
    p.set_defaults(func=cmd_download)

    datasets = sub.add_parser("datasets", help="datasets").add_subparsers(dest="datasets_command", required=True)
    p = datasets.add_parser("register", help="register a COCO dataset by its paths on the server")
    p.add_argument("--name", required=True)
    p.add_argument("--annotations", required=True, help="COCO annotation JSON")
    p.add_argument("--images", required=True, help="folder the annotation file_names are relative to")
    _client_options(p)
    p.set_defaults(func=cmd_datasets_register)

    for resource in ("datasets", "models", "jobs"):
        parent = datasets if resource == "datasets" else None
        if parent is None:
            parent = sub.add_parser(resource, help=resource).add_subparsers(dest=f"{resource}_command", required=True)
        p = parent.add_parser("list", help=f"list {resource}, newest first")
        p.add_argument("--limit", type=int, default=50)
        p.add_argument("--json", action="store_true")
        if resource == "jobs":
            p.add_argument("--status", choices=["queued", "running", *TERMINAL])
        _client_options(p)
        p.set_defaults(func=cmd_list, resource=resource)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "download" and bool(args.job_id) == bool(args.model):
        parser.error("download: give a JOB_ID or --model ID (one of them)")
    if args.command == "download" and args.artifact and not args.job_id:
        parser.error("download: --artifact needs a JOB_ID")
    try:
        return int(args.func(args) or 0)
    except CliError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
