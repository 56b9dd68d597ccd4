"""The names of a job's statuses, shared by the database model, the API and the client.

Dependency-free on purpose: the ``gid`` client imports it without the server's libraries. The
state machine over these names (which transitions are legal) lives with the table in
``service.models``.
"""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
