"""The file store under ``settings.data_dir``: uploaded datasets and models, job outputs.

Layout::

    <data_dir>/datasets/<dataset_id>/annotations.json, images/...   (uploaded datasets)
    <data_dir>/models/<model_id>.safetensors | .pt                  (uploaded checkpoints)
    <data_dir>/jobs/<job_id>/...                                    (a job's output_dir)
    <data_dir>/tmp/                                                 (staging, same filesystem)

Nothing is ever half-written where a reader can see it: files are streamed to a temporary name in
the destination folder (hashing on the way), fsynced and renamed; folders are built in ``tmp/`` and
renamed into place. Zip archives are checked member by member before anything is extracted.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
import time
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from gid_core.fileio import fsync_path
from gid_core.jobdir import JobDir

CHUNK = 1024 * 1024
# Members below this size may compress arbitrarily well (a blank PNG) without being a bomb.
ZIP_RATIO_FLOOR_BYTES = 1024 * 1024


@dataclass(frozen=True)
class StoredFile:
    path: Path
    size: int
    sha256: str


class UploadTooLarge(Exception):
    def __init__(self, field: str, limit: int) -> None:
        super().__init__(f"{field}: larger than the limit of {limit} bytes")
        self.field, self.limit = field, limit


class UnsafeArchive(ValueError):
    """A zip archive that is malformed or would write outside its folder or blow up in size."""


def write_stream(chunks: Iterable[bytes], dest: Path, *, max_bytes: int, field: str = "file") -> StoredFile:
    """Stream ``chunks`` to ``dest`` atomically, hashing as it goes; ``UploadTooLarge`` past ``max_bytes``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest, size = hashlib.sha256(), 0
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                size += len(chunk)
                if size > max_bytes:
                    raise UploadTooLarge(field, max_bytes)
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(dest.parent)
    return StoredFile(path=dest, size=size, sha256=digest.hexdigest())


def read_chunks(fileobj: BinaryIO, chunk_size: int = CHUNK) -> Iterator[bytes]:
    while chunk := fileobj.read(chunk_size):
        yield chunk


def copy_fileobj(fileobj: BinaryIO, dest: Path, *, max_bytes: int, field: str = "file") -> StoredFile:
    return write_stream(read_chunks(fileobj), dest, max_bytes=max_bytes, field=field)


def check_zip_member_name(name: str) -> None:
    """Refuse names that could land outside the extraction folder (zip-slip)."""
    if not name or "\x00" in name:
        raise UnsafeArchive(f"zip member {name!r}: empty or NUL in name")
    if "\\" in name:
        raise UnsafeArchive(f"zip member {name!r}: backslash in name")
    path = PurePosixPath(name)
    if path.is_absolute() or (path.parts and ":" in path.parts[0]):
        raise UnsafeArchive(f"zip member {name!r}: absolute path")
    if ".." in path.parts:
        raise UnsafeArchive(f"zip member {name!r}: '..' in path")


def extract_zip(
    archive: Path, dest: Path, *, max_members: int, max_total_bytes: int, max_ratio: float
) -> int:
    """Extract ``archive`` into the new folder ``dest`` after checking every member; returns the file count.

    Refused (``UnsafeArchive``): not a zip, encrypted members, symlinks, absolute or ``..`` names,
    more than ``max_members`` members, more than ``max_total_bytes`` uncompressed, a member
    compressed more than ``max_ratio`` times, or a member whose data is longer than its header says.
    """
    if not zipfile.is_zipfile(archive):
        raise UnsafeArchive("not a zip archive")
    dest.mkdir(parents=True, exist_ok=False)
    root = dest.resolve()
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as e:
        raise UnsafeArchive(f"corrupt zip archive: {e}") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > max_members:
            raise UnsafeArchive(f"{len(infos)} members: more than the limit of {max_members}")
        total = 0
        for info in infos:
            check_zip_member_name(info.filename)
            if info.flag_bits & 0x1:
                raise UnsafeArchive(f"zip member {info.filename!r}: encrypted")
            if stat.S_ISLNK(info.external_attr >> 16):
                raise UnsafeArchive(f"zip member {info.filename!r}: symbolic link")
            if not (root / info.filename).resolve().is_relative_to(root):
                raise UnsafeArchive(f"zip member {info.filename!r}: resolves outside the archive folder")
            total += info.file_size
            if info.file_size > ZIP_RATIO_FLOOR_BYTES and info.file_size > max_ratio * max(info.compress_size, 1):
                raise UnsafeArchive(
                    f"zip member {info.filename!r}: compression ratio above {max_ratio:g} (zip bomb?)"
                )
        if total > max_total_bytes:
            raise UnsafeArchive(f"uncompressed size {total} bytes: more than the limit of {max_total_bytes}")
        try:
            return sum(_extract_member(zf, info, root) for info in infos)
        except (zipfile.BadZipFile, NotImplementedError, EOFError, zlib.error) as e:
            raise UnsafeArchive(f"corrupt or unsupported zip archive: {e}") from None


