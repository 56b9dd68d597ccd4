"""Helpers of the worker tests (imported by the tests and ``conftest.py``)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

NUM_CLASSES = 3
LEASE_SECONDS = 5  # the smallest lease the settings allow


class Api:
    """httpx against the stack's API with the stack's token."""

    def __init__(self, stack) -> None:
        self.stack = stack
        self.http = httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {stack.token}"}, timeout=30)

    def get(self, path: str, **kw) -> Any:
        r = self.http.get(path, **kw)
        assert r.status_code == 200, r.text
        return r.json()

    def post(self, path: str, expect: int = 201, **kw) -> Any:
        r = self.http.post(path, **kw)
        assert r.status_code == expect, r.text
        return r.json()

    def job(self, job_id: str) -> dict[str, Any]:
        return self.get(f"/v1/jobs/{job_id}")

    def wait_for(self, job_id: str, predicate: Callable[[dict], bool], timeout: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if predicate(job):
                return job
            if time.monotonic() > deadline:
                log = self.stack.logs_dir / "worker.log"
                raise AssertionError(f"job {job_id}: {what} not reached in {timeout} s: {job}\n"
                                     f"worker log:\n{log.read_text()[-4000:]}")
            time.sleep(0.2)

    def wait_terminal(self, job_id: str, timeout: float = 240) -> dict[str, Any]:
        return self.wait_for(job_id, lambda j: j["status"] in ("succeeded", "failed", "cancelled"), timeout, "the end")


def tiny_student(**overrides: Any) -> dict[str, Any]:
    return {"arch": "retinanet", "backbone": "resnet18", "num_classes": NUM_CLASSES, "fpn_channels": 16,
            "min_size": 64, "max_size": 64, **overrides}


def tiny_hyperparameters(**overrides: Any) -> dict[str, Any]:
    return {"max_iters": 12, "batch_size": 2, "lr": 0.01, "warmup_iters": 2, "num_workers": 0,
            "log_period": 4, "checkpoint_period": 4, "amp": False, **overrides}


def job_body(kind: str, dataset_ids: dict[str, str], *, devices: int = 1, teacher: str | None = None,
             student: dict | None = None, name: str | None = None, **hp: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "kind": kind, "name": name or f"test-{kind}", "student": student or tiny_student(),
        "train_dataset": dataset_ids["train"], "val_dataset": dataset_ids["val"],
        "hyperparameters": tiny_hyperparameters(**hp), "resources": {"devices": devices},
    }
    if teacher is not None:
        body["teacher"] = {"model_id": teacher}
    return body


def processes_in(directory: Path) -> list[int]:
    """Pids of live processes whose working directory is ``directory`` (a job's training tree)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if Path(os.readlink(entry / "cwd")) == directory:
                stat = (entry / "stat").read_text()
                if stat.rsplit(")", 1)[1].split()[0] != "Z":  # zombies are already dead
                    pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def ghost_job(db, dataset_ids: dict[str, str], tiny_dataset: dict[str, Any], *, max_iters: int) -> str:
    """A valid job inserted straight into the database (no message sent), then leased by a
    "ghost" worker that never runs it."""
    from gid.embedded import LOCAL_OWNER
    from gid_core.config import JobConfig
    from service import crud, leases
    from service.core.db import session_scope

    engine = JobConfig(
        kind="train", student=tiny_student(),
        data={"train_annotations": tiny_dataset["train_annotations"], "train_images": tiny_dataset["train_images"]},
        hyperparameters=tiny_hyperparameters(max_iters=max_iters), devices=1,
    )
    with session_scope(db) as s:
        owner = crud.get_or_create_owner(s, name=LOCAL_OWNER)
        job, _ = crud.create_job(
            s, owner_id=owner.id, kind="train", name="ghost", config={}, engine_config=engine.model_dump(mode="json"),
            request_hash="0" * 64, idempotency_key=None, train_dataset_id=dataset_ids["train"],
        )
        claimed = leases.claim_job(s, job_id=job.id, worker_id="ghost", lease_seconds=600)
        assert claimed is not None
        return job.id


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned); fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"{what}: not reached in {timeout} s"
        time.sleep(0.1)
    return value


def training_processes(output_dir: Path) -> dict[str, list[int]]:
    """The live training tree of a job: ``runner`` (the worker's child) and ``ranks`` (spawned DDP
    processes), told apart by their command lines."""
    tree: dict[str, list[int]] = {"runner": [], "ranks": []}
    for pid in processes_in(output_dir):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"worker.runner" in cmdline:
            tree["runner"].append(pid)
        elif any(b"spawn_main" in part for part in cmdline):
            tree["ranks"].append(pid)
    return tree
