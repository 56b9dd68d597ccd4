"""The engine's YAML configs (``examples/*.yaml``, ``python -m gid_core``) as REST job requests.

An engine ``JobConfig`` names files: dataset paths and teacher (or initial) weights. The request
names datasets and models, so ``to_request`` maps each file to one on the server, reusing what an
earlier conversion made: a dataset is registered by its server path (a local server) or else
uploaded, under a name derived from its paths (``paths-<hash>``); a weights file is uploaded as a
model named after its content's sha256. Everything else (student, hyperparameters, devices)
carries over as is.
"""

from __future__ import annotations

import hashlib
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gid.client import ApiError, Client, ClientError
from gid_core.fileio import sha256_file

# JobConfig fields that a REST job request does not have (it has resources and dataset names)
ENGINE_ONLY = ("data", "devices")


class ConversionError(ClientError):
    """The engine config cannot become a request; the message says what to change."""


def is_engine_config(body: dict[str, Any]) -> bool:
    """An engine ``JobConfig`` or ``EvalConfig`` rather than a REST request body."""
    teacher = body.get("teacher")
    return (any(k in body for k in ENGINE_ONLY) or (isinstance(teacher, dict) and "arch" in teacher)
            or ("model" in body and "annotations" in body))


def to_request(body: dict[str, Any], client: Client, *, info: Callable[[str], None]) -> dict[str, Any]:
    """The REST request for engine config ``body`` (its relative paths are taken from the current
    directory, as ``python -m gid_core`` does); datasets and weights are mapped on the server."""
    if "model" in body and "annotations" in body:
        return _evaluate_request(body, client, info)
    extra = sorted(set(body) - {"kind", "student", "teacher", "teacher_classes", "data", "hyperparameters", "devices"})
    if extra or not isinstance(body.get("data"), dict) or not isinstance(body.get("student"), dict):
        raise ConversionError(f"not an engine job config (kind, student, teacher, data, hyperparameters, devices)"
                              f"{': unknown ' + ', '.join(extra) if extra else ''}; `gid init KIND` prints a request body")
    data = body["data"]
    student = dict(body["student"])
    request: dict[str, Any] = {"kind": body.get("kind"), "student": student}
    if student.get("weights"):
        request["student"]["init_model_id"] = _model_for(client, student, student.pop("weights"), info)
    else:
        student.pop("weights", None)
    if body.get("teacher") is not None:
        request["teacher"] = _teacher_for(client, dict(body["teacher"]), body.get("teacher_classes") or {}, info)
    request["train_dataset"] = _dataset_for(client, data.get("train_annotations"), data.get("train_images"), info)
    if data.get("val_annotations") or data.get("val_images"):
        request["val_dataset"] = _dataset_for(client, data.get("val_annotations"), data.get("val_images"), info)
    if "hyperparameters" in body:
        request["hyperparameters"] = body["hyperparameters"]
    if "devices" in body:
        request["resources"] = {"devices": body["devices"]}
    return request


def _evaluate_request(body: dict[str, Any], client: Client, info: Callable[[str], None]) -> dict[str, Any]:
    """An engine ``EvalConfig`` as a ``kind: evaluate`` request: the model is a weights name or an
    uploaded file (with ``model_classes.categories``), the dataset mapped as a training job's."""
    extra = sorted(set(body) - {"model", "annotations", "images", "batch_size", "devices", "num_workers",
                                "model_classes"})
    if extra or not isinstance(body["model"], dict):
        unknown = f": unknown {', '.join(extra)}" if extra else ""
        raise ConversionError(f"not an engine evaluation config (model, annotations, images, batch_size, devices)"
                              f"{unknown}; `gid init evaluate` prints a request body")
    model, classes = dict(body["model"]), body.get("model_classes") or {}
    weights = model.pop("weights", None)
    request: dict[str, Any] = {"kind": "evaluate"}
    if isinstance(weights, str) and weights.startswith("torchvision:"):
        request["weights"] = weights
        request.update({k: model[k] for k in ("min_size", "max_size") if k in model})
    elif weights:
        request["model_id"] = _model_for(client, model, weights, info, categories=classes.get("categories"))
    else:
        raise ConversionError("model.weights: an evaluation needs trained weights (a file or a torchvision name)")
    if classes.get("class_map"):
        request["class_map"] = classes["class_map"]
    request["dataset"] = _dataset_for(client, body.get("annotations"), body.get("images"), info)
    devices = int(body.get("devices", 1))
    if "batch_size" in body:
        request["batch_size"] = int(body["batch_size"]) * devices  # the engine's is per device
    request["resources"] = {"devices": devices}
    return request


