"""File helpers: atomic JSON results, tolerant reads, hashes, log tails."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest

from gid_core.fileio import finite_only, read_json, sha256_file, tail_lines, write_json_atomic


def test_write_json_atomic_replaces_nan_and_leaves_no_temp_files(tmp_path: Path):
    path = tmp_path / "out" / "result.json"
    write_json_atomic(path, {"a": 1.5, "b": math.nan, "c": [math.inf, 2], "d": {"e": -math.inf}})
    assert json.loads(path.read_text()) == {"a": 1.5, "b": None, "c": [None, 2], "d": {"e": None}}
    write_json_atomic(path, {"a": 2})
    assert read_json(path) == {"a": 2}
    assert sorted(p.name for p in path.parent.iterdir()) == ["result.json"]
    with pytest.raises(TypeError):
        write_json_atomic(path, {"x": object()})
    assert read_json(path) == {"a": 2}  # the old file is intact after a failed write
    assert sorted(p.name for p in path.parent.iterdir()) == ["result.json"]
    assert read_json(tmp_path / "missing.json") is None


def test_write_json_atomic_writes_paths_as_strings(tmp_path: Path):
    write_json_atomic(tmp_path / "r.json", {"export_dir": tmp_path / "export"})
    assert read_json(tmp_path / "r.json") == {"export_dir": str(tmp_path / "export")}


def test_finite_only():
    assert finite_only({"x": (1.0, math.nan), "y": True, "z": None, 3: "s"}) == {
        "x": [1.0, None], "y": True, "z": None, "3": "s"}


def test_sha256_file(tmp_path: Path):
    data = bytes(range(256)) * 5000  # more than one chunk
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_file(path, chunk_size=4096) == sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_tail_lines(tmp_path: Path):
    log = tmp_path / "a.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)))
    assert tail_lines(log, 3) == "line 97\nline 98\nline 99"
    assert tail_lines(log, 3, max_bytes=10) == "line 99"  # only the last bytes are read
    assert tail_lines(tmp_path / "missing.log") == ""
