"""``gid models upload | list``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from gid.cli.common import (
    Commands,
    add_list_parser,
    add_resource_group,
    client_of,
    client_options,
    fail,
    info,
    list_resource,
)
from gid_core.config import load_config_file
from gid_core.errors import ConfigFileError

MODEL_COLUMNS = ["id", "name", "arch", "source_job_id", "created_at"]


def cmd_models_upload(args: argparse.Namespace) -> int:
    """Upload a checkpoint; its config and categories default to the ``metadata.json`` beside it
    (a job's ``export/`` folder)."""
    path = Path(args.file).expanduser()
    if not path.is_file():
        fail(f"{path}: not a file")
    metadata = _export_metadata(path)
    config = load_json_or_file(args.config, "--config") if args.config else metadata.get("model")
    if config is None:
        fail("--config is required (a ModelConfig as JSON or a YAML/JSON file) unless metadata.json is beside the file")
    categories = load_json_or_file(args.categories, "--categories") if args.categories else [
        c["name"] for c in metadata.get("categories", [])] or None
    model = client_of(args).upload_model(path, name=args.name or path.stem, config=config, categories=categories)
    info(f"uploaded model {model['name']} ({model['arch']}, {model['size']} bytes)")
    print(model["id"], flush=True)
    return 0


def _export_metadata(weights: Path) -> dict[str, Any]:
    try:
        return json.loads((weights.parent / "metadata.json").read_text())
    except (OSError, ValueError):
        return {}


def load_json_or_file(value: str, option: str) -> Any:
    """``value`` as inline JSON, else as a YAML/JSON file."""
    try:
        return json.loads(value)
    except ValueError:
        pass
    try:
        return load_config_file(value) if not value.lstrip().startswith("[") else json.loads(value)
    except (ConfigFileError, ValueError) as e:
        fail(f"{option}: not JSON, and {e}")


def cmd_models_list(args: argparse.Namespace) -> int:
    return list_resource(args, MODEL_COLUMNS)


def add_commands(commands: Commands) -> None:
    group = add_resource_group(commands, "models")
    p = group.add_parser("upload", help="upload a detector checkpoint (.safetensors, or weights-only .pt)")
    p.add_argument("file")
    p.add_argument("--name", help="default: the file name without its suffix")
    p.add_argument("--config", help="ModelConfig as JSON or a YAML/JSON file (default: metadata.json beside FILE)")
    p.add_argument("--categories", help="category names in label order, a JSON list or file (default: metadata.json)")
    client_options(p)
    p.set_defaults(func=cmd_models_upload)

    p = add_list_parser(group, "models")
    client_options(p)
    p.set_defaults(func=cmd_models_list, resource="models")
