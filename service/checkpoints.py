"""Model uploads: a detector checkpoint checked against the architecture it claims to be.

The file is read without unpickling code (safetensors, or ``torch.load(weights_only=True)`` via
``gid_core.models.read_state_dict_shapes``, which reads only the keys and shapes); the detector is
built from the config on the meta device (no parameter memory, whatever the config) and the
state_dict must fit it strictly. A mismatch is a 422 listing the first missing, unexpected and
mis-shaped keys. Only then is the file moved into ``models/`` and the row inserted.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, BinaryIO

from pydantic import ValidationError
from sqlalchemy.orm import Session

from gid_core.config import ModelConfig
from gid_core.fileio import fsync_path, loads_finite
from service import crud
from service.core.config import Settings
from service.errors import FieldErrors, field_error
from service.models import Model, new_id
from service.schemas import ModelSpec
from service.storage import Storage, copy_fileobj

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth")
MAX_REPORTED_KEYS = 10


def parse_model_form(name: str | None, config: str | None, categories: str | None, filename: str | None):
    """Check the non-file form fields; returns ``(ModelSpec, categories or None, suffix)``."""
    errors: list[dict[str, Any]] = []
    if not name or len(name) > 200:
        errors.append(field_error(["body", "name"], "required, 1 to 200 characters", "missing"))
    spec = None
    try:
        spec = ModelSpec.model_validate(loads_finite(config or ""))
    except json.JSONDecodeError as e:
        errors.append(field_error(["body", "config"], f"must be a JSON ModelConfig object: {e.msg}", "json_invalid"))
    except ValidationError as e:
        errors += [field_error(["body", "config", *err["loc"]], err["msg"], err["type"]) for err in e.errors()]
    names = None
    if categories:
        try:
            names = loads_finite(categories)
        except json.JSONDecodeError as e:
            names = e
        if not (isinstance(names, list) and all(isinstance(n, str) and n for n in names)) or len(set(names)) != len(names):
            errors.append(field_error(["body", "categories"], "must be a JSON list of distinct non-empty names"))
        elif spec is not None and len(names) != spec.num_classes:
            errors.append(field_error(
                ["body", "categories"], f"{len(names)} names for config.num_classes {spec.num_classes}", "class_mismatch"
            ))
    suffix = Path(filename or "").suffix.lower()
    if suffix not in CHECKPOINT_SUFFIXES:
        errors.append(field_error(["body", "file"], f"file name must end in one of {list(CHECKPOINT_SUFFIXES)}"))
    if errors:
        raise FieldErrors(errors)
    return spec, names, suffix


def check_checkpoint(path: Path, cfg: ModelConfig) -> None:
    """Raise ``FieldErrors`` on ["body", "file"] unless ``path`` loads strictly into ``cfg``'s detector.

    Only keys and shapes are compared (all a strict load checks): the file's from its header (or a
    memory map), the detector's from a build on the meta device. So the API process never holds
    the weights, nor a model of whatever size the config asks for."""
    from gid_core.models import read_state_dict_shapes, state_dict_mismatch, state_dict_shapes

    loc = ["body", "file"]
    try:
        given = read_state_dict_shapes(path)
    except Exception as e:  # noqa: BLE001 - any reader error means "not a usable checkpoint"
        raise FieldErrors.one(loc, f"not a loadable state_dict (safetensors or weights-only torch file): {e}", "invalid_checkpoint") from None
    try:
        own = state_dict_shapes(cfg)
    except (ValueError, RuntimeError) as e:  # a config pydantic accepts but the builder cannot make
        raise FieldErrors.one(["body", "config"], f"cannot build this detector: {e}") from None
    missing, unexpected, mis_shaped = state_dict_mismatch(own, given)
    if missing or unexpected or mis_shaped:
        error = field_error(
            loc,
            f"state_dict does not fit a {cfg.arch}/{cfg.backbone} with {cfg.num_classes} classes: "
            f"{len(missing)} missing, {len(unexpected)} unexpected, {len(mis_shaped)} shape-mismatched keys",
            "state_dict_mismatch",
        )
        error["ctx"] = {
            "missing": missing[:MAX_REPORTED_KEYS],
            "unexpected": unexpected[:MAX_REPORTED_KEYS],
            "shape_mismatch": [f"{k}: {list(given[k])} vs {list(own[k])}" for k in mis_shaped[:MAX_REPORTED_KEYS]],
        }
        raise FieldErrors([error])


def register_upload(
    session: Session,
    *,
    owner_id: str,
    name: str,
    spec: ModelSpec,
    categories: list[str] | None,
    suffix: str,
    fileobj: BinaryIO,
    storage: Storage,
    settings: Settings,
) -> Model:
    model_id = new_id()
    staged = copy_fileobj(fileobj, storage.tmp_dir / f"{model_id}{suffix}", max_bytes=settings.max_upload_bytes)
    final = storage.model_path(model_id, suffix)
    try:
        cfg = spec.to_model_config()
        check_checkpoint(staged.path, cfg)
        os.replace(staged.path, final)
        fsync_path(final.parent)
    except BaseException:
        staged.path.unlink(missing_ok=True)
        raise
    try:
        return crud.create_model(
            session, owner_id=owner_id, name=name, model_id=model_id, config=cfg.model_dump(mode="json"),
            categories=categories, path=str(final), sha256=staged.sha256, size=staged.size,
        )
    except BaseException:
        final.unlink(missing_ok=True)
        raise
