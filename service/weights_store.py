"""The service's cache of torchvision's published weights: ``<torch_home>/hub/checkpoints``.

``gid_core.weights`` names the files (torchvision's own file names, as torch's hub cache keeps
them); this module is the service's side of the cache: which files are present, what a job
refuses at submission when one is missing (the file to place, where, and how to upload it), the
hash-checked upload of ``PUT /v1/weights/{name}``, and the worker's download where
``allow_weights_download`` permits it.

Paths are computed from ``Settings.torch_home``, never from the process environment, so several
apps in one process (tests) each see their own cache. The training child gets the same folder as
``TORCH_HOME`` (``worker.tasks``), where the engine's loader looks.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from gid_core.config import EvalConfig, JobConfig, ModelConfig
from gid_core.errors import Loc, Problem
from gid_core.fileio import fsync_path
from gid_core.weights import (
    TorchvisionWeights,
    WeightsError,
    is_weights_name,
    lookup,
    model_config_for,
    resolve,
    weights_names,
)
from service.core.config import Settings
from service.errors import FieldErrors, NotFound
from service.storage import write_stream

# ModelConfig field -> the kind of weights name it takes
WEIGHTS_FIELDS = (("weights", "detector"), ("backbone_weights", "backbone"))


def cache_dir(settings: Settings) -> Path:
    """torch's hub checkpoint folder under the service's ``TORCH_HOME``."""
    return settings.torch_home / "hub" / "checkpoints"


def weights_path(settings: Settings, spec: TorchvisionWeights) -> Path:
    return cache_dir(settings) / spec.file_name


def hash_matches(sha256_hex: str, expected_prefix: str) -> bool:
    """torch.hub's ``check_hash`` rule: the file's sha256 starts with the prefix in its file name."""
    return bool(expected_prefix) and sha256_hex.lower().startswith(expected_prefix.lower())


def missing_file_problems(cfg: ModelConfig, settings: Settings, *, loc: Loc = ()) -> list[Problem]:
    """A problem for each torchvision name of ``cfg`` whose file is not in the cache, at
    ``loc + (field,)``; none where the worker may download. Unknown names are
    ``gid_core.weights.weights_problems``'s to report."""
    if settings.allow_weights_download:
        return []
    problems = []
    for field, kind in WEIGHTS_FIELDS:
        name = getattr(cfg, field)
        if not is_weights_name(name):
            continue
        try:
            spec = lookup(name, kind=kind)
        except WeightsError:  # reported by weights_problems
            continue
        path = weights_path(settings, spec)
        if not path.is_file():
            problems.append(Problem(
                (*loc, field),
                f"{spec.name}: weights file {spec.file_name} is not on the server: upload it with "
                f"`gid weights import {spec.name} FILE` (PUT /v1/weights/{spec.name}) or place it at {path} "
                f"(torchvision's file from {spec.url})",
                "weights_missing",
            ))
    return problems


def describe(spec: TorchvisionWeights, settings: Settings) -> dict[str, Any]:
    """One ``WeightsOut`` of ``GET /v1/weights``."""
    return {
        "name": spec.name,
        "kind": spec.kind,
        "arch": model_config_for(spec.name).arch if spec.kind == "detector" else None,
        "backbone": spec.backbone,
        "categories": list(spec.categories) if spec.kind == "detector" else None,
        "file_name": spec.file_name,
        "hash_prefix": spec.hash_prefix,
        "url": spec.url,
        "present": weights_path(settings, spec).is_file(),
    }


def list_weights(settings: Settings) -> list[dict[str, Any]]:
    return [describe(lookup(name, kind=kind), settings) for kind in ("detector", "backbone")
            for name in weights_names(kind)]


def find(name: str) -> TorchvisionWeights:
    """The weights ``name`` stands for, of either kind; ``NotFound`` when it names none."""
    for kind in ("detector", "backbone"):
        try:
            return lookup(name, kind=kind)
        except WeightsError:
            pass
    raise NotFound("weights", name)


def store(chunks: Iterable[bytes], spec: TorchvisionWeights, settings: Settings, *,
          expected_prefix: str | None = None) -> dict[str, Any]:
    """Write ``chunks`` as ``spec``'s cached file if their sha256 starts with ``expected_prefix``
    (by default the prefix in torchvision's file name); 422 and nothing written otherwise.

    The file is staged beside its final place and renamed over it: a reader (a starting job) sees
    the old file or the whole new one. Its contents are not parsed here: the hash says it is
    torchvision's file, and the engine reads it ``weights_only``."""
    expected = spec.hash_prefix if expected_prefix is None else expected_prefix
    final = weights_path(settings, spec)
    staged = write_stream(chunks, final.with_name(f".{final.name}.{uuid.uuid4().hex}.upload"),
                          max_bytes=settings.max_upload_bytes, field="body")
    try:
        if not hash_matches(staged.sha256, expected):
            raise FieldErrors.one(
                ["body"],
                f"not torchvision's {spec.file_name}: its sha256 {staged.sha256[:16]}... does not start with "
                f"{expected!r}, the hash prefix in the file name (a corrupt or different download?)",
                "hash_mismatch",
            )
        os.replace(staged.path, final)
        fsync_path(final.parent)
    except BaseException:
        staged.path.unlink(missing_ok=True)
        raise
    return {**describe(spec, settings), "sha256": staged.sha256, "size": staged.size}


def download_missing(job: JobConfig | EvalConfig) -> list[Path]:
    """Fetch every torchvision file ``job`` names that is not in ``$TORCH_HOME``'s cache, with
    torchvision's hash check (the worker's training child, where ``allow_weights_download``)."""
    paths = []
    models = (job.model,) if isinstance(job, EvalConfig) else (job.student, job.teacher)
    for model in filter(None, models):
        for field, kind in WEIGHTS_FIELDS:
            name = getattr(model, field)
            if is_weights_name(name):
                paths.append(resolve(name, kind=kind, loc=(field,), allow_download=True))
    return paths

