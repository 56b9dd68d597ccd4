"""``gid datasets register | upload | list``."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

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
from gid.convert import zip_folder

DATASET_COLUMNS = ["id", "name", "num_images", "num_categories", "created_at"]


def cmd_datasets_register(args: argparse.Namespace) -> int:
    # Paths on the server; relative ones are taken relative to this directory (a local server).
    if args.annotations is None and not args.unlabeled:
        fail("--annotations is required unless --unlabeled")
    dataset = client_of(args).register_dataset(
        name=args.name,
        annotations=str(Path(args.annotations).expanduser().absolute()) if args.annotations else None,
        images=str(Path(args.images).expanduser().absolute()),
        unlabeled=args.unlabeled,
    )
    info(f"registered dataset {dataset['name']}: {dataset['num_images']} images, "
         f"{dataset['num_annotations']} annotations, {dataset['num_categories']} categories"
         + ("" if dataset.get("labeled", True) else " (unlabeled: for a distill job's unlabeled_dataset)"))
    print(dataset["id"], flush=True)
    return 0


def cmd_datasets_upload(args: argparse.Namespace) -> int:
    images = Path(args.images).expanduser()
    if args.annotations is None and not args.unlabeled:
        fail("--annotations is required unless --unlabeled")
    if args.annotations is not None and not Path(args.annotations).is_file():
        fail(f"--annotations {args.annotations}: not a file")
    if not (images.is_dir() or zipfile_like(images)):
        fail(f"--images {images}: expected a folder of images or a .zip of them")
    with tempfile.TemporaryDirectory(prefix="gid-upload-") as tmp:
        archive = images if images.is_file() else zip_folder(images, Path(tmp) / "images.zip")
        dataset = client_of(args).upload_dataset(
            name=args.name, annotations=Path(args.annotations) if args.annotations else None, images_zip=archive,
            unlabeled=args.unlabeled,
        )
    info(f"uploaded dataset {dataset['name']}: {dataset['num_images']} images, "
         f"{dataset['num_annotations']} annotations, {dataset['num_categories']} categories"
         + ("" if dataset.get("labeled", True) else " (unlabeled: for a distill job's unlabeled_dataset)"))
    print(dataset["id"], flush=True)
    return 0


def zipfile_like(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() == ".zip"


def cmd_datasets_list(args: argparse.Namespace) -> int:
    return list_resource(args, DATASET_COLUMNS)


def add_commands(commands: Commands) -> None:
    group = add_resource_group(commands, "datasets")
    p = group.add_parser("register", help="register a COCO dataset by its paths on the server")
    p.add_argument("--name", required=True)
    p.add_argument("--annotations", help="COCO annotation JSON (with --unlabeled: optional, a file listing the images)")
    p.add_argument("--images", required=True, help="folder the annotation file_names are relative to")
    p.add_argument("--unlabeled", action="store_true",
                   help="images without labels, for a distill job's unlabeled_dataset (GID losses only)")
    client_options(p)
    p.set_defaults(func=cmd_datasets_register)

    p = group.add_parser("upload", help="upload a COCO dataset (annotation JSON + images folder or zip), or --unlabeled images")
    p.add_argument("--name", required=True)
    p.add_argument("--annotations", help="COCO annotation JSON (with --unlabeled: optional, a file listing the images)")
    p.add_argument("--images", required=True, help="folder the file_names are relative to (zipped for you), or a .zip")
    p.add_argument("--unlabeled", action="store_true",
                   help="images without labels, for a distill job's unlabeled_dataset (GID losses only)")
    client_options(p)
    p.set_defaults(func=cmd_datasets_upload)

    p = add_list_parser(group, "datasets")
    client_options(p)
    p.set_defaults(func=cmd_datasets_list, resource="datasets")
