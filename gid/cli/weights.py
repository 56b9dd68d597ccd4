"""``gid weights list | import``: torchvision's published weights in the server's cache."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gid.cli.common import Commands, client_of, client_options, fail, info
from gid.cli.format import print_rows

WEIGHTS_COLUMNS = ["name", "kind", "arch", "backbone", "classes", "present", "file_name"]


def cmd_weights_list(args: argparse.Namespace) -> int:
    items = client_of(args).list_weights()
    if args.json:
        print(json.dumps(items, indent=2))
    else:
        rows = [{**w, "classes": len(w["categories"]) if w.get("categories") else None,
                 "present": "yes" if w["present"] else "no"} for w in items]
        print_rows(rows, WEIGHTS_COLUMNS)
    return 0


def cmd_weights_import(args: argparse.Namespace) -> int:
    if not args.file.is_file():
        fail(f"cannot read {args.file}: not a file")
    try:
        stored = client_of(args).import_weights(args.name, args.file)
    except OSError as e:
        fail(f"cannot read {args.file}: {e.strerror or e}")
    info(f"imported {stored['name']}: {stored['file_name']} ({stored['size']} bytes, sha256 {stored['sha256']})")
    return 0


def add_commands(commands: Commands) -> None:
    group = commands.add_parser("weights", help="torchvision's published weights on the server").add_subparsers(
        dest="weights_command", required=True)
    p = group.add_parser("list", help="every weights name a job may use, and whether the server has its file")
    p.add_argument("--json", action="store_true", help="everything, categories included")
    client_options(p)
    p.set_defaults(func=cmd_weights_list)
    p = group.add_parser("import", help="upload torchvision's file of a weights name into the server's cache")
    p.add_argument("name", help="e.g. torchvision:RetinaNet_ResNet50_FPN_Weights.COCO_V1 (see `gid weights list`)")
    p.add_argument("file", type=Path, help="the file as torchvision publishes it (its sha256 is checked)")
    client_options(p)
    p.set_defaults(func=cmd_weights_import)
