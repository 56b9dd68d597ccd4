"""File helpers of every layer: crash-safe writes, JSON results, hashes, log tails.

Writes go to a temp file beside the target, which is fsynced and renamed over it, and the directory
is fsynced: readers see either the old file or the complete new one, never a half-written file.
Nothing here imports torch (the worker's supervisor stays light).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_path(path: str | os.PathLike[str]) -> None:
    """fsync a file or a directory (a rename is durable only once its directory is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Any, *, binary: bool = True, mode: int | None = None) -> None:
    """Calls ``write(file)`` on a temp file beside ``path``, fsyncs it and renames it to ``path``.
    ``mode``: the file's permissions (default: 0666 less the umask); a secret passes 0o600, which
    the file has from its creation on."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # created 0600
    try:
        if mode != 0o600:
            os.fchmod(fd, 0o666 & ~current_umask() if mode is None else mode)
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_path(path.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    atomic_write(Path(path), lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike[str], text: str, *, mode: int | None = None) -> None:
    """``text`` as UTF-8, all or nothing; creates missing parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode("utf-8")
    atomic_write(path, lambda f: f.write(data), mode=mode)


def finite_only(value: Any) -> Any:
    """``value`` with non-finite floats replaced by None (JSON has no NaN; databases differ on it),
    tuples as lists, dict keys as strings and numpy / torch scalars as Python numbers."""
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


def _json_default(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """``data`` as indented JSON with sorted keys, all or nothing; creates missing parent folders.
    Non-finite floats are written as null, paths as strings; anything else not JSON raises
    ``TypeError`` and leaves an existing file untouched."""
    text = json.dumps(finite_only(data), indent=2, sort_keys=True, allow_nan=False, default=_json_default)
    atomic_write_text(path, text + "\n")


def read_json(path: str | os.PathLike[str]) -> Any | None:
    """The JSON in ``path``, or None if it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def loads_finite(text: str | bytes) -> Any:
    """``json.loads`` for untrusted text: only what RFC 8259 allows, and no depth bomb.

    Python's parser accepts ``NaN``, ``Infinity`` and ``-Infinity`` and turns ``1e999`` into
    ``inf``; none is JSON and none survives a JSON response, so each is refused here. Nesting deep
    enough to exhaust the interpreter's stack is refused too. Every refusal is a
    ``json.JSONDecodeError`` (a ``ValueError``), as for any other malformed JSON.
    """
    doc = text if isinstance(text, str) else text.decode("utf-8", errors="replace")
    try:
        return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", doc, 0) from None
    except UnicodeDecodeError as e:
        raise json.JSONDecodeError(f"not UTF-8 text ({e.reason})", doc, e.start) from None


def _refuse_constant(name: str) -> Any:
    raise json.JSONDecodeError(f"{name} is not a JSON number (non-finite numbers are refused)", name, 0)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise json.JSONDecodeError(f"{text} is out of the finite number range", text, 0)
    return value


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """The hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def tail_lines(path: str | os.PathLike[str], n: int = 30, max_bytes: int = 256 * 1024) -> str:
    """The last ``n`` lines of a text file (reading at most its last ``max_bytes``); "" if unreadable."""
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


def flatten_metrics(results: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """``{"AP": 1.0, "per_category": {"cat": 2.0}}`` -> ``{"eval/AP": 1.0, "eval/per_category/cat": 2.0}``;
    lists of ``{"name": ..., <metric>: ...}`` rows are keyed by name; non-numbers are dropped."""
    flat: dict[str, float] = {}
    for key, value in results.items():
        name = f"{prefix}/{key}"
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            flat[name] = float(value)
        elif isinstance(value, Mapping):
            flat.update(flatten_metrics(value, name))
        elif isinstance(value, list):
            for row in value:
                if isinstance(row, Mapping) and "name" in row:
                    rest = {k: v for k, v in row.items() if k not in ("name", "id")}
                    flat.update(flatten_metrics(rest, f"{name}/{row['name']}"))
    return flat
