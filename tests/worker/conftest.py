"""Fixtures of the worker tests: all real parts.

``stack`` is one ``EmbeddedStack`` for the whole session: a real Redis server, the API under uvicorn
on a free port, a real Celery worker process (concurrency 1) and a SQLite database, with lease,
heartbeat and reaper periods shortened so that losing a worker is noticed within seconds.
``tiny_dataset`` is the synthetic digits dataset at 64 px (8 train, 8 val images, 3 classes).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from gid.embedded import EmbeddedStack
from gid_core.config import SyntheticDatasetConfig
from gid_core.processes import free_port
from gid_core.synthetic import make_synthetic_dataset
from service.core.db import make_engine, make_session_factory
from tests.worker.helpers import LEASE_SECONDS, NUM_CLASSES, Api

STACK_ENV = {
    "GID_JOB_LEASE_SECONDS": str(LEASE_SECONDS),
    "GID_JOB_HEARTBEAT_SECONDS": "1",
    "GID_REAPER_PERIOD_SECONDS": "1",
    "GID_JOB_REQUEUE_AFTER_SECONDS": "60",
    "GID_MAX_ATTEMPTS": "3",
    "GID_CANCEL_POLL_SECONDS": "0.5",
    "GID_CANCEL_GRACE_SECONDS": "20",
    "GID_PROGRESS_INTERVAL_SECONDS": "0.2",
    "OMP_NUM_THREADS": "1",
}


@pytest.fixture(scope="session")
def worker_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("worker")


@pytest.fixture(scope="session")
def stack(worker_tmp: Path) -> Iterator[EmbeddedStack]:
    data_dir = worker_tmp / "data"
    s = EmbeddedStack(data_dir, port=free_port(), extra_env=STACK_ENV, startup_timeout=180)
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def tiny_dataset(stack: EmbeddedStack) -> dict[str, Any]:
    """Inside the stack's data dir, which ``gid up`` always allows as a data root."""
    cfg = SyntheticDatasetConfig(
        output_dir=stack.data_dir / "synthetic", num_train=8, num_val=8, image_size=64,
        num_classes=NUM_CLASSES, max_objects=3, seed=0,
    )
    return make_synthetic_dataset(cfg)


@pytest.fixture(scope="session")
def api(stack: EmbeddedStack) -> Iterator[Api]:
    client = Api(stack)
    yield client
    client.http.close()


@pytest.fixture(scope="session")
def dataset_ids(api: Api, tiny_dataset: dict[str, Any]) -> dict[str, str]:
    ids = {}
    for split in ("train", "val"):
        body = {"name": f"tiny-{split}", "annotations": tiny_dataset[f"{split}_annotations"],
                "images": tiny_dataset[f"{split}_images"]}
        ids[split] = api.post("/v1/datasets", json=body)["id"]
    return ids


@pytest.fixture(scope="session")
def db(stack: EmbeddedStack) -> Iterator[sessionmaker[Session]]:
    """Direct access to the stack's database (the same SQLite file the API and worker use)."""
    engine = make_engine(stack.database_url)
    yield make_session_factory(engine)
    engine.dispose()
