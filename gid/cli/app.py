"""``gid``: run the service and talk to it.

Running::

    gid up [--data-dir DIR] [--workers N]    Redis + API + N worker nodes under DIR (Ctrl-C stops all)
    gid serve [--host H] [--port P] [--workers N]   the API alone (settings from GID_* variables)
    gid worker                               one worker node (Celery, one job per device slot)
    gid admin create-token --owner NAME      print a new API token for NAME

Client (REST over HTTP; ``--url``/``GID_URL``, ``--token``/``GID_TOKEN`` before or after the
command, by default the ``url``
and ``token`` files that ``gid up`` writes into the data directory ``--data-dir``/``GID_DATA_DIR``)::

    gid datasets register --name N --annotations FILE --images DIR    (paths on the server)
    gid datasets register --name N --images DIR --unlabeled           (images only: a job's unlabeled_dataset)
    gid datasets upload --name N --annotations FILE --images DIR|ZIP  (multipart upload)
    gid models upload FILE [--name N] [--config JSON|FILE] [--categories JSON|FILE]
    gid datasets list | gid models list | gid jobs list [--status S] [--kind K] [--name N] [--tag T]
    gid init train|distill|evaluate [--teacher M] [--train-dataset D] [--format yaml] > job.json
    gid submit JOB.json|JOB.yaml [--wait]    prints the job id (engine configs, examples/*.yaml, too)
    gid status JOB [--json]                  JOB: an id, a unique id prefix or a unique name
    gid wait JOB_ID                          progress bar; exit 0 only if the job succeeded
    gid logs [-f] [-n N] JOB_ID              the training's output (-f: follow it until the job ends)
    gid cancel JOB_ID
    gid download JOB_ID -o FILE              the job's output model (or --model ID, --artifact NAME)
    gid weights list [--json]                torchvision weights by name, and which the server has
    gid weights import NAME FILE             upload torchvision's file of NAME (hash-checked first)

Exit codes: 0 success; 1 an error (message on stderr) or a job that failed or was cancelled;
2 bad command-line usage.
"""
# This docstring is the epilog of `gid --help`.

from __future__ import annotations

import argparse
import os
import sys

from gid.cli import datasets, experiments, jobs, models, stack, weights
from gid.cli.common import CliError, client_options, describe
from gid.client import ClientError


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gid-service")
    except PackageNotFoundError:  # run from a source tree that was not installed
        return "0+unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gid", description="General Instance Distillation training service.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.add_argument("--version", action="version", version=f"gid {package_version()}")
    client_options(parser, top_level=True)  # also accepted after the subcommand
    # The order here is the order of `gid --help`.
    for add in (stack.add_commands, jobs.add_commands, datasets.add_commands, models.add_commands,
                jobs.add_list_command, weights.add_commands, experiments.add_commands):
        add(commands)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``; usage errors (also the ones argparse cannot express) exit with code 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "download":
        jobs.check_download_usage(parser, args)
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
    except BrokenPipeError:
        # The reader went away (`gid jobs list | head -1`): stop quietly, as a SIGPIPE'd tool does.
        # stdout goes to /dev/null so the interpreter's final flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _report_error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return 1
