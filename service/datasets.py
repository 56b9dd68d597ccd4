"""Dataset registration: by server path (confined to ``settings.data_roots``) or by upload.

Either way the dataset is validated with ``gid_core.data.validate_coco_dataset`` before a row is
written, and a refusal lists every problem found. A refusal names no server path the client did
not send itself, and never the data roots.

Confinement: the annotation file and the images folder must resolve inside a data root and outside
the service's store (and the folder must not contain the store). Every image is then opened by
``gid_core.data.open_image_file``, which follows no symbolic link below the folder, here and in the
worker, so every file a dataset uses is a regular file inside its confined folder. Nothing partial survives a failure: uploads are
built in a staging folder and renamed into ``datasets/<id>/`` only once valid; the folder is removed
again if the row cannot be inserted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from sqlalchemy.orm import Session

from gid_core.data import ANNOTATIONS_LOC, DATASET_LOC, IMAGES_LOC, label_order, validate_coco_dataset
from gid_core.errors import Loc
from gid_core.unlabeled import validate_unlabeled_images
from service import crud
from service.core.config import Settings
from service.errors import FieldErrors, field_error
from service.models import Dataset, new_id
from service.storage import Storage, UnsafeArchive, copy_fileobj, extract_zip

# Longest server path accepted (Linux PATH_MAX).
MAX_PATH_CHARS = 4096

# Where a dataset problem is (gid_core.data) -> the request field it is reported on.
DATASET_PROBLEM_FIELDS: dict[Loc, list[str]] = {
    ANNOTATIONS_LOC: ["body", "annotations"],
    IMAGES_LOC: ["body", "images"],
    DATASET_LOC: ["body"],
}


@dataclass(frozen=True)
class DatasetSummary:
    num_images: int
    num_annotations: int
    categories: list[str]  # names in label order (sorted by COCO category id)


def validate_dataset(
    annotations: Path, images: Path, *, hide_prefix: Path | None = None, shown: dict[Path, str] | None = None
) -> DatasetSummary:
    """Validate with gid_core; ``FieldErrors`` listing every problem, else the counts.

    Server paths in the messages are replaced: ``hide_prefix`` (a staging folder) is dropped, and
    each resolved path in ``shown`` reads as the path the client sent."""
    data, problems = validate_coco_dataset(annotations, images)
    if problems:
        aliases = sorted((shown or {}).items(), key=lambda item: -len(str(item[0])))
        errors = []
        for problem in problems:
            message = problem.message
            if hide_prefix is not None:  # staging paths mean nothing to the client
                message = _hide_staging(message, hide_prefix)
            for resolved, sent in aliases:
                message = message.replace(str(resolved), sent)
            errors.append(field_error(DATASET_PROBLEM_FIELDS[problem.loc], message, problem.code))
        raise FieldErrors(errors)
    categories = [c["name"] for c in label_order(data["categories"])]
    return DatasetSummary(len(data["images"]), len(data["annotations"]), categories)


def confine(value: str, field: str, roots: list[Path], *, want_dir: bool, store: Path | None = None) -> Path:
    """Resolve ``value`` (symlinks and ``..`` included) and require it inside one of ``roots``.

    Outside every root, or inside the service's own store (``store``: other owners' uploads, job
    outputs, the database) even where a root covers it, or a folder containing the store: 403,
    checked before existence so paths outside cannot be probed (the roots are not listed).
    Relative, NUL, over ``MAX_PATH_CHARS``, missing or of the wrong kind: 422.
    """
    loc = ["body", field]
    if not roots:
        raise FieldErrors.one(loc, "registration by server path is disabled (no data_roots configured)", "path_not_allowed", 403)
    if "\x00" in value or len(value) > MAX_PATH_CHARS:
        raise FieldErrors.one(loc, f"must be a path of at most {MAX_PATH_CHARS} characters, without NUL", "path_invalid")
    if not Path(value).is_absolute():
        raise FieldErrors.one(loc, f"'{value}' must be an absolute path", "path_not_absolute")
    # realpath, unlike Path.resolve, never raises: what cannot be resolved stays as written.
    resolved = Path(os.path.realpath(value))
    if not any(resolved.is_relative_to(root) for root in roots):
        raise FieldErrors.one(loc, f"'{value}' resolves outside the allowed data roots", "path_not_allowed", 403)
    if store is not None:
        store = Path(os.path.realpath(store))
        if _inside_store(resolved, store) or (want_dir and store.is_relative_to(resolved)):
            raise FieldErrors.one(loc, f"'{value}' is inside, or contains, the service's own data store", "path_not_allowed", 403)
    # os.path's checks answer False for any OSError (e.g. a name too long), Path's may raise.
    if want_dir and not os.path.isdir(resolved):
        raise FieldErrors.one(loc, f"'{value}' is not an existing directory", "path_not_found")
    if not want_dir and not os.path.isfile(resolved):
        raise FieldErrors.one(loc, f"'{value}' is not an existing file", "path_not_found")
    return resolved


def _inside_store(path: Path, store: Path) -> bool:
    managed = ("datasets", "models", "jobs", "tmp")
    return path == store or path.parent == store or any(path.is_relative_to(store / m) for m in managed)


def register_by_path(
    session: Session,
    *,
    owner_id: str,
    name: str,
    annotations: str | None,
    images: str,
    roots: list[Path],
    store: Path | None = None,
    unlabeled: bool = False,
) -> Dataset:
    """Confine and validate, then insert. ``unlabeled``: images only (``annotations``, optional,
    a COCO file listing them), validated by ``gid_core.unlabeled.validate_unlabeled_images``."""
    if annotations is None and not unlabeled:
        raise FieldErrors.one(["body", "annotations"], "required unless unlabeled is true", "missing")
    errors, paths = [], {}
    fields = (("annotations", annotations, False), ("images", images, True))
    for field, value, want_dir in [f for f in fields if f[1] is not None]:
        try:
            paths[field] = confine(value, field, roots, want_dir=want_dir, store=store)
        except FieldErrors as e:
            errors.append(e)
    if errors:
        status = 403 if any(e.status_code == 403 for e in errors) else 422
        raise FieldErrors([err for e in errors for err in e.errors], status_code=status)
    shown = {paths["images"]: images, **({paths["annotations"]: annotations} if annotations else {})}
    if unlabeled:
        return _register_unlabeled(session, owner_id=owner_id, name=name, paths=paths, shown=shown)
    summary = validate_dataset(paths["annotations"], paths["images"], shown=shown)
    return crud.create_dataset(
        session, owner_id=owner_id, name=name, source="path", annotations_path=str(paths["annotations"]),
        images_path=str(paths["images"]), num_images=summary.num_images,
        num_annotations=summary.num_annotations, categories=summary.categories,
    )


def _register_unlabeled(
    session: Session, *, owner_id: str, name: str, paths: dict[str, Path], shown: dict[Path, str]
) -> Dataset:
    """An image-only dataset: no categories, no annotations counted (labels, if any, are unused)."""
    annotations = paths.get("annotations")
    records, problems = validate_unlabeled_images(paths["images"], annotations)
    if problems:
        raise FieldErrors([field_error(DATASET_PROBLEM_FIELDS[p.loc], _shown(p.message, shown), p.code)
                           for p in problems])
    return crud.create_dataset(
        session, owner_id=owner_id, name=name, source="path",
        annotations_path=str(annotations) if annotations else None, images_path=str(paths["images"]),
        num_images=len(records), num_annotations=0, categories=[], labeled=False,
    )


def _shown(message: str, shown: dict[Path, str]) -> str:
    """``message`` with each resolved server path as the client sent it (longest first)."""
    for resolved, sent in sorted(shown.items(), key=lambda item: -len(str(item[0]))):
        message = message.replace(str(resolved), sent)
    return message


def register_upload(
    session: Session,
    *,
    owner_id: str,
    name: str,
    annotations: BinaryIO | None,
    images_zip: BinaryIO,
    storage: Storage,
    settings: Settings,
    unlabeled: bool = False,
) -> Dataset:
    """Store the annotation JSON and the images zip, extract safely, validate, then insert.
    ``unlabeled``: images only; ``annotations`` is optional (a COCO file listing them), without it
    every image file in the zip counts."""
    if annotations is None and not unlabeled:
        raise FieldErrors.one(["body", "annotations"], "required unless unlabeled is true", "missing")
    dataset_id = new_id()
    staging = storage.staging_dir()
    try:
        if annotations is not None:
            copy_fileobj(annotations, staging / "annotations.json", max_bytes=settings.max_annotation_bytes,
                         field="annotations")
        archive = copy_fileobj(images_zip, staging / "images.zip", max_bytes=settings.max_upload_bytes, field="images")
        try:
            extract_zip(
                archive.path, staging / "images", max_members=settings.max_zip_members,
                max_total_bytes=settings.max_unzipped_bytes, max_ratio=settings.max_zip_ratio,
            )
        except UnsafeArchive as e:
            raise FieldErrors.one(["body", "images"], str(e), "unsafe_archive") from None
        archive.path.unlink()
        images_root, summary = _validate_upload(staging, unlabeled=unlabeled)
        final = storage.dataset_dir(dataset_id)
        storage.publish_dir(staging, final)
    except BaseException:
        storage.remove(staging)
        raise
    try:
        return crud.create_dataset(
            session, owner_id=owner_id, name=name, source="upload", dataset_id=dataset_id,
            annotations_path=str(final / "annotations.json") if annotations is not None else None,
            images_path=str(final / images_root), num_images=summary.num_images,
            num_annotations=summary.num_annotations, categories=summary.categories, labeled=not unlabeled,
        )
    except BaseException:
        storage.remove(final)
        raise


def _validate_upload(staging: Path, *, unlabeled: bool = False) -> tuple[Path, DatasetSummary]:
    """Validate against the zip's root; if that fails and the zip wraps everything in one folder
    (``zip -r images.zip images/``), try that folder as the root. Returns (root relative, summary)."""
    validate = _validate_unlabeled_upload if unlabeled else _validate_labeled_upload
    root = staging / "images"
    try:
        return root.relative_to(staging), validate(staging, root)
    except FieldErrors as first:
        entries = [p for p in root.iterdir() if p.name != "__MACOSX"]
        if len(entries) != 1 or not entries[0].is_dir():
            raise
        try:
            nested = entries[0]
            return nested.relative_to(staging), validate(staging, nested)
        except FieldErrors:
            raise first from None


def _validate_labeled_upload(staging: Path, root: Path) -> DatasetSummary:
    return validate_dataset(staging / "annotations.json", root, hide_prefix=staging)


def _validate_unlabeled_upload(staging: Path, root: Path) -> DatasetSummary:
    """``validate_unlabeled_images`` on the extracted zip (and the listing, if one was sent)."""
    listing = staging / "annotations.json"
    records, problems = validate_unlabeled_images(root, listing if listing.is_file() else None)
    if problems:
        # staging paths mean nothing to the client
        raise FieldErrors([field_error(DATASET_PROBLEM_FIELDS[p.loc], _hide_staging(p.message, staging), p.code)
                           for p in problems])
    return DatasetSummary(len(records), 0, [])


def _hide_staging(message: str, staging: Path) -> str:
    return message.replace(f"{staging}/", "").replace(str(staging), "<upload>")
