"""``GET /v1/jobs/{id}/instances``: the general instances GISM picks at a distillation job's newest
checkpoint (``gid_core.inspect``), for the dashboard's GI view.

Teacher and student run in the API process on the CPU, so the cost is bounded: checkpoints (and
teacher weights) above ``GID_INSPECT_MAX_CHECKPOINT_BYTES`` are refused, only the first
``GID_INSPECT_MAX_IMAGES`` validation images are offered, one inspection runs at a time, and the
loaded models and answers are cached per checkpoint file (a new checkpoint is a new key).
"""

from __future__ import annotations

import base64
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel

from gid_core.config import JobConfig
from gid_core.inspect import GIInspector
from gid_core.jobdir import JobDir
from service import crud
from service.api.deps import CurrentOwner, JobId, SessionDep, SettingsDep, StorageDep
from service.api.responses import AUTHENTICATED, error_responses
from service.errors import Conflict, FieldErrors

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=AUTHENTICATED)


class Detection(BaseModel):
    box: list[float]
    label: int
    score: float


class GroundTruth(BaseModel):
    box: list[float]
    label: int


class GeneralInstance(BaseModel):
    box: list[float]
    teacher_box: list[float]
    student_box: list[float]
    source: str
    score: float
    label: int | None
    teacher_prob: float
    student_prob: float


class InstancesOut(BaseModel):
    job_id: str
    checkpoint: str
    num_images: int
    index: int
    image_id: int
    width: int
    height: int
    image_png: str
    categories: list[str]
    ground_truth: list[GroundTruth]
    general_instances: list[GeneralInstance]
    teacher: list[Detection]
    student: list[Detection]


class _LRU(OrderedDict):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def put(self, key: Any, value: Any) -> Any:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)
        return value


_lock = threading.Lock()  # one inspection at a time: each uses every CPU thread torch has
_inspectors = _LRU(2)
_answers = _LRU(64)


def _weights_file(job_dir: JobDir) -> Path:
    """The newest checkpoint, else the export (a succeeded job's checkpoints may be released)."""
    latest = job_dir.latest_checkpoint()
    if latest is not None:
        return latest
    if job_dir.export_weights.is_file():
        return job_dir.export_weights
    raise Conflict("the job has no checkpoint yet")


def _check_size(path: Path, limit: int) -> None:
    size = path.stat().st_size
    if size > limit:
        raise Conflict(f"{path.name} is {size} bytes, above GID_INSPECT_MAX_CHECKPOINT_BYTES ({limit})")


@router.get("/{job_id}/instances", response_model=InstancesOut, responses=error_responses(404, 409))
def general_instances(
    job_id: JobId,
    owner: CurrentOwner,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    image: Annotated[int, Query(ge=0, le=1000, description="validation image index")] = 0,
    score_threshold: Annotated[float, Query(ge=0.0, le=1.0, description="detections shown at or above")] = 0.3,
):
    """GIs of one validation image at the job's newest checkpoint (teacher box vs student box,
    GI score), beside the teacher's and the student's detections. Distillation jobs only."""
    job = crud.get_owned_job(session, owner_id=owner.id, job_id=job_id)
    if job.kind != "distill":
        raise Conflict("general instances exist only for distillation jobs")
    if job.val_dataset_id is None:
        raise Conflict("the job has no validation dataset")
    engine_job = JobConfig.model_validate(job.engine_config)
    session.close()  # the models load and run for a while: no transaction stays open meanwhile
    weights = _weights_file(JobDir(storage.job_dir(job_id)))
    for path in (weights, Path(engine_job.teacher.weights)):
        _check_size(path, settings.inspect_max_checkpoint_bytes)
    stat = weights.stat()
    key = (job_id, str(weights), stat.st_mtime_ns, stat.st_size)
    with _lock:
        inspector = _inspectors.get(key) or _inspectors.put(key, GIInspector.from_job(engine_job, weights))
        num_images = min(len(inspector), settings.inspect_max_images)
        if image >= num_images:
            raise FieldErrors.one(["query", "image"], f"must be below {num_images} (validation images offered)")
        answer_key = (key, image, score_threshold)
        answer = _answers.get(answer_key)
        if answer is None:
            view = inspector.inspect(image, score_threshold=score_threshold)
            png = base64.b64encode(inspector.image_png(image)).decode()
            answer = _answers.put(answer_key, {**view, "image_png": f"data:image/png;base64,{png}"})
    return {**answer, "job_id": job_id, "checkpoint": weights.name, "num_images": num_images}