def _extract_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, root: Path) -> int:
    target = root / info.filename
    if info.is_dir():
        target.mkdir(parents=True, exist_ok=True)
        return 0
    target.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with zf.open(info) as src, open(target, "xb") as out:
        for chunk in read_chunks(src):
            written += len(chunk)
            if written > info.file_size:  # the header lied about the size
                raise UnsafeArchive(f"zip member {info.filename!r}: more data than its declared size")
            out.write(chunk)
    return 1


class Storage:
    """Paths of the store; every folder is created on first use."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.datasets_dir = self.root / "datasets"
        self.models_dir = self.root / "models"
        self.jobs_dir = self.root / "jobs"
        self.tmp_dir = self.root / "tmp"
        for folder in (self.datasets_dir, self.models_dir, self.jobs_dir, self.tmp_dir):
            folder.mkdir(parents=True, exist_ok=True)

    def staging_dir(self) -> Path:
        """A fresh folder on the store's filesystem (so the final rename is atomic)."""
        return Path(tempfile.mkdtemp(dir=self.tmp_dir, prefix="stage-"))

    def dataset_dir(self, dataset_id: str) -> Path:
        return self.datasets_dir / dataset_id

    def model_path(self, model_id: str, suffix: str) -> Path:
        return self.models_dir / f"{model_id}{suffix}"

    def job_dir(self, job_id: str) -> Path:
        """The job's ``output_dir`` (the worker creates it)."""
        return self.jobs_dir / job_id

    @staticmethod
    def publish_dir(staging: Path, final: Path) -> None:
        """Rename a finished staging folder into place (``final`` must not exist)."""
        final.parent.mkdir(parents=True, exist_ok=True)
        os.rename(staging, final)
        fsync_path(final.parent)

    def purge_stale_tmp(self, max_age_seconds: float = 24 * 3600) -> None:
        """Remove staging leftovers of requests that died mid-upload (older than a day)."""
        cutoff = time.time() - max_age_seconds
        for entry in self.tmp_dir.iterdir():
            try:
                if entry.lstat().st_mtime < cutoff:
                    self.remove(entry)
            except FileNotFoundError:  # another process purged it first
                pass

    @staticmethod
    def remove(path: Path) -> None:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def contains(self, path: str | Path) -> bool:
        """True if ``path`` is inside the store (the service never deletes files it does not own,
        such as a dataset registered in place from a data root)."""
        return Path(path).resolve().is_relative_to(self.root.resolve())

    def remove_owned(self, path: str | Path) -> None:
        if self.contains(path) and Path(path).resolve() != self.root.resolve():
            self.remove(Path(path))

    def adopt_model_file(self, path: str | Path, model_id: str) -> Path:
        """A second name for a job's exported model under ``models/``, so the model outlives the
        job's folder: a hard link (no copy, no extra space; same filesystem), else an atomic copy.
        Crash-safe: the old name stays valid until the caller re-points the model row; a name
        already there is a complete earlier adoption (links and ``copy_fileobj`` are atomic)."""
        path = Path(path)
        dest = self.model_path(model_id, path.suffix)
        if dest.exists():
            return dest
        try:
            os.link(path, dest)
        except FileExistsError:  # a concurrent delete of the same job adopted it
            return dest
        except OSError:
            with open(path, "rb") as src:
                copy_fileobj(src, dest, max_bytes=path.stat().st_size)
        fsync_path(dest.parent)
        return dest

    def release_checkpoints(self, job_id: str) -> int:
        """Delete the training checkpoints of a finished job; returns the bytes freed. The export,
        metrics and logs stay (retention: ``keep_checkpoints_after_success``)."""
        folder = JobDir(self.job_dir(job_id)).checkpoints
        freed, _ = tree_size(folder)
        self.remove(folder)
        return freed


def tree_size(path: Path, *, max_entries: int = 1_000_000) -> tuple[int, int]:
    """``(bytes, entries)``: the size of the regular files under ``path`` (links not followed) and
    the entries visited. The walk stops after ``max_entries`` (then ``entries > max_entries`` and
    the bytes are a lower bound), so a request never walks without bound."""
    total, seen, stack = 0, 0, [path]
    while stack:
        try:
            entries = os.scandir(stack.pop())
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
        with entries:
            for entry in entries:
                seen += 1
                if seen > max_entries:
                    return total, seen
                try:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(Path(entry.path))
                    elif entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_size
                except FileNotFoundError:  # removed while we walk
                    pass
    return total, seen
