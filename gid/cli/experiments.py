"""``gid experiments create | show``: teacher / baseline / GID comparisons."""

from __future__ import annotations

import argparse
import json

from gid.cli.common import Commands, client_of, client_options, fail, info
from gid.cli.format import format_experiment
from gid_core.config import load_config_file
from gid_core.errors import ConfigFileError


def cmd_experiments_create(args: argparse.Namespace) -> int:
    try:
        body = load_config_file(args.file)
    except ConfigFileError as e:
        fail(str(e))
    client = client_of(args)
    exp = client.create_experiment(body)
    info(f"experiment {exp['id']}: jobs " + ", ".join(f"{r} {j[:8]}" for r, j in exp["jobs"].items() if j))
    print(exp["id"], flush=True)
    if not args.wait:
        return 0
    exp = client.wait_for_experiment(exp["id"], interval=args.interval)
    print(format_experiment(exp), flush=True)
    return 0 if exp["status"] == "succeeded" else 1


def cmd_experiments_show(args: argparse.Namespace) -> int:
    exp = client_of(args).get_experiment(args.experiment_id)
    print(json.dumps(exp, indent=2) if args.json else format_experiment(exp), flush=True)
    return 0


def add_commands(commands: Commands) -> None:
    group = commands.add_parser("experiments", help="teacher / baseline / GID comparisons").add_subparsers(
        dest="experiments_command", required=True)
    p = group.add_parser("create", help="create an experiment from a JSON or YAML body (POST /v1/experiments)")
    p.add_argument("file")
    p.add_argument("--wait", action="store_true", help="follow it to the end and print the comparison")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between two looks (with --wait)")
    client_options(p)
    p.set_defaults(func=cmd_experiments_create)
    p = group.add_parser("show", help="an experiment's comparison table and jobs")
    p.add_argument("experiment_id")
    p.add_argument("--json", action="store_true")
    client_options(p)
    p.set_defaults(func=cmd_experiments_show)
