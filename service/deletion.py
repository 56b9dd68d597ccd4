"""Deleting what an owner stored, and how much that is: ``DELETE /v1/{jobs,models,datasets}/{id}``
and ``GET /v1/usage``.

The database decides first, the files follow: each delete commits its row change (or is refused
with ``Conflict`` while a queued or running job needs the thing) and only then frees the files, so
a crash in between leaves an unreferenced folder, never a row that names missing files.

What a delete means:

* **job** (finished only): the row goes with its metrics, artifacts and attempts, and its folder
  (checkpoints, logs, export). The model it produced is *not* deleted: its weights get a name under
  ``models/`` first (a hard link), and the model only loses its ``source_job_id``.
* **model / dataset**: refused while a queued or running job uses it. Otherwise the files are freed
  and the row is kept as a tombstone (``deleted_at``): finished jobs still name what they were
  trained on, while the API answers 404 for it and no new job can use it. A dataset registered by
  path is the user's own folder: only its registration goes, its files are never touched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from service import crud
from service.models import Model
from service.storage import Storage, tree_size
from service.status import TERMINAL_STATUSES

USAGE_MAX_ENTRIES = 200_000  # files visited by one usage request, all folders together


def delete_job(session: Session, storage: Storage, *, owner_id: str, job_id: str) -> None:
    job = crud.get_owned_job(session, owner_id=owner_id, job_id=job_id)
    output = session.get(Model, job.output_model_id) if job.output_model_id else None
    session.commit()  # no transaction (on SQLite: no write lock) held during the file work
    job_dir = storage.job_dir(job_id)
    moved: dict[str, str] = {}
    if (job.status in TERMINAL_STATUSES and output is not None and output.deleted_at is None
            and Path(output.path).is_relative_to(job_dir) and Path(output.path).is_file()):
        moved[output.id] = str(storage.adopt_model_file(output.path, output.id))
    crud.delete_finished_job(session, owner_id=owner_id, job_id=job_id, moved_models=moved)
    storage.remove(job_dir)


def delete_model(session: Session, storage: Storage, *, owner_id: str, model_id: str) -> None:
    model = crud.mark_model_deleted(session, owner_id=owner_id, model_id=model_id)
    storage.remove_owned(model.path)


def delete_dataset(session: Session, storage: Storage, *, owner_id: str, dataset_id: str) -> None:
    dataset = crud.mark_dataset_deleted(session, owner_id=owner_id, dataset_id=dataset_id)
    if dataset.source == "upload":
        storage.remove_owned(storage.dataset_dir(dataset.id))


def usage(session: Session, storage: Storage, *, owner_id: str) -> dict[str, Any]:
    """Counts and bytes by kind. Bytes are what the store holds for the owner, each file once: an
    uploaded dataset's folder, a model file under ``models/`` (a job's output model is counted with
    its job's folder, where it lives), a job's folder. ``exact`` is False when the walk stopped at
    ``USAGE_MAX_ENTRIES`` (the numbers are then lower bounds)."""
    rows = crud.usage_counts(session, owner_id=owner_id)
    left = USAGE_MAX_ENTRIES

    def walk(path: Path) -> int:
        nonlocal left
        size, seen = tree_size(path, max_entries=max(left, 0))
        left -= seen
        return size

    kinds = {
        "datasets": (len(rows["datasets"]),
                     sum(walk(storage.dataset_dir(i)) for i, source in rows["datasets"] if source == "upload")),
        "models": (len(rows["models"]),
                   sum(size for path, size in rows["models"] if Path(path).parent == storage.models_dir)),
        "jobs": (len(rows["jobs"]), sum(walk(storage.job_dir(i)) for i in rows["jobs"])),
    }
    out: dict[str, Any] = {k: {"count": c, "bytes": b} for k, (c, b) in kinds.items()}
    out["total_bytes"] = sum(b for _, b in kinds.values())
    out["exact"] = left >= 0
    return out
