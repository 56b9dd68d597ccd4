"""The layout of a job's output folder, shared by the engine (which writes it) and the worker
(which registers its files). No torch here: the worker's supervisor imports it.

::

    checkpoints/ckpt_0000500.pt    resumable state (``gid_core.checkpoint``)
    checkpoints/last               file name of the newest complete checkpoint
    export/model.safetensors       the student alone, torchvision state_dict (``gid_core.export``)
    export/metadata.json           model config, categories, training config, final metrics
    metrics.json                   final evaluation
    train_log.jsonl                every logged metric (rank 0), trimmed back to the checkpoint on resume
    job.json                       the ``JobConfig`` the worker ran
    logs/attempt-<n>.log           the worker's training child output, per attempt
    logs/attempt-<n>.result.json   the outcome the training child reports to the worker

A checkpoint is complete once it has its final name; the pointer is written after it, so a
checkpoint file without a pointer (a crash in between) is complete too.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

logger = logging.getLogger(__name__)

CHECKPOINT_POINTER = "last"
CHECKPOINT_FILE = re.compile(r"^[A-Za-z0-9_.-]+\.pt$")
EXPORT_WEIGHTS = "model.safetensors"
EXPORT_METADATA = "metadata.json"
_ITERATION_CHECKPOINT = re.compile(r"^ckpt_(\d+)\.pt$")


def checkpoint_filename(iteration: int) -> str:
    """``ckpt_0000500.pt``: the name of the checkpoint taken after ``iteration`` iterations."""
    return f"ckpt_{iteration:07d}.pt"


def list_checkpoints(directory: str | os.PathLike[str]) -> list[Path]:
    """The checkpoint files in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    files = [p for p in directory.iterdir() if CHECKPOINT_FILE.match(p.name) and p.is_file()]
    return sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name))


def latest_checkpoint(directory: str | os.PathLike[str]) -> Path | None:
    """The checkpoint the pointer of ``directory`` names, else (no pointer, or it names a missing
    file) the newest checkpoint file; None when there is none."""
    directory = Path(directory)
    pointer = directory / CHECKPOINT_POINTER
    if pointer.is_file():
        name = pointer.read_text().strip()
        if not CHECKPOINT_FILE.match(name):
            raise ValueError(f"{pointer}: invalid checkpoint name {name!r}")
        path = directory / name
        if path.is_file():
            return path
        logger.warning("%s names missing checkpoint %s; using the newest file", pointer, name)
    files = list_checkpoints(directory)
    return files[-1] if files else None


class JobDir:
    """Paths of one job's output folder (nothing is created)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"JobDir({str(self.root)!r})"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def last_pointer(self) -> Path:
        return self.checkpoints / CHECKPOINT_POINTER

    @property
    def export(self) -> Path:
        return self.root / "export"

    @property
    def export_weights(self) -> Path:
        return self.export / EXPORT_WEIGHTS

    @property
    def export_metadata(self) -> Path:
        return self.export / EXPORT_METADATA

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def train_log(self) -> Path:
        return self.root / "train_log.jsonl"

    @property
    def config(self) -> Path:
        return self.root / "job.json"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def attempt_log(self, attempt: int) -> Path:
        return self.logs / f"attempt-{attempt}.log"

    def attempt_result(self, attempt: int) -> Path:
        return self.logs / f"attempt-{attempt}.result.json"

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint (see ``latest_checkpoint``)."""
        return latest_checkpoint(self.checkpoints)

    def checkpoint_iteration(self) -> int | None:
        """The iteration of the newest complete checkpoint (``ckpt_0000500.pt`` -> 500), or None."""
        path = self.latest_checkpoint()
        match = _ITERATION_CHECKPOINT.match(path.name) if path is not None else None
        return int(match.group(1)) if match else None
