"""What every command module shares: user errors, stderr messages, the client options and the
client they describe, argument types, and the ``list`` subcommand of a resource."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from gid.client import DEFAULT_DATA_DIR, DEFAULT_URL, ApiError, ApiUnreachable, Client, ClientError, NoTokenError
from gid.cli.format import print_rows

Commands = argparse._SubParsersAction  # what ``add_subparsers`` returns


class CliError(Exception):
    """An error for the user: printed as ``error: <message>``, exit code 1."""


def fail(message: str) -> NoReturn:
    raise CliError(message)


def info(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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


def client_options(p: argparse.ArgumentParser, *, top_level: bool = False) -> None:
    # Given before the subcommand (top level, default None) or after it: a subcommand's default
    # must not overwrite the top-level value, so it is SUPPRESS (absent unless given).
    default = None if top_level else argparse.SUPPRESS
    p.add_argument("--url", default=default,
                   help=f"API address (env GID_URL; default: <data dir>/url, else {DEFAULT_URL})")
    p.add_argument("--token", default=default, help="API token (env GID_TOKEN; default: <data dir>/token)")
    p.add_argument("--data-dir", default=default,
                   help=f"data directory of `gid up` (env GID_DATA_DIR; default ./{DEFAULT_DATA_DIR})")


# argparse names a type function in its message ("invalid _positive_int value: 'x'"): keep the names.
def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def add_resource_group(commands: Commands, resource: str) -> Commands:
    """``gid <resource> ...``: the group its subcommands are added to."""
    return commands.add_parser(resource, help=resource).add_subparsers(dest=f"{resource}_command", required=True)


def add_list_parser(group: Commands, resource: str) -> argparse.ArgumentParser:
    """``gid <resource> list`` with ``--limit`` and ``--json``; the caller adds its filters, then
    the client options and its command (which calls ``list_resource``)."""
    p = group.add_parser("list", help=f"list {resource}, newest first")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true")
    return p


def list_resource(args: argparse.Namespace, columns: list[str],
                  row: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> int:
    """One page of ``args.resource``: the API's JSON with ``--json``, else a table of ``columns``."""
    filters = {k: getattr(args, k, None) for k in ("status", "kind", "name", "tag")}
    page = client_of(args).list_page(args.resource, limit=args.limit, **filters)
    if args.json:
        print(json.dumps(page, indent=2))
    else:
        print_rows([row(item) for item in page["items"]] if row else page["items"], columns)
    return 0
