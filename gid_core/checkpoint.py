"""Atomic checkpoints that load with ``torch.load(weights_only=True)``, and RNG state capture.

A checkpoint is written to a temporary file in the checkpoint directory, flushed and fsynced,
renamed over its final name and the directory fsynced; only then is the ``last`` pointer (a small
text file holding the checkpoint's file name) replaced the same way. A crash at any point leaves
the previous checkpoint and pointer untouched. Everything saved must be tensors, primitives,
lists and dicts, so loading never unpickles arbitrary objects.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .fileio import atomic_write
from .jobdir import CHECKPOINT_FILE, CHECKPOINT_POINTER, latest_checkpoint, list_checkpoints

logger = logging.getLogger(__name__)


class Checkpointer:
    """Saves and finds checkpoints in ``directory``, keeping the newest ``keep`` of them."""

    def __init__(self, directory: str | os.PathLike[str], *, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = Path(directory)
        self.keep = keep

    def save(self, name: str, state: dict[str, Any]) -> Path:
        """Writes ``state`` as ``name`` (``.pt`` added if missing) and points ``last`` at it."""
        filename = name if name.endswith(".pt") else f"{name}.pt"
        if not CHECKPOINT_FILE.match(filename):
            raise ValueError(f"invalid checkpoint name {name!r}")
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / filename
        atomic_write(path, lambda f: torch.save(state, f))
        atomic_write(self.directory / CHECKPOINT_POINTER, lambda f: f.write(filename.encode()))
        self._prune(keep_name=filename)
        logger.info("saved checkpoint %s", path)
        return path

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        return list_checkpoints(self.directory)

    def latest_path(self) -> Path | None:
        return latest_checkpoint(self.directory)

    def load_latest(self) -> dict[str, Any] | None:
        path = self.latest_path()
        if path is None:
            return None
        logger.info("loading checkpoint %s", path)
        return torch.load(path, map_location="cpu", weights_only=True)

    def _prune(self, keep_name: str) -> None:
        files = [p for p in self.checkpoints() if p.name != keep_name]
        for old in files[: max(len(files) - (self.keep - 1), 0)]:
            old.unlink(missing_ok=True)


# --------------------------------------------------------------------------- RNG state


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) generator states as weights_only-loadable values."""
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": [py_version, list(py_internal), py_gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos),
                  int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    py_version, py_internal, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_internal), py_gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state(
        (np_name, np.asarray(np_keys, dtype=np.int64).astype(np.uint32), np_pos, np_has_gauss, np_gauss)
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