def _teacher_for(client: Client, teacher: dict[str, Any], classes: dict[str, Any],
                 info: Callable[[str], None]) -> dict[str, Any]:
    """The request's ``teacher``: a weights name, or the uploaded weights file with the teacher's
    category names (``teacher_classes.categories``); the class map carries over as is."""
    weights = teacher.pop("weights", None)
    if isinstance(weights, str) and weights.startswith("torchvision:"):
        ref: dict[str, Any] = {"weights": weights}
    elif weights:
        ref = {"model_id": _model_for(client, teacher, weights, info, categories=classes.get("categories"))}
    else:
        raise ConversionError("teacher.weights: a distillation teacher must be trained (a weights file)")
    for key in ("class_map", "allow_missing_classes"):
        if classes.get(key) is not None:
            ref[key] = classes[key]
    return ref


def _dataset_for(client: Client, annotations: Any, images: Any, info: Callable[[str], None]) -> str:
    if not annotations or not images:
        raise ConversionError("data: give annotations and images together for each dataset")
    ann, img = Path(annotations).expanduser().absolute(), Path(images).expanduser().absolute()
    digest = hashlib.sha256(f"{ann}\0{img}".encode()).hexdigest()[:10]
    name = f"{ann.parent.parent.name}-{ann.parent.name}-{digest}".lstrip("-")
    existing = _find(client, "datasets", name)
    if existing is not None:
        return existing
    try:
        dataset = client.register_dataset(name=name, annotations=str(ann), images=str(img))
        info(f"registered dataset {name} ({dataset['id']}) from {ann}")
    except ApiError as e:
        if e.status_code not in (400, 403, 404, 422):
            raise
        dataset = _upload_dataset(client, name, ann, img)  # the server cannot read these paths
        info(f"uploaded dataset {name} ({dataset['id']}) from {ann}")
    return dataset["id"]


def _upload_dataset(client: Client, name: str, annotations: Path, images: Path) -> dict[str, Any]:
    if not annotations.is_file() or not images.is_dir():
        raise ConversionError(f"data: {annotations} (a file) and {images} (a folder) must exist here to upload them")
    with tempfile.TemporaryDirectory(prefix="gid-upload-") as tmp:
        archive = zip_folder(images, Path(tmp) / "images.zip")
        return client.upload_dataset(name=name, annotations=annotations, images_zip=archive)


def zip_folder(folder: Path, archive: Path) -> Path:
    """``folder``'s files into ``archive`` (stored: images are compressed already)."""
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as z:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                z.write(path, path.relative_to(folder).as_posix())
    return archive


def _model_for(client: Client, config: dict[str, Any], weights: str, info: Callable[[str], None],
               *, categories: list[str] | None = None) -> str:
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ConversionError(f"weights: {weights} is not a file here; upload it with `gid models upload` "
                              "and give the model id instead")
    name = f"{path.stem}-{sha256_file(path)[:12]}"
    existing = _find(client, "models", name)
    if existing is not None:
        return existing
    model = client.upload_model(path, name=name, config=config, categories=categories)
    info(f"uploaded model {name} ({model['id']}) from {path}")
    return model["id"]


def _find(client: Client, resource: str, name: str) -> str | None:
    try:
        return client.get(f"/v1/{resource}/{name}")["id"]
    except ApiError as e:
        if e.status_code == 404:
            return None
        raise
