"""A job's log, readable while it runs: the training child's output, attempt by attempt.

The worker sends each attempt's output straight to ``<data_dir>/jobs/<id>/logs/attempt-<n>.log``
(``gid_core.jobdir``, unbuffered), and the API shares the data directory, so the API reads the
files themselves: no copy, no broker. The attempts are shown in order, each after a
``==> attempt <n> <==`` line when there is more than one.

``follow`` keeps reading what is appended (and the next attempt's file when the worker restarts
the training) every ``poll_seconds`` until the job is terminal. Like the event stream, it reads the
job's status *before* the files: the worker finishes a job only after its training child exited,
so once a terminal status is seen every byte of the log is on disk.
"""

from __future__ import annotations

import codecs
import os
import re
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import anyio

from gid_core.jobdir import JobDir
from service.status import TERMINAL_STATUSES

_ATTEMPT_LOG = re.compile(r"^attempt-(\d+)\.log$")
TAIL_WINDOW_BYTES = 4 * 1024 * 1024  # the most read backwards from the end of a file to find its tail
CHUNK_BYTES = 64 * 1024


def attempt_logs(job_dir: JobDir) -> list[tuple[int, Path]]:
    """``(attempt, path)`` of the job's attempt logs, oldest attempt first."""
    try:
        names = os.listdir(job_dir.logs)
    except OSError:
        return []
    found = [(int(m.group(1)), job_dir.logs / name) for name in names if (m := _ATTEMPT_LOG.match(name))]
    return sorted(found)


def header(attempt: int) -> str:
    return f"==> attempt {attempt} <==\n"


class LogReader:
    """Reads a job's attempt logs forward from where it stopped (one instance per response)."""

    def __init__(self, job_dir: JobDir) -> None:
        self.job_dir = job_dir
        self.attempt: int | None = None  # the attempt being read, and how far
        self.offset = 0
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def initial(self, tail: int | None) -> str:
        """Everything so far, or its last ``tail`` lines (headers count as lines); the reader then
        continues after it."""
        logs = attempt_logs(self.job_dir)
        parts: list[str] = []
        many = len(logs) > 1
        for attempt, path in logs:
            text = self._read_to_end(attempt, path, start=0 if tail is None else None)
            parts.append((header(attempt) if many else "") + text)
        text = "".join(parts)
        if tail is None:
            return text
        lines = text.splitlines(keepends=True)
        return "".join(deque(lines, maxlen=tail)) if tail else ""

    def more(self) -> str:
        """What was appended since the last read, and the logs of newer attempts."""
        out = []
        for attempt, path in attempt_logs(self.job_dir):
            if self.attempt is not None and attempt < self.attempt:
                continue
            new = attempt != self.attempt
            if new and (self.attempt is not None or attempt > 1):
                out.append(header(attempt))
            out.append(self._read_to_end(attempt, path, start=0 if new else self.offset))
        return "".join(out)

    def _read_to_end(self, attempt: int, path: Path, *, start: int | None) -> str:
        """The text of ``path`` from byte ``start`` to its end (``None``: its last
        ``TAIL_WINDOW_BYTES``, from a line start); the reader's position moves there."""
        if attempt != self.attempt:
            self.attempt, self.offset = attempt, 0
            self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        try:
            with open(path, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                begin = max(0, size - TAIL_WINDOW_BYTES) if start is None else start
                f.seek(begin)
                data = f.read()
                self.offset = begin + len(data)
        except OSError:
            data = b""
        if start is None and begin > 0:
            data = data.partition(b"\n")[2]  # began mid-line
        return self.decoder.decode(data)


async def stream_log(
    job_dir: JobDir,
    *,
    tail: int | None,
    follow: bool,
    status: Callable[[], str | None],
    poll_seconds: float,
    disconnected: Callable[[], Awaitable[bool]],
) -> AsyncIterator[str]:
    """The body of ``GET /v1/jobs/{id}/logs`` (see the module docstring). ``status()`` reads the
    job's status (None: the job is gone)."""
    reader = LogReader(job_dir)
    yield await anyio.to_thread.run_sync(reader.initial, tail)
    while follow:
        current = await anyio.to_thread.run_sync(status)
        text = await anyio.to_thread.run_sync(reader.more)
        if text:
            yield text
        if current is None or current in TERMINAL_STATUSES or await disconnected():
            return
        await anyio.sleep(poll_seconds)
