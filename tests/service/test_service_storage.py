"""The file store: atomic hashed writes and zip extraction that refuses zip-slip and bombs."""

from __future__ import annotations

import hashlib
import stat
import zipfile
from pathlib import Path

import pytest

from gid_core.fileio import sha256_file
from service.storage import Storage, UnsafeArchive, UploadTooLarge, extract_zip, write_stream

LIMITS = dict(max_members=100, max_total_bytes=10_000_000, max_ratio=200.0)


def make_zip(path: Path, members: dict[str, bytes], *, compression=zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_write_stream_hashes_and_renames(tmp_path):
    chunks = [b"abc" * 1000, b"xyz" * 7]
    stored = write_stream(iter(chunks), tmp_path / "out" / "f.bin", max_bytes=10_000)
    data = b"".join(chunks)
    assert stored.path.read_bytes() == data and stored.size == len(data)
    assert stored.sha256 == hashlib.sha256(data).hexdigest() == sha256_file(stored.path)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["f.bin"]  # no temp file left


def test_write_stream_over_limit_leaves_nothing(tmp_path):
    (tmp_path / "f.bin").write_bytes(b"old")
    with pytest.raises(UploadTooLarge, match="annotations: larger than the limit of 10 bytes"):
        write_stream(iter([b"12345", b"678901"]), tmp_path / "f.bin", max_bytes=10, field="annotations")
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]
    assert (tmp_path / "f.bin").read_bytes() == b"old"  # the previous version is untouched


def test_extract_zip_writes_members(tmp_path):
    archive = make_zip(tmp_path / "a.zip", {"a.png": b"1", "sub/b.png": b"22", "sub/": b""})
    assert extract_zip(archive, tmp_path / "out", **LIMITS) == 2
    assert (tmp_path / "out" / "sub" / "b.png").read_bytes() == b"22"


@pytest.mark.parametrize(
    "name, reason",
    [
        ("../evil.png", "'..' in path"),
        ("ok/../../evil.png", "'..' in path"),
        ("/tmp/evil.png", "absolute path"),
        ("C:/evil.png", "absolute path"),
        ("..\\evil.png", "backslash"),
    ],
)
def test_zip_slip_refused(tmp_path, name, reason):
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("good.png", b"1")
        zf.writestr(zipfile.ZipInfo(name), b"pwned")
    with pytest.raises(UnsafeArchive, match=reason):
        extract_zip(archive, tmp_path / "x" / "out", **LIMITS)
    assert not (tmp_path / "x" / "evil.png").exists() and not (tmp_path / "evil.png").exists()
    assert not (tmp_path / "x" / "out" / "good.png").exists()  # checked before anything is written


def test_symlink_member_refused(tmp_path):
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        info = zipfile.ZipInfo("link.png")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(UnsafeArchive, match="symbolic link"):
        extract_zip(archive, tmp_path / "out", **LIMITS)


def test_zip_bombs_refused(tmp_path):
    bomb = make_zip(tmp_path / "bomb.zip", {"zeros.bin": bytes(5_000_000)})  # ~1000x compression
    with pytest.raises(UnsafeArchive, match="compression ratio"):
        extract_zip(bomb, tmp_path / "o1", **LIMITS)
    big = make_zip(tmp_path / "big.zip", {"a": bytes(600), "b": bytes(600)}, compression=zipfile.ZIP_STORED)
    with pytest.raises(UnsafeArchive, match="uncompressed size 1200 bytes"):
        extract_zip(big, tmp_path / "o2", **{**LIMITS, "max_total_bytes": 1000})
    many = make_zip(tmp_path / "many.zip", {f"{i}.png": b"x" for i in range(5)})
    with pytest.raises(UnsafeArchive, match="5 members"):
        extract_zip(many, tmp_path / "o3", **{**LIMITS, "max_members": 4})


def test_lying_header_refused(tmp_path):
    """A member whose data is longer than its central-directory size: only the declared bytes are
    read, and the CRC of the truncated data no longer matches."""
    archive = make_zip(tmp_path / "a.zip", {"a.bin": b"x" * 100}, compression=zipfile.ZIP_STORED)
    raw = bytearray(archive.read_bytes())
    # Shrink the declared uncompressed size in the central directory (offset 24 in the record).
    cd = raw.rfind(b"PK\x01\x02")
    raw[cd + 24 : cd + 28] = (10).to_bytes(4, "little")
    archive.write_bytes(bytes(raw))
    with pytest.raises(UnsafeArchive, match="corrupt"):
        extract_zip(archive, tmp_path / "out", **LIMITS)
    assert (tmp_path / "out" / "a.bin").stat().st_size <= 10


def test_not_a_zip(tmp_path):
    (tmp_path / "a.zip").write_bytes(b"hello")
    with pytest.raises(UnsafeArchive, match="not a zip"):
        extract_zip(tmp_path / "a.zip", tmp_path / "out", **LIMITS)


def test_storage_layout_and_publish(tmp_path):
    storage = Storage(tmp_path / "data")
    staging = storage.staging_dir()
    (staging / "f").write_text("x")
    storage.publish_dir(staging, storage.dataset_dir("d1"))
    assert (tmp_path / "data" / "datasets" / "d1" / "f").read_text() == "x" and not staging.exists()
    assert storage.job_dir("j").parent == tmp_path / "data" / "jobs"
    old = storage.staging_dir()
    import os

    os.utime(old, (0, 0))
    storage.purge_stale_tmp()
    assert not old.exists()
