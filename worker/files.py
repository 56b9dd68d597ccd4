"""Small file and process helpers shared by the supervisor (``worker.tasks``) and the training child
(``worker.runner``). Nothing here imports torch: the Celery process stays light."""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import re
import signal
import sys
from collections import deque
from pathlib import Path
from typing import Any

from gid_core.fileio import atomic_write_text

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
CHECKPOINT_POINTER = "last"  # gid_core.checkpoint.POINTER: names the newest complete checkpoint


def die_with_parent(expected_parent: int | None = None) -> None:
    """Ask Linux to SIGKILL this process when its parent exits; exit now if it already has."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        logger.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    if expected_parent is not None and os.getppid() != expected_parent:
        os._exit(1)  # the parent died before the request took effect


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write ``payload`` as JSON to a temp file beside ``path``, fsync, rename over ``path``."""
    atomic_write_text(path, json.dumps(finite_only(payload), indent=2, default=_json_default, allow_nan=False))


def read_json(path: Path) -> Any | None:
    """The JSON in ``path``, or None if it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def finite_only(value: Any) -> Any:
    """``value`` with non-finite floats replaced by None (JSON has no NaN; databases differ on it)."""
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): finite_only(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_only(v) for v in value]
    if hasattr(value, "item"):
        return finite_only(value.item())
    return value


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint of a job's output directory (the one ``last`` names)."""
    directory = Path(output_dir) / "checkpoints"
    try:
        name = (directory / CHECKPOINT_POINTER).read_text().strip()
    except OSError:
        return None
    path = directory / name
    return path if name and path.is_file() else None


def checkpoint_iteration(output_dir: Path) -> int | None:
    """The iteration of the newest complete checkpoint (``ckpt_0000500.pt`` -> 500), or None."""
    path = latest_checkpoint(output_dir)
    match = re.search(r"(\d+)", path.name) if path is not None else None
    return int(match.group(1)) if match else None


def tail_lines(path: Path, n: int = 30, max_bytes: int = 256 * 1024) -> str:
    """The last ``n`` lines of a text file (reading at most its last ``max_bytes``)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            start = max(0, size - max_bytes)
            f.seek(start)
            data = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    lines = data.splitlines()
    if start > 0 and lines:
        lines = lines[1:]  # began mid-line
    return "\n".join(deque(lines, maxlen=n))
