"""Running the service: ``up`` (Redis + API + workers), ``serve``, ``worker``, ``admin``.

Each command imports the server's modules when it runs: the client commands start without
torch, FastAPI, SQLAlchemy or Celery.
"""

from __future__ import annotations

import argparse
import signal
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

from gid.cli.common import CliError, Commands, _positive_int, fail, info
from gid.client import DEFAULT_DATA_DIR, resolve_data_dir

if TYPE_CHECKING:
    from gid.embedded import EmbeddedStack


def cmd_up(args: argparse.Namespace) -> int:
    from gid.embedded import EmbeddedStack

    stack = EmbeddedStack(resolve_data_dir(args.data_dir), host=args.host, port=args.port, data_roots=args.data_root,
                          workers=args.workers)
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
    _serve_processes(args, workers, settings.data_dir)
    return 0


def _serve_processes(args: argparse.Namespace, workers: int, data_dir: Path) -> None:
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    from service.prometheus import prepare_multiprocess_dir

    prepare_multiprocess_dir(data_dir)  # /metrics sums every process's request metrics
    config = uvicorn.Config("service.main:create_app", factory=True, host=args.host, port=args.port,
                            log_level=args.log_level.lower(), proxy_headers=True, workers=workers)
    sock = config.bind_socket()
    # uvicorn binds the shared socket with proto 0, so asyncio does not set TCP_NODELAY on the
    # connections it accepts, and Nagle + delayed ACK add ~40 ms to every keep-alive response
    # (measured: p50 46 vs 4 ms). Accepted sockets inherit the option from the listener on Linux.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    Multiprocess(config, sockets=[sock]).run()


def cmd_worker(args: argparse.Namespace) -> int:
    from service.queue import JOB_QUEUE
    from worker.celery_app import app

    # --concurrency: the worker's job slots (worker.celery_app, from GID_WORKER_DEVICES / _SLOTS)
    argv = ["worker", "-Q", JOB_QUEUE, "--loglevel", args.log_level,
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


# --------------------------------------------------------------------------- arguments


def add_commands(commands: Commands) -> None:
    """``up``, ``serve``, ``worker``, ``admin`` (in this order)."""
    for add in (_add_up, _add_serve, _add_worker, _add_admin):
        add(commands)


def _add_up(commands: Commands) -> None:
    p = commands.add_parser("up", help="run Redis, the API and a worker under one data directory")
    p.add_argument("--data-dir", default=argparse.SUPPRESS,
                   help=f"everything lives here (env GID_DATA_DIR; default ./{DEFAULT_DATA_DIR})")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--data-root", action="append", type=Path, default=[],
                   help="a server folder datasets may be registered from by path (repeatable; the data dir always is)")
    p.add_argument("--workers", type=_positive_int, default=1,
                   help="worker processes, each a node of its own for multi-node jobs (default 1)")
    p.set_defaults(func=cmd_up)


def _add_serve(commands: Commands) -> None:
    p = commands.add_parser("serve", help="run the API (uvicorn)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--log-level", default="info")
    p.add_argument("--workers", type=_positive_int, help="API processes (env GID_API_WORKERS; default: CPU cores)")
    p.set_defaults(func=cmd_serve)


def _add_worker(commands: Commands) -> None:
    p = commands.add_parser("worker", help="run one worker node (Celery, one job per device slot)")
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
